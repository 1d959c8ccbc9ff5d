"""Bad input: one clear sentence on stderr, exit status 2, and the merge state unchanged byte for byte."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

import helpers


@pytest.fixture
def state(tiny, cli):
    """A state with one good step (so it has accumulators to protect)."""
    path = tiny["root"] / "state"
    assert cli("init", path, "--base", tiny["paths"]["base"], "-q").exit_code == 0
    assert cli("add", path, tiny["paths"]["m0"], "-q").exit_code == 0
    return path


def bad_model(tiny, kind: str):
    """A model file (or folder) that must be refused, and a fragment its error message must contain."""
    good = dict(tiny["experts"][1])
    root = tiny["root"] / "bad"
    root.mkdir(exist_ok=True)
    path = root / f"{kind}.safetensors"
    if kind == "shape":
        good["layers.0.mlp.up.weight"] = torch.zeros(33, 16)
        return helpers.save_model(good, path), "shape"
    if kind == "missing":
        del good["layers.1.norm.weight"]
        return helpers.save_model(good, path), "missing tensor 'layers.1.norm.weight'"
    if kind == "extra":
        good["layers.2.norm.weight"] = torch.zeros(16)
        return helpers.save_model(good, path), "'layers.2.norm.weight'"
    if kind in ("nan", "inf"):
        w = good["layers.1.mlp.down.weight"].clone()
        w[3, 5] = float("nan") if kind == "nan" else float("-inf")
        good["layers.1.mlp.down.weight"] = w
        return helpers.save_model(good, path), "NaN or Inf"
    if kind == "int_dtype":
        good["layers.0.norm.weight"] = torch.ones(16, dtype=torch.int32)
        return helpers.save_model(good, path), "non-floating"
    if kind == "float_for_int":
        good["position_ids"] = good["position_ids"].float()
        return helpers.save_model(good, path), "position_ids"
    if kind == "truncated_safetensors":
        data = helpers.save_model(good, path).read_bytes()
        path.write_bytes(data[: len(data) * 2 // 3])
        return path, "could not read"
    if kind == "garbage_safetensors":
        path.write_bytes(b"this is not a safetensors file at all")
        return path, "could not read"
    if kind == "truncated_bin":
        pt = root / "model.bin"
        torch.save(good, pt)
        pt.write_bytes(pt.read_bytes()[:300])
        return pt, "could not read"
    if kind == "pickled_objects":
        pt = root / "objects.pt"
        torch.save({**good, "optimizer": Opaque()}, pt)
        return pt, "other than tensors"
    if kind == "empty_file":
        path.write_bytes(b"")
        return path, "could not read"
    if kind == "nonexistent":
        return root / "nowhere" / "model.safetensors", "does not exist"
    if kind == "empty_folder":
        (root / "empty").mkdir()
        return root / "empty", "no model weights"
    raise AssertionError(kind)


BAD = ["shape", "missing", "extra", "nan", "inf", "int_dtype", "float_for_int", "truncated_safetensors",
       "garbage_safetensors", "truncated_bin", "pickled_objects", "empty_file", "nonexistent", "empty_folder"]


class Opaque:
    """A pickled object that is not a tensor: torch.load(weights_only=True) refuses it."""


@pytest.mark.parametrize("kind", BAD)
def test_bad_model_is_refused_and_state_unchanged(tiny, state, cli, kind):
    path, fragment = bad_model(tiny, kind)
    before = helpers.snapshot(state)
    res = cli("add", state, path, "-q")
    helpers.assert_one_sentence_error(res, fragment)
    assert helpers.snapshot(state) == before
    # the state still works afterwards
    assert cli("add", state, tiny["paths"]["m1"], "-q").exit_code == 0


@pytest.mark.parametrize("kind", ["shape", "nan", "truncated_safetensors"])
def test_bad_model_refused_on_a_fresh_state(tiny, cli, kind):
    path = tiny["root"] / "fresh"
    cli("init", path, "--base", tiny["paths"]["base"], "-q")
    before = helpers.snapshot(path)
    bad, fragment = bad_model(tiny, kind)
    helpers.assert_one_sentence_error(cli("add", path, bad, "-q"), fragment)
    after = helpers.snapshot(path)
    assert after == before


def test_bad_model_refused_by_merge_command(tiny, cli):
    bad, fragment = bad_model(tiny, "nan")
    out = tiny["root"] / "out"
    res = cli("merge", "--base", tiny["paths"]["base"], tiny["paths"]["m0"], bad, "-o", out, "-q")
    helpers.assert_one_sentence_error(res, fragment)
    assert not out.exists()


def edit_manifest(state, **changes):
    m = json.loads((state / "manifest.json").read_text())
    m.update(changes)
    (state / "manifest.json").write_text(json.dumps(m, indent=2))


@pytest.mark.parametrize("command", ["add", "export", "info"])
def test_newer_format_version_is_refused(tiny, state, cli, command):
    edit_manifest(state, format_version=99)
    before = helpers.snapshot(state)
    args = {"add": [tiny["paths"]["m1"], "-q"], "export": [tiny["root"] / "out", "-q"], "info": []}[command]
    helpers.assert_one_sentence_error(cli(command, state, *args), "newer")
    assert helpers.snapshot(state) == before
    assert not (tiny["root"] / "out").exists()


def test_state_of_an_unknown_method_is_refused(tiny, state, cli):
    edit_manifest(state, method="dop", params={})
    before = helpers.snapshot(state)
    helpers.assert_one_sentence_error(cli("add", state, tiny["paths"]["m1"], "-q"), "dop")
    helpers.assert_one_sentence_error(cli("export", state, tiny["root"] / "o", "-q"), "dop")
    assert helpers.snapshot(state) == before


@pytest.mark.parametrize("other", ["average", "task_arithmetic"])
def test_accumulators_written_by_another_method_are_refused(tiny, state, cli, other):
    """A manifest that names another method than the one that wrote the accumulators."""
    edit_manifest(state, method=other, params={})
    before = helpers.snapshot(state)
    helpers.assert_one_sentence_error(cli("add", state, tiny["paths"]["m1"], "-q"), "opcm")
    helpers.assert_one_sentence_error(cli("export", state, tiny["root"] / "o", "-q"), "opcm")
    assert helpers.snapshot(state) == before
    assert not (tiny["root"] / "o").exists()


def test_not_a_state(tiny, cli):
    helpers.assert_one_sentence_error(cli("add", tiny["root"], tiny["paths"]["m1"], "-q"), "not a cmerge merge state")
    (tiny["root"] / "s").mkdir()
    (tiny["root"] / "s" / "manifest.json").write_text("{broken")
    helpers.assert_one_sentence_error(cli("info", tiny["root"] / "s"), "not readable JSON")


def test_changed_base_is_refused(tiny, state, cli):
    base = dict(tiny["base"])
    w = base["head.weight"].clone()
    w[0, 0] += 1e-3
    base["head.weight"] = w
    helpers.save_model(base, tiny["paths"]["base"])  # same names and shapes, different content
    before = helpers.snapshot(state)
    helpers.assert_one_sentence_error(cli("add", state, tiny["paths"]["m1"], "-q"), "changed since")
    assert helpers.snapshot(state) == before
    out = tiny["root"] / "out"
    helpers.assert_one_sentence_error(cli("export", state, out, "-q"), "changed since")
    assert not out.exists() and not (tiny["root"] / "out.partial").exists()
    assert helpers.snapshot(state) == before


def test_reshaped_or_deleted_base_is_refused(tiny, state, cli):
    base = dict(tiny["base"])
    base["head.weight"] = torch.zeros(4, 16)
    helpers.save_model(base, tiny["paths"]["base"])
    before = helpers.snapshot(state)
    helpers.assert_one_sentence_error(cli("add", state, tiny["paths"]["m1"], "-q"), "base")
    os.remove(tiny["paths"]["base"])
    helpers.assert_one_sentence_error(cli("add", state, tiny["paths"]["m1"], "-q"), "no longer exists")
    assert helpers.snapshot(state) == before


def test_same_model_twice_needs_force(tiny, state, cli):
    before = helpers.snapshot(state)
    helpers.assert_one_sentence_error(cli("add", state, tiny["paths"]["m0"], "-q"), "already merged", "--force")
    assert helpers.snapshot(state) == before
    # the same content in another format and under another name is the same model
    copy = tiny["root"] / "copy.pt"
    torch.save(tiny["experts"][0], copy)
    helpers.assert_one_sentence_error(cli("add", state, copy, "--name", "again", "-q"), "already merged")
    assert helpers.snapshot(state) == before
    res = cli("add", state, tiny["paths"]["m0"], "--force", "-q")
    assert res.exit_code == 0, res.stderr
    info = json.loads(cli("info", state, "--json").stdout)
    assert len(info["steps"]) == 2 and info["steps"][0]["sha256"] == info["steps"][1]["sha256"]


def test_concurrent_add_is_refused_by_the_lock(tiny, state, cli):
    from cmerge.fsutil import locked

    before = helpers.snapshot(state)
    with locked(state / ".lock", "held by the test"):  # what a running `cmerge add` holds
        helpers.assert_one_sentence_error(cli("add", state, tiny["paths"]["m1"], "-q"), "another cmerge process")
        assert helpers.snapshot(state) == before
    assert cli("add", state, tiny["paths"]["m1"], "-q").exit_code == 0


def test_bad_fisher_file(tiny, cli):
    path = tiny["root"] / "fs"
    cli("init", path, "--base", tiny["paths"]["base"], "--method", "fisher_merge", "-q")
    before = helpers.snapshot(path)
    helpers.assert_one_sentence_error(cli("add", path, tiny["paths"]["m0"], "-q"), "fisher")
    bad = helpers.fisher_like(tiny["experts"][0], 0)
    bad["head.weight"] = torch.ones(2, 2)
    fpath = tiny["root"] / "badfisher.safetensors"
    save_file(bad, str(fpath))
    helpers.assert_one_sentence_error(cli("add", path, tiny["paths"]["m0"], "--fisher", fpath, "-q"), "shape")
    nan = helpers.fisher_like(tiny["experts"][0], 0)
    nan["layers.1.mlp.up.weight"][2, 3] = float("nan")
    save_file(nan, str(fpath))
    helpers.assert_one_sentence_error(cli("add", path, tiny["paths"]["m0"], "--fisher", fpath, "-q"), "NaN or Inf")
    after = helpers.snapshot(path)
    assert after == before


def test_extra_input_for_a_method_without_one(tiny, state, cli):
    before = helpers.snapshot(state)
    res = cli("add", state, tiny["paths"]["m1"], "--fisher", tiny["paths"]["f1"], "-q")
    helpers.assert_one_sentence_error(res, "--fisher")
    assert helpers.snapshot(state) == before


@pytest.mark.parametrize("what", ["nan_base", "state_exists", "missing_base", "bad_precision"])
def test_bad_init(tiny, cli, what):
    target = tiny["root"] / "s"
    base = tiny["paths"]["base"]
    extra = []
    if what == "nan_base":
        sd = dict(tiny["base"])
        sd["head.weight"] = torch.full((3, 16), float("nan"))
        base = helpers.save_model(sd, tiny["root"] / "nanbase.safetensors")
        fragment = "NaN or Inf"
    elif what == "state_exists":
        target.mkdir()
        (target / "something").write_text("x")
        fragment = "already exists"
    elif what == "missing_base":
        base = tiny["root"] / "nope"
        fragment = "does not exist"
    else:
        extra = ["--precision", "float16"]
        fragment = ""
    res = cli("init", target, "--base", base, *extra, "-q")
    if what == "bad_precision":  # rejected by click's choice check: usage error, exit 2
        assert res.exit_code == 2 and "float16" in res.stderr
    else:
        helpers.assert_one_sentence_error(res, fragment)
    if what == "state_exists":
        assert sorted(p.name for p in target.iterdir()) == ["something"]
    else:
        assert not target.exists()
