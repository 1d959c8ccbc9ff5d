"""Nothing bad reaches the merge state (issue #18): values checked after the cast to the dtype they are
stored in, empty task vectors refused unless asked for, and the state still usable after a refusal."""
from __future__ import annotations

import json

import pytest
import torch

import helpers
from cmerge import CmergeError, Merger, init_state


def as_float64(sd):
    return {k: (v.double() if v.is_floating_point() else v) for k, v in sd.items()}


def test_a_value_beyond_float32_is_refused_and_the_merge_goes_on(tiny, cli, tmp_path):
    """The reported case: a float64 expert with 1e300 was accepted (‖τ‖ = inf), left NaN in the state,
    exported NaN, and broke the next add. Now: refused, nothing changed, the next add works."""
    state = tmp_path / "s"
    assert cli("init", state, "--base", tiny["paths"]["base"], "-q").exit_code == 0
    assert cli("add", state, tiny["paths"]["m0"], "-q").exit_code == 0
    huge = as_float64(tiny["experts"][1])
    huge["layers.0.mlp.up.weight"][0, 0] = 1e300
    bad = helpers.save_model(huge, tmp_path / "huge.safetensors")
    before = helpers.snapshot(state)
    res = cli("add", state, bad, "-q")
    helpers.assert_one_sentence_error(res, "layers.0.mlp.up.weight", "too large for float32")
    assert helpers.snapshot(state) == before
    assert cli("add", state, tiny["paths"]["m1"], "-q").exit_code == 0
    assert cli("export", state, tmp_path / "out", "-q").exit_code == 0
    out = helpers.load_safetensors_dir(tmp_path / "out")
    assert all(bool(torch.isfinite(t).all()) for t in out.values() if t.is_floating_point())


def test_a_float64_state_takes_what_float32_cannot(tiny, tmp_path):
    base = as_float64(tiny["base"])
    expert = as_float64(tiny["experts"][0])
    expert["head.weight"] = expert["head.weight"] * 1e50  # beyond float32, fine for float64
    m32 = Merger(base, "task_arithmetic")
    with pytest.raises(CmergeError, match="too large for float32"):
        m32.add(expert)
    m64 = Merger(base, "task_arithmetic", precision="float64")
    m64.add(expert)
    assert bool(torch.isfinite(m64.state_dict()["head.weight"]).all())
    with pytest.raises(CmergeError, match="float32 cannot hold"):  # the export dtype is checked too
        m64.state_dict(dtype=torch.float32)


def test_a_base_beyond_the_precision_is_refused_at_init(tiny, tmp_path):
    base = as_float64(tiny["base"])
    base["head.weight"][0, 0] = 1e300
    path = helpers.save_model(base, tmp_path / "base.safetensors")
    with pytest.raises(CmergeError, match="head.weight.*too large for float32"):
        init_state(tmp_path / "s", path, "opcm")
    assert not (tmp_path / "s").exists()
    init_state(tmp_path / "s64", path, "opcm", precision="float64")  # float64 holds it


@pytest.mark.parametrize("method", ["opcm", "average", "task_arithmetic"])
def test_the_base_as_an_expert_is_refused_unless_allowed(tiny, cli, tmp_path, method):
    state = tmp_path / method
    assert cli("init", state, "--base", tiny["paths"]["base"], "--method", method, "-q").exit_code == 0
    assert cli("add", state, tiny["paths"]["m0"], "-q").exit_code == 0
    lam = json.loads(cli("info", state, "--json").stdout)["steps"][-1]["lambda"]
    before = helpers.snapshot(state)
    res = cli("add", state, tiny["paths"]["base"], "-q")
    helpers.assert_one_sentence_error(res, "base.safetensors is identical to the base model", "--allow-empty")
    assert helpers.snapshot(state) == before
    res = cli("add", state, tiny["paths"]["base"], "--allow-empty", "-q")
    assert res.exit_code == 0, res.stderr
    steps = json.loads(cli("info", state, "--json").stdout)["steps"]
    assert len(steps) == 2 and steps[-1]["norm"] == 0.0
    if method == "opcm":  # what the user was warned about: λ moves from 1 to 2, the merge is halved
        assert lam == pytest.approx(1.0) and steps[-1]["lambda"] == pytest.approx(2.0)


def test_a_negligible_task_vector_is_empty_too(tiny):
    """A base re-saved with rounding noise far below 1e-6 of its norm is still "the base"."""
    near = {k: (v + 1e-9 * torch.sign(v) if v.is_floating_point() else v) for k, v in tiny["base"].items()}
    m = Merger(tiny["base"], "average")
    with pytest.raises(CmergeError, match="identical to the base model"):
        m.add(near)
    assert m.steps == []
    m.add(near, allow_empty=True)
    assert 0 < m.steps[-1]["norm"] < 1e-6 * m.base_norm


def test_export_says_what_it_wrote(tiny, cli, tmp_path):
    state = tmp_path / "s"
    cli("init", state, "--base", tiny["paths"]["base"], "-q")
    cli("add", state, tiny["paths"]["m0"], "-q")
    cli("add", state, tiny["paths"]["m1"], "-q")
    res = cli("export", state, tmp_path / "merged", "-q")
    assert res.stdout.strip() == f"exported the merge of 2 models to {tmp_path / 'merged'}"


def test_the_config_key_allow_empty(tiny, cli, tmp_path):
    cfg = tmp_path / "m.yml"
    cfg.write_text(f"method: average\nbase: {tiny['paths']['base']}\nmodels: [{tiny['paths']['m0']}, "
                   f"{tiny['paths']['base']}]\noutput: {tmp_path / 'out'}\n")
    helpers.assert_one_sentence_error(cli("merge", "--config", cfg, "-q"), "identical to the base model")
    cfg.write_text(cfg.read_text() + "allow_empty: true\n")
    assert cli("merge", "--config", cfg, "-q").exit_code == 0
