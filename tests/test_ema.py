"""ema (plain interpolation) against a slow float64 reference, and its relation to average and fisher_merge."""
from __future__ import annotations

import pytest
import torch

import helpers
from cmerge import CmergeError, Merger, merge


@pytest.fixture(scope="module")
def models():
    base = helpers.tiny_base(seed=4, hidden=16)
    return base, helpers.experts(base, 4, seed=9)


def ref_ema(base, models, alpha=0.4, schedule="constant") -> list[dict]:
    """θ̄_1 = θ_1, θ̄_t = (1 − α_t) θ̄_{t−1} + α_t θ_t on whole models in float64 (α_t = 1/t when running)."""
    b = helpers.f64(base)
    out, merged = [], None
    for t, m in enumerate(models, start=1):
        theta = helpers.f64(m)
        if t == 1:
            merged = theta
        else:
            a = 1.0 / t if schedule == "running" else alpha
            merged = {n: (1 - a) * merged[n] + a * theta[n] for n in b}
        out.append(dict(merged))
    return out


def steps(base, exps, method, precision="float64", extras=None, **params) -> list[dict]:
    m = Merger(base, method, precision=precision, **params)
    out = []
    for i, e in enumerate(exps):
        m.add(e, extras=extras[i] if extras else None)
        out.append(m.state_dict())
    return out


@pytest.mark.parametrize("params", [dict(), dict(alpha=0.7), dict(alpha=1.0), dict(alpha_schedule="running")],
                         ids=["default", "alpha0.7", "alpha1", "running"])
def test_ema_matches_reference(models, params):
    base, exps = models
    ref = ref_ema(base, exps, alpha=params.get("alpha", 0.4), schedule=params.get("alpha_schedule", "constant"))
    got = steps(base, exps, "ema", **params)
    for t, (g, w) in enumerate(zip(got, ref), start=1):
        assert helpers.max_rel_err(g, w) < 1e-12, f"step {t}"
        assert torch.equal(g["position_ids"], base["position_ids"])
    if params.get("alpha") == 1.0:  # α = 1 keeps only the newest expert
        assert helpers.max_rel_err(got[-1], helpers.f64(exps[-1])) < 1e-12


def test_ema_float32_close_to_reference(models):
    base, exps = models
    got = merge(base, exps, "ema", alpha=0.3)
    assert all(v.dtype == base[n].dtype for n, v in got.items())
    assert helpers.max_rel_err(got, ref_ema(base, exps, alpha=0.3)[-1]) < 1e-5


def test_running_ema_is_average(models):
    base, exps = models
    ema = steps(base, exps, "ema", alpha_schedule="running")
    avg = steps(base, exps, "average")
    for t, (e, a) in enumerate(zip(ema, avg), start=1):
        assert set(e) == set(a)
        assert helpers.max_rel_err(e, helpers.f64(a)) < 1e-13, f"step {t}"


@pytest.mark.parametrize("params", [dict(), dict(alpha=0.25), dict(alpha_schedule="running")],
                         ids=["default", "alpha0.25", "running"])
def test_ema_is_fisher_merge_with_equal_fisher_values(models, params):
    base, exps = models
    ones = [{"fisher": {n: torch.ones_like(v) for n, v in e.items() if v.dtype.is_floating_point}} for e in exps]
    ema = steps(base, exps, "ema", **params)
    fisher = steps(base, exps, "fisher_merge", extras=ones, **params)
    for t, (e, f) in enumerate(zip(ema, fisher), start=1):
        assert helpers.max_rel_err(e, helpers.f64(f)) < 1e-11, f"step {t}"  # ω = α / (1 + ε) there


@pytest.mark.parametrize("params, fragment", [
    (dict(alpha=0.0), "alpha"), (dict(alpha=1.5), "alpha"), (dict(alpha=-0.2), "alpha"),
    (dict(alpha_schedule="cosine"), "alpha_schedule"), (dict(lam=0.3), "lam"),
])
def test_ema_parameters_validated(models, params, fragment):
    base, _ = models
    with pytest.raises(CmergeError, match=fragment):
        Merger(base, "ema", **params)


def test_ema_needs_no_extra_inputs(models):
    base, exps = models
    with pytest.raises(CmergeError, match="no --fisher"):
        Merger(base, "ema").add(exps[0], extras={"fisher": {}})
