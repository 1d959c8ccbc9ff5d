"""`cmerge add` SIGKILLed at random and at chosen points, then resumed: same result, bit for bit.

Each kill hits a real child process running the CLI. The children are forked from a
forkserver that has imported cmerge once, so a trial costs no interpreter start-up.
After each kill, `cmerge info` must read the state, `cmerge export` must work, and the
same `cmerge add` must complete (or be refused as a duplicate when the step had already
been committed) to accumulators and an exported model bit-identical to an
uninterrupted run.
"""
from __future__ import annotations

import json
import multiprocessing
import random
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import helpers

HIDDEN, LAYERS = 384, 10  # about 1 s for an OPCM step on one core: the kill can land anywhere in it


def crash_base(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    sd = {"embed.weight": torch.randn(64, HIDDEN, generator=g)}
    for i in range(LAYERS):
        sd[f"layers.{i}.attn.weight"] = torch.randn(HIDDEN, HIDDEN, generator=g)
        sd[f"layers.{i}.attn.bias"] = torch.randn(HIDDEN, generator=g)
        sd[f"layers.{i}.mlp.weight"] = torch.randn(2 * HIDDEN, HIDDEN, generator=g)
    return sd


@pytest.fixture(scope="module")
def ctx():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["helpers", "cmerge.cli"])
    warm = run_child(context, ["--version"])  # starts the forkserver, so later timings are the add's own
    warm.join()
    assert warm.exitcode == 0
    return context


@pytest.fixture(scope="module")
def setup(tmp_path_factory, ctx):
    """Models, a template state after step 1, and the uninterrupted step 2 (run in a child, timed)."""
    root = tmp_path_factory.mktemp("crash")
    base = crash_base()
    paths = {"base": helpers.save_model(base, root / "base.safetensors")}
    for i in range(3):
        paths[f"m{i}"] = helpers.save_model(helpers.expert(base, i, 0.02), root / f"m{i}.safetensors")
    template = root / "template"
    from cmerge import init_state

    st = init_state(template, paths["base"], "opcm")
    st.add(paths["m0"])
    st.export(root / "template-export")

    ref = root / "reference"
    shutil.copytree(template, ref)
    started = time.monotonic()
    p = run_child(ctx, ["add", ref, paths["m1"], "-q"])
    seconds = None
    while p.is_alive():  # until the step is committed, not until the process has gone
        if seconds is None and phase(ref) == "committed":
            seconds = time.monotonic() - started
        time.sleep(0.005)
    p.join()
    assert p.exitcode == 0
    seconds = seconds or time.monotonic() - started
    from cmerge import open_state

    open_state(ref).export(root / "reference-export")
    return {"root": root, "paths": paths, "template": template, "ref": ref, "seconds": seconds}


def run_child(ctx, args, kill_at=None):
    p = ctx.Process(target=helpers.cli_child, args=([str(a) for a in args], kill_at))
    p.start()
    return p


def accumulators(state: Path) -> dict:
    m = json.loads((state / "manifest.json").read_text())
    with safe_open(str(state / m["generation"] / "accumulators.safetensors"), framework="pt") as h:
        return {k: h.get_tensor(k) for k in h.keys()}


def phase(state: Path) -> str:
    """Where the killed step stood, read from what it left on disk."""
    steps = len(json.loads((state / "manifest.json").read_text())["steps"])
    if steps == 2:
        return "committed"
    if (state / "gen-000002").exists():
        return "renamed"
    if (state / "gen-000002.partial").exists():
        return "writing"
    return "not started"


def check_resume(setup, cli, state: Path) -> str:
    """After a kill: info and export work, the same add completes, the result is the reference's."""
    where = phase(state)
    info = cli("info", state, "--json")
    assert info.exit_code == 0, info.stderr
    steps = len(json.loads(info.stdout)["steps"])
    assert steps == (2 if where == "committed" else 1)
    early = setup["root"] / f"early-{time.monotonic_ns()}"
    assert cli("export", state, early, "-q").exit_code == 0
    want_early = setup["ref" if steps == 2 else "template"].parent / (
        "reference-export" if steps == 2 else "template-export")
    a, b = helpers.load_safetensors_dir(early), helpers.load_safetensors_dir(want_early)
    assert all(torch.equal(a[n], b[n]) for n in b)

    res = cli("add", state, setup["paths"]["m1"], "-q")
    if where == "committed":
        helpers.assert_one_sentence_error(res, "already merged")
    else:
        assert res.exit_code == 0, res.stderr
        assert not (state / "gen-000002.partial").exists() and not (state / "gen-000001").exists()
    got, want = accumulators(state), accumulators(setup["ref"])
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    m_got = json.loads((state / "manifest.json").read_text())
    m_want = json.loads((setup["ref"] / "manifest.json").read_text())
    assert m_got["scalars"] == m_want["scalars"]
    for key in ("sha256", "norm", "lambda", "name", "protected_rank"):
        assert m_got["steps"][-1][key] == m_want["steps"][-1][key]
    out = setup["root"] / f"out-{time.monotonic_ns()}"
    assert cli("export", state, out, "-q").exit_code == 0
    a, b = helpers.load_safetensors_dir(out), helpers.load_safetensors_dir(setup["root"] / "reference-export")
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in b)
    return where


def fresh_copy(setup, name: str) -> Path:
    state = setup["root"] / name
    shutil.copytree(setup["template"], state)
    return state


