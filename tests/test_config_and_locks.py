"""A merge described by a YAML file; locks between add and export; checks before any compute; streaming
in the in-memory Merger and of every method (issue: reshape the streaming core)."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import save_file

import helpers
from cmerge import Merger, init_state
from cmerge.config import MergeConfig, ModelEntry, dump_config, load_config
from cmerge.engine import StepOptions
from cmerge.errors import CmergeError
from cmerge.fsutil import cached_folder, locked
from cmerge.methods import REGISTRY


def write_yaml(path, data) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def outputs_equal(a, b) -> bool:
    x, y = helpers.load_safetensors_dir(a), helpers.load_safetensors_dir(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


# ---------------------------------------------------------------- the config file

def test_config_merge_equals_the_same_merge_by_flags(tiny, cli, tmp_path):
    p = tiny["paths"]
    res = cli("merge", "--base", p["base"], p["m0"], p["m1"], p["m2"], "--method", "task_arithmetic", "--lam", "0.2",
              "--dtype", "float16", "-o", tmp_path / "flags", "-q")
    assert res.exit_code == 0, res.stderr
    cfg = write_yaml(tmp_path / "merge.yml", {
        "method": "task_arithmetic", "params": {"lam": 0.2}, "base": str(p["base"]),
        "models": [str(p["m0"]), {"path": str(p["m1"]), "name": "second"}, str(p["m2"])],
        "dtype": "float16", "output": str(tmp_path / "from-config")})
    res = cli("merge", "--config", cfg, "-q")
    assert res.exit_code == 0, res.stderr
    assert outputs_equal(tmp_path / "flags", tmp_path / "from-config")
    record = json.loads((tmp_path / "from-config" / "cmerge_merge.json").read_text())
    assert [s["name"] for s in record["steps"]] == ["m0", "second", "m2"]
    assert "state" not in record  # the temporary state is gone; the inputs and their hashes are recorded
    assert all(s["source"].endswith(".safetensors") and len(s["sha256"]) == 64 for s in record["steps"])


def test_flags_override_the_file(tiny, cli, tmp_path):
    p = tiny["paths"]
    cfg = write_yaml(tmp_path / "merge.yml", {"method": "task_arithmetic", "params": {"lam": 0.2},
                                              "base": str(p["base"]), "models": [str(p["m0"]), str(p["m1"])],
                                              "output": str(tmp_path / "unused")})
    assert cli("merge", "--config", cfg, "--lam", "0.7", "-o", tmp_path / "over", "-q").exit_code == 0
    assert not (tmp_path / "unused").exists()
    assert cli("merge", "--base", p["base"], p["m0"], p["m1"], "--method", "task_arithmetic", "--lam", "0.7",
               "-o", tmp_path / "want", "-q").exit_code == 0
    assert outputs_equal(tmp_path / "over", tmp_path / "want")
    # models on the command line replace the file's
    assert cli("merge", "--config", cfg, p["m2"], "-o", tmp_path / "one", "-q").exit_code == 0
    record = json.loads((tmp_path / "one" / "cmerge_merge.json").read_text())
    assert [s["name"] for s in record["steps"]] == ["m2"]


def test_init_from_a_config_and_relative_paths(tiny, cli, tmp_path):
    models = tiny["paths"]["base"].parent
    (models / "init.yml").write_text("method: opcm\nparams:\n  alpha: 0.3\n  keep_diagonal: yes\nbase: base.safetensors\n"
                                     "precision: float64\n")
    res = cli("init", tmp_path / "s", "--config", models / "init.yml", "-q")
    assert res.exit_code == 0, res.stderr
    info = json.loads(cli("info", tmp_path / "s", "--json").stdout)
    assert info["params"]["alpha"] == 0.3 and info["params"]["keep_diagonal"] is True
    assert info["precision"] == "float64" and info["base"]["path"] == str(tiny["paths"]["base"].resolve())
    res = cli("init", tmp_path / "s2", "--config", models / "init.yml", "--alpha", "0.9", "-q")
    assert res.exit_code == 0 and json.loads(cli("info", tmp_path / "s2", "--json").stdout)["params"]["alpha"] == 0.9


def test_config_round_trip(tmp_path):
    cfg = MergeConfig(method="fisher_merge", params={"alpha": 0.3}, base="/b", dtype="bfloat16",
                      models=(ModelEntry("/m1"), ModelEntry("/m2", "two", {"fisher": "/f2"})),
                      project=("a\\.weight$",), strict_layers=True, output="/out")
    (tmp_path / "c.yml").write_text(dump_config(cfg))
    assert load_config(tmp_path / "c.yml") == cfg


@pytest.mark.parametrize("text,fragment", [
    ("method: opcm\nbase: b\nmodel: [m]\n", "unknown key 'model'"),
    ("method: opcm\nbase: b\nparams: {alpha: 2.0}\n", "alpha must be in [0, 1]"),
    ("method: opcm\nbase: b\nparams: {alpha: abc}\n", "alpha must be a float"),
    ("method: opcm\nbase: b\nparams: {lam: 0.3}\n", "has no parameter 'lam'"),
    ("method: nope\nbase: b\n", "unknown method 'nope'"),
    ("method: opcm\nbase: [b]\n", "base must be a string"),
    ("method: opcm\nbase: b\nprecision: float16\n", "precision must be one of float32, float64"),
    ("method: opcm\nbase: b\nmodels: m1\n", "models must be a list"),
    ("method: opcm\nbase: b\nmodels: [{name: x}]\n", "models[0] must be a path or a mapping with a 'path'"),
    ("method: opcm\nbase: b\nstrict_layers: maybe\n", "strict_layers must be true or false"),
    ("method: opcm\nbase: b\nparams: [1, 2]\n", "params must be a mapping"),
    ("- just\n- a list\n", "must be a mapping of keys"),
    ("method: opcm\nbase: [unclosed\n", "is not valid YAML"),
])
def test_bad_config_is_refused_naming_the_key(tmp_path, cli, text, fragment):
    path = tmp_path / "bad.yml"
    path.write_text(text)
    with pytest.raises(CmergeError) as err:
        load_config(path)
    assert fragment in str(err.value)
    res = cli("merge", "--config", path, "-o", tmp_path / "out", "-q")
    helpers.assert_one_sentence_error(res, fragment)
    assert not (tmp_path / "out").exists()


def test_per_model_extra_inputs_from_the_config(tiny, cli, tmp_path):
    p = tiny["paths"]
    cfg = write_yaml(tmp_path / "f.yml", {"method": "fisher_merge", "base": str(p["base"]),
                                          "models": [{"path": str(p[f"m{i}"]), "fisher": str(p[f"f{i}"])}
                                                     for i in range(3)], "output": str(tmp_path / "cfg")})
    assert cli("merge", "--config", cfg, "-q").exit_code == 0
    res = cli("merge", "--base", p["base"], *(p[f"m{i}"] for i in range(3)), "--method", "fisher_merge",
              *(a for i in range(3) for a in ("--fisher", p[f"f{i}"])), "-o", tmp_path / "flags", "-q")
    assert res.exit_code == 0, res.stderr
    assert outputs_equal(tmp_path / "cfg", tmp_path / "flags")
    res = cli("merge", "--base", p["base"], p["m0"], p["m1"], "--method", "fisher_merge", "--fisher", p["f0"],
              "-o", tmp_path / "x", "-q")
    helpers.assert_one_sentence_error(res, "--fisher was given 1 times for 2 models")
    bad = write_yaml(tmp_path / "g.yml", {"method": "opcm", "base": str(p["base"]),
                                          "models": [{"path": str(p["m0"]), "fisher": str(p["f0"])}]})
    helpers.assert_one_sentence_error(cli("merge", "--config", bad, "-o", tmp_path / "y", "-q"),
                                      "does not take")


# ---------------------------------------------------------------- locks

@pytest.fixture
def one_step_state(tiny, tmp_path):
    st = init_state(tmp_path / "s", tiny["paths"]["base"], "opcm")
    st.add(tiny["paths"]["m0"])
    return st


def test_export_during_an_add_is_refused_and_writes_nothing(one_step_state, cli, tmp_path):
    path = one_step_state.path
    with locked(path / ".lock", "held by the test"):  # what a running `cmerge add` holds
        res = cli("export", path, tmp_path / "out", "-q")
        helpers.assert_one_sentence_error(res, "is adding to", "export once it has finished")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    assert cli("export", path, tmp_path / "out", "-q").exit_code == 0


def test_an_add_during_an_export_is_refused_and_exports_share(one_step_state, cli, tmp_path, tiny):
    path = one_step_state.path
    before = helpers.snapshot(path)
    with locked(path / ".lock", "held by the test", exclusive=False):  # what a running `cmerge export` holds
        helpers.assert_one_sentence_error(cli("add", path, tiny["paths"]["m1"], "-q"), "another cmerge process")
        assert cli("export", path, tmp_path / "second", "-q").exit_code == 0  # exports share the lock
    assert helpers.snapshot(path) == before


def test_two_exports_into_one_folder(one_step_state, cli, tmp_path):
    out = tmp_path / "out"
    with locked(tmp_path / ".out.cmerge-lock", "held by the test"):  # what a running export into `out` holds
        res = cli("export", one_step_state.path, out, "-q")
        helpers.assert_one_sentence_error(res, "another cmerge export is writing")
    assert not out.exists()
    (tmp_path / "out.partial").mkdir()  # left by a killed export
    (tmp_path / "out.partial" / "model.safetensors").write_bytes(b"half")
    assert cli("export", one_step_state.path, out, "-q").exit_code == 0
    assert not (tmp_path / "out.partial").exists() and (out / "model.safetensors").exists()
    helpers.assert_one_sentence_error(cli("export", one_step_state.path, out, "-q"), "already exists")


# ---------------------------------------------------------------- checks before compute

@pytest.fixture
def count_rules(monkeypatch):
    """Count calls of every method's rule (the step's compute)."""
    calls = {"n": 0}
    for cls in REGISTRY.values():
        original = cls.rule

        def counted(self, s, _original=original):
            calls["n"] += 1
            return _original(self, s)

        monkeypatch.setattr(cls, "rule", counted)
    return calls


def test_duplicate_and_changed_base_are_refused_before_any_compute(tiny, tmp_path, count_rules):
    st = init_state(tmp_path / "s", tiny["paths"]["base"], "opcm")
    st.add(tiny["paths"]["m0"])
    full_step = count_rules["n"]
    assert full_step > 0
    count_rules["n"] = 0
    with pytest.raises(CmergeError, match="already merged as step 1"):
        st.add(tiny["paths"]["m0"])
    assert count_rules["n"] == 0
    changed = dict(tiny["base"])
    changed["head.weight"] = changed["head.weight"] + 1
    helpers.save_model(changed, tiny["paths"]["base"])
    with pytest.raises(CmergeError, match="changed since `cmerge init`"):
        st.add(tiny["paths"]["m1"])
    assert count_rules["n"] == 0


# ---------------------------------------------------------------- streaming everywhere

@pytest.mark.parametrize("method", sorted(m for m, cls in REGISTRY.items() if cls.space == "weights"))
def test_merger_streams_row_blocks_bit_identical_to_whole_tensors(tiny, method):
    extras = {"extras": None}
    whole = Merger(tiny["base"], method, options=StepOptions(block_elements=1 << 40))
    blocks = Merger(tiny["base"], method, options=StepOptions(block_elements=16))
    for i, e in enumerate(tiny["experts"][:3]):
        kw = {"extras": {"fisher": tiny["fishers"][i]}} if REGISTRY[method].extra_inputs else extras
        whole.add(e, **kw)
        blocks.add(e, **kw)
        for a, tensors in whole.accumulators.items():
            for n, t in tensors.items():
                assert torch.equal(t, blocks.accumulators[a][n]), (method, a, n)
    a, b = whole.state_dict(), blocks.state_dict()
    assert all(torch.allclose(a[n].double(), b[n].double(), rtol=1e-6, atol=0) for n in a)


def test_fisher_merge_streams_both_accumulators_by_rows(tiny, tmp_path, monkeypatch):
    from cmerge.io import StreamingSafetensorsWriter, open_source

    calls = {"rows": 0}
    original = StreamingSafetensorsWriter.write_rows

    def spy(self, name, block):
        calls["rows"] += 1
        return original(self, name, block)

    monkeypatch.setattr(StreamingSafetensorsWriter, "write_rows", spy)
    options = StepOptions(block_elements=16)
    root = tmp_path / "models"
    for i in range(2):
        helpers.save_model(tiny["experts"][i], root / f"m{i}")
        save_file(tiny["fishers"][i], str(root / f"m{i}" / "exp_avg_sq.safetensors"))
    blocks = init_state(tmp_path / "b", tiny["paths"]["base"], "fisher_merge")
    whole = init_state(tmp_path / "w", tiny["paths"]["base"], "fisher_merge")
    for i in range(2):
        blocks.add(root / f"m{i}", options=options)
        whole.add(root / f"m{i}")
    assert calls["rows"] > 100  # M and F of a tensor were written side by side, block by block
    a = open_source(next((tmp_path / "b").glob("gen-*/accumulators.safetensors")))
    b = open_source(next((tmp_path / "w").glob("gen-*/accumulators.safetensors")))
    assert a.keys() == b.keys() and all(torch.equal(a.get(n), b.get(n)) for n in a.keys())


def test_cached_folder_builds_once_and_a_failed_build_leaves_nothing(tmp_path):
    calls = []

    def build(tmp):
        calls.append(tmp.name)
        (tmp / "x").write_text("1")

    def ready(folder):
        return (folder / "x").is_file()

    target = tmp_path / "cache" / "entry"
    assert cached_folder(target, build, ready) == target and (target / "x").read_text() == "1"
    assert cached_folder(target, build, ready) == target
    assert calls == ["entry.partial"]  # built once, in the partial folder

    def broken(tmp):
        (tmp / "half").write_text("")
        raise RuntimeError("killed")

    other = tmp_path / "cache" / "other"
    with pytest.raises(RuntimeError):
        cached_folder(other, broken, ready)
    assert not other.exists() and not other.with_name("other.partial").exists()
    (other / "stale").parent.mkdir(parents=True)  # an entry of an older format: removed and rebuilt
    (other / "stale").write_text("")
    cached_folder(other, build, ready)
    assert sorted(p.name for p in other.iterdir()) == ["x"]