@pytest.mark.parametrize("kill_at", helpers.KILL_POINTS)
def test_kill_at_chosen_points(setup, ctx, cli, kill_at):
    state = fresh_copy(setup, f"point-{kill_at}")
    p = run_child(ctx, ["add", state, setup["paths"]["m1"], "-q"], kill_at=kill_at)
    p.join()
    assert p.exitcode == -signal.SIGKILL
    expected = {"mid_write": "writing", "after_gen_rename": "renamed", "before_manifest_switch": "renamed",
                "after_manifest_switch": "committed"}[kill_at]
    assert check_resume(setup, cli, state) == expected


def test_kill_after_random_delays(setup, ctx, cli):
    rng = random.Random(20250117)
    trials = 5
    phases = []
    for i in range(trials):
        state = fresh_copy(setup, f"random-{i}")
        # spread over the whole step (and a little past it), one delay per slice
        delay = setup["seconds"] * 1.1 * (i + rng.random()) / trials
        p = run_child(ctx, ["add", state, setup["paths"]["m1"], "-q"])
        p.join(timeout=delay)
        if p.is_alive():
            p.kill()
        p.join()
        assert p.exitcode in (0, -signal.SIGKILL)
        phases.append(check_resume(setup, cli, state))
    print(f"step took {setup['seconds']:.2f} s; phases hit: {phases}")


def test_second_concurrent_add_is_refused(setup, ctx, cli):
    state = fresh_copy(setup, "concurrent")
    p = run_child(ctx, ["add", state, setup["paths"]["m1"], "-q"])
    deadline = time.monotonic() + 120
    while not (state / "gen-000002.partial").exists() and p.is_alive() and time.monotonic() < deadline:
        time.sleep(0.005)
    if not p.is_alive():
        pytest.skip("the first add finished before the second could start")
    res = cli("add", state, setup["paths"]["m2"], "-q")
    helpers.assert_one_sentence_error(res, "another cmerge process")
    p.join()
    assert p.exitcode == 0
    # the refused add left no trace and did not disturb the running one
    assert not (state / "gen-000003").exists() and not (state / "gen-000003.partial").exists()
    got, want = accumulators(state), accumulators(setup["ref"])
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert len(json.loads((state / "manifest.json").read_text())["steps"]) == 2


def test_kill_during_export(setup, ctx, cli):
    out = setup["root"] / "killed-export"
    before = helpers.snapshot(setup["ref"])
    p = run_child(ctx, ["export", setup["ref"], out, "-q"], kill_at="mid_write")
    p.join()
    assert p.exitcode == -signal.SIGKILL
    assert not out.exists()  # only the .partial folder was being written
    assert helpers.snapshot(setup["ref"]) == before
    assert cli("info", setup["ref"]).exit_code == 0
    assert cli("export", setup["ref"], out, "-q").exit_code == 0
    assert not out.with_name(out.name + ".partial").exists()
    a, b = helpers.load_safetensors_dir(out), helpers.load_safetensors_dir(setup["root"] / "reference-export")
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in b)


@pytest.mark.parametrize("kill_at", ["mid_write", "before_replace:killed-export", "after_replace:killed-export"])
def test_export_killed_at_every_phase(setup, ctx, cli, kill_at):
    """An export killed anywhere leaves the state untouched and OUT absent or complete; exporting again works."""
    out = setup["root"] / "killed-export"
    shutil.rmtree(out, ignore_errors=True)
    before = helpers.snapshot(setup["ref"])
    p = run_child(ctx, ["export", setup["ref"], out, "-q"], kill_at=kill_at)
    p.join()
    assert p.exitcode == -signal.SIGKILL
    assert helpers.snapshot(setup["ref"]) == before
    want = helpers.load_safetensors_dir(setup["root"] / "reference-export")
    if kill_at.startswith("after_replace"):
        got = helpers.load_safetensors_dir(out)  # the rename was the commit: the model is whole
        assert set(got) == set(want) and all(torch.equal(got[n], want[n]) for n in want)
        helpers.assert_one_sentence_error(cli("export", setup["ref"], out, "-q"), "already exists")
        return
    assert not out.exists()
    assert cli("export", setup["ref"], out, "-q").exit_code == 0
    assert not out.with_name(out.name + ".partial").exists()
    got = helpers.load_safetensors_dir(out)
    assert set(got) == set(want) and all(torch.equal(got[n], want[n]) for n in want)


@pytest.mark.parametrize("kill_at", ["mid_read", "before_replace:killed-init", "after_replace:killed-init"])
def test_init_killed_at_every_phase(setup, ctx, cli, kill_at):
    """An init killed anywhere leaves no state or a whole one; the same init then works (or is refused
    because the state exists), and the state is the one an uninterrupted init makes."""
    state = setup["root"] / "killed-init"
    shutil.rmtree(state, ignore_errors=True)
    p = run_child(ctx, ["init", state, "--base", setup["paths"]["base"], "-q"], kill_at=kill_at)
    p.join()
    assert p.exitcode == -signal.SIGKILL
    if kill_at.startswith("after_replace"):
        assert cli("info", state).exit_code == 0
        helpers.assert_one_sentence_error(cli("init", state, "--base", setup["paths"]["base"], "-q"),
                                          "already exists")
    else:
        assert not state.exists()
        assert cli("init", state, "--base", setup["paths"]["base"], "-q").exit_code == 0
        assert not state.with_name(state.name + ".partial").exists()
    got = json.loads((state / "manifest.json").read_text())
    want = json.loads((setup["template"] / "manifest.json").read_text())
    for key in ("method", "params", "precision", "scalars"):
        assert got[key] == (want[key] if key != "scalars" else {"lambda": None, "norm_sum": 0.0, "mean_norm": None})
    assert got["base"]["sha256"] == want["base"]["sha256"] and got["base"]["tensors"] == want["base"]["tensors"]
    assert cli("add", state, setup["paths"]["m0"], "-q").exit_code == 0
