"""Merger.override / Method.unmerge: replacing merged tensors (post-merge corrections) and continuing from them."""
from __future__ import annotations

import math

import pytest
import torch

import helpers
from cmerge import REGISTRY, CmergeError, Merger
from cmerge.methods.base import Method

#: LoRA-factor methods have their own tests; iso's merged linear weights are a function of S_t that has no
#: inverse (a flat spectrum), so it refuses a correction (test below)
METHODS = [m for m, cls in REGISTRY.items() if cls.space == "weights" and m != "iso"]
#: one linear-layer weight (projected by OPCM) and one identity-rule tensor
TARGETS = ("layers.0.mlp.up.weight", "layers.1.norm.weight")


@pytest.fixture(scope="module")
def models():
    base = helpers.tiny_base(seed=5, hidden=16)
    exps = helpers.experts(base, 3, seed=11)
    fishers = [helpers.fisher_like(e, i) for i, e in enumerate(exps)]
    return base, exps, fishers


def extras_for(method, fishers, i):
    return {"fisher": fishers[i]} if "fisher" in REGISTRY[method].extra_inputs else None


def merger_after(models, method, n=2, precision="float64", **params) -> Merger:
    base, exps, fishers = models
    m = Merger(base, method, precision=precision, **params)
    for i in range(n):
        m.add(exps[i], extras=extras_for(method, fishers, i))
    return m


def corrections(merged, scale=0.05, seed=0) -> dict:
    """New values for TARGETS: the merged tensors moved by scale·N(0, 1), in float64."""
    g = torch.Generator().manual_seed(seed)
    return {n: merged[n].double() + scale * torch.randn(merged[n].shape, generator=g, dtype=torch.float64)
            for n in TARGETS}


def continue_reference(method, p, scalars, theta, base, incoming, fishers, norms) -> dict:
    """Step 3 of each method's rule in float64 (parameters ``p``, global numbers ``scalars`` after step 2),
    started from the (corrected) merged model ``theta``."""
    b, x = helpers.f64(base), helpers.f64(incoming)
    tau = helpers.sub(x, b)
    if method == "average":
        return {n: theta[n] + (x[n] - theta[n]) / 3 for n in b}
    if method == "task_arithmetic":
        return {n: theta[n] + p["lam"] * tau[n] for n in b}
    if method == "ema":
        return {n: theta[n] + p["alpha"] * (x[n] - theta[n]) for n in b}
    if method == "fisher_merge":
        a, f1, f2, f3 = p["alpha"], *[{n: f[n].double() for n in b} for f in fishers]
        f_bar = {n: (1 - a) * f1[n] + a * f2[n] for n in b}
        omega = {n: a * f3[n] / ((1 - a) * f_bar[n] + a * f3[n] + p["eps"]) for n in b}
        return {n: theta[n] + omega[n] * (x[n] - theta[n]) for n in b}
    if method == "ties":
        assert p["variant"] == "paper"
        return {n: b[n] + p["lam"] * helpers.ref_ties_pair(theta[n] - b[n], tau[n], p["density"]) for n in b}
    if method == "magmax":
        prev = {n: (theta[n] - b[n]) / p["scale"] for n in b}
        return {n: b[n] + p["scale"] * torch.where(tau[n].abs() >= prev[n].abs(), tau[n], prev[n]) for n in b}
    if method == "opcm":
        # S_2 = λ_2 (θ' − θ0) with the stored λ_2; project τ_3 against the corrected merged task vector
        lam2 = scalars["lambda"]
        d = {n: theta[n] - b[n] for n in b}
        proj = {n: helpers.ref_project(d[n], tau[n], p["alpha"])[0] if n in helpers.TINY_PROJECTED else tau[n]
                for n in b}
        s3 = {n: lam2 * d[n] + proj[n] for n in b}
        lam3 = helpers.global_norm(s3) / (sum(norms) / 3)
        return {n: b[n] + s3[n] / lam3 for n in b}
    if method == "dop":  # the adam solver's step from the corrected merged task vector; averages elsewhere
        from cmerge.methods.dop import solve_adam

        return {n: b[n] + (solve_adam(theta[n] - b[n], tau[n])[0] if n in helpers.TINY_PROJECTED
                           else (theta[n] - b[n] + tau[n]) / 2) for n in b}
    if method == "nufilt":  # the filter + adapter from the corrected merged update; other tensors stay
        from cmerge.methods.nufilt import adapter_init, nufilt_update

        def filtered(n):
            a0 = adapter_init(p["init_seed"], 3, n, p["lora_rank"], tau[n].shape[1], p["init_std"])
            return nufilt_update(theta[n] - b[n], tau[n], a0)[0]
        return {n: b[n] + filtered(n) if n in helpers.TINY_PROJECTED else theta[n] for n in b}
    raise AssertionError(f"no reference for {method}; add one")


@pytest.mark.parametrize("method", METHODS)
def test_override_round_trip_and_continue(models, method):
    base, exps, fishers = models
    m = merger_after(models, method)
    before = m.state_dict()
    accs_before = {a: dict(v) for a, v in m.accumulators.items()}
    lam_before = dict(m.scalars)
    new = corrections(before)
    m.override(new)
    after = m.state_dict()
    for n in base:
        if n in new:
            assert torch.allclose(after[n], new[n], rtol=1e-12, atol=1e-12), n
            assert not torch.allclose(after[n], before[n]), n
        else:
            assert torch.equal(after[n], before[n]), n
    assert m.overrides == [{"after_step": 2, "tensors": sorted(TARGETS)}]
    assert m.scalars == lam_before
    for a in m.method.accumulators:  # accumulators that do not hold the merged model are kept (fisher's F̄)
        if a != m.method.accumulators[0]:
            assert all(torch.equal(m.accumulators[a][n], accs_before[a][n]) for n in accs_before[a]), a

    # the next add continues from the corrected model: the method's rule from θ' = after
    entry = m.add(exps[2], extras=extras_for(method, fishers, 2))
    got = m.state_dict()
    assert all(bool(torch.isfinite(v).all()) for v in got.values() if v.dtype.is_floating_point)
    assert torch.equal(got["position_ids"], base["position_ids"])
    norms = [helpers.global_norm(helpers.sub(helpers.f64(e), helpers.f64(base))) for e in exps]
    want = continue_reference(method, m.method.p, lam_before, helpers.f64(after), base, exps[2], fishers, norms)
    assert helpers.max_rel_err(got, want) < 1e-10
    if method == "opcm":  # λ_3 = ‖S_3‖ / N̄_3 with S_3 = λ_3 (θ_merged − θ0), so ‖θ_merged − θ0‖ = N̄_3 again
        assert entry["mean_norm"] == pytest.approx(sum(norms) / 3, rel=1e-12)
        assert helpers.global_norm(helpers.sub(helpers.f64(got), helpers.f64(base))) == pytest.approx(
            sum(norms) / 3, rel=1e-10)
    # and it differs from the run without the override
    plain = merger_after(models, method, n=3).state_dict()
    assert helpers.max_rel_err({n: got[n] for n in TARGETS}, {n: plain[n] for n in TARGETS}) > 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_override_accepts_any_float_dtype(models, dtype):
    m = merger_after(models, "opcm", precision="float32")
    new = {n: v.to(dtype) for n, v in corrections(m.state_dict()).items()}
    m.override(new)
    got = m.state_dict()
    for n, v in new.items():
        assert got[n].dtype == torch.float32
        assert torch.allclose(got[n], v.float(), rtol=1e-5, atol=1e-6), n
    assert not new[TARGETS[0]].requires_grad


def test_override_is_recorded_each_time_and_empty_is_a_no_op(models):
    base, exps, _ = models
    m = merger_after(models, "average", n=1)
    m.override({})
    assert m.overrides == []
    m.override({"head.weight": m.state_dict()["head.weight"] * 0.5})
    m.add(exps[1])
    m.override({"layers.1.norm.weight": torch.ones(16), "conv.weight": torch.zeros(4, 2, 3, 3)})
    assert m.overrides == [{"after_step": 1, "tensors": ["head.weight"]},
                           {"after_step": 2, "tensors": ["conv.weight", "layers.1.norm.weight"]}]
    sd = m.state_dict()
    assert torch.equal(sd["layers.1.norm.weight"], torch.ones(16, dtype=torch.float64))
    assert torch.equal(sd["conv.weight"], torch.zeros(4, 2, 3, 3, dtype=torch.float64))


def test_override_does_not_alias_the_callers_tensors(models):
    _, exps, _ = models
    m = merger_after(models, "ema", n=2, precision="float32")
    x = m.state_dict()["head.weight"].clone()
    keep = x.clone()
    m.override({"head.weight": x})
    m.add(exps[2])
    assert torch.equal(x, keep)


# ---------------------------------------------------------------- refusals leave everything as it was

def _bad_cases(sd):
    good = sd["head.weight"] + 0.1
    nan, inf = good.clone(), good.clone()
    nan[0, 0], inf[1, 2] = float("nan"), float("inf")
    return {
        "unknown name": ({"head.weight.nope": good}, "no tensor"),
        "shape": ({"head.weight": good[:2]}, "shape"),
        "transposed shape": ({"head.weight": good.T.contiguous()}, "shape"),
        "nan": ({"head.weight": nan}, "NaN or Inf"),
        "inf": ({"head.weight": inf}, "NaN or Inf"),
        "overflows the compute dtype": ({"head.weight": good.double() * 1e300}, "NaN or Inf"),
        "passthrough": ({"position_ids": torch.arange(8, dtype=torch.float32)}, "not merged"),
        "passthrough, integer": ({"position_ids": torch.arange(8)}, "not merged"),
        "integer value": ({"head.weight": torch.zeros(3, 16, dtype=torch.int64)}, "floating-point"),
        "not a tensor": ({"head.weight": good.tolist()}, "floating-point"),
        "one good, one bad": ({"head.weight": good, "layers.0.norm.weight": torch.zeros(3)}, "shape"),
    }


@pytest.mark.parametrize("case", list(_bad_cases(helpers.tiny_base(seed=5, hidden=16))))
@pytest.mark.parametrize("method", ["opcm", "fisher_merge"])
def test_override_refusals_change_nothing(models, method, case):
    base, exps, fishers = models
    m = merger_after(models, method, precision="float32")
    before = m.state_dict()
    scalars = dict(m.scalars)
    tensors, fragment = _bad_cases(before)[case]
    with pytest.raises(CmergeError, match=fragment) as err:
        m.override(tensors)
    msg = str(err.value)
    assert msg.endswith(".") and "\n" not in msg
    after = m.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[n], before[n]) for n in before)
    assert m.overrides == [] and m.scalars == scalars
    # and the merge goes on exactly as if override had never been called
    m.add(exps[2], extras=extras_for(method, fishers, 2))
    plain = merger_after(models, method, n=3, precision="float32").state_dict()
    assert all(torch.equal(v, plain[n]) for n, v in m.state_dict().items())


def test_override_before_any_step_is_refused(models):
    base, exps, _ = models
    m = Merger(base, "average")
    with pytest.raises(CmergeError, match="nothing has been merged yet"):
        m.override({"head.weight": base["head.weight"]})
    assert m.overrides == [] and m.steps == [] and m.accumulators == {}
    m.add(exps[0])
    assert torch.equal(m.state_dict()["head.weight"], exps[0]["head.weight"])


def test_magmax_with_scale_zero_cannot_be_corrected(models):
    m = merger_after(models, "magmax", scale=0.0)
    before = m.state_dict()
    with pytest.raises(CmergeError, match="scale 0"):
        m.override({"head.weight": before["head.weight"] + 1})
    assert all(torch.equal(v, before[n]) for n, v in m.state_dict().items()) and m.overrides == []


def test_method_without_unmerge_refuses(models, monkeypatch):
    class Plain(Method):
        name = "plain"
        accumulators = ("M",)

    with pytest.raises(CmergeError, match="method 'plain' cannot take a corrected merged model"):
        Plain().unmerge(torch.zeros(2), torch.ones(2), {"M": torch.zeros(2)}, {})

    m = merger_after(models, "average")
    before = m.state_dict()
    monkeypatch.setattr(type(m.method), "unmerge", Method.unmerge)
    with pytest.raises(CmergeError, match="cannot take a corrected merged model"):
        m.override({"head.weight": before["head.weight"] + 1})
    assert all(torch.equal(v, before[n]) for n, v in m.state_dict().items()) and m.overrides == []


@pytest.mark.parametrize("method", METHODS)
def test_every_method_implements_unmerge(method):
    assert REGISTRY[method].unmerge is not Method.unmerge


@pytest.mark.parametrize("method", METHODS)
def test_unmerge_inverts_merged_for_random_accumulators(method):
    """merged(base, unmerge(base, X, acc, scalars), scalars) == X, with the other accumulators returned as given."""
    g = torch.Generator().manual_seed(3)
    meth = REGISTRY[method]()
    shape = (5, 4)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    acc = {a: torch.rand(shape, generator=g, dtype=torch.float64) for a in meth.accumulators}
    scalars = {"lambda": 1.7}
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    out = meth.unmerge(base, x, acc, scalars)
    assert set(out) == set(meth.accumulators)
    assert torch.allclose(meth.merged(base, out, scalars), x, rtol=1e-14, atol=1e-14)
    assert not math.isnan(float(out[meth.accumulators[0]].sum()))
    for a in meth.accumulators[1:]:
        assert out[a] is acc[a] or torch.equal(out[a], acc[a])


def test_a_method_without_an_inverse_refuses_a_correction_and_changes_nothing(models):
    m = merger_after(models, "iso")
    before = m.state_dict()
    accs = {a: {n: v.clone() for n, v in acc.items()} for a, acc in m.accumulators.items()}
    with pytest.raises(CmergeError, match="cannot take a corrected merged model"):
        m.override(corrections(before))
    assert all(torch.equal(v, before[n]) for n, v in m.state_dict().items())
    assert all(torch.equal(m.accumulators[a][n], v) for a in accs for n, v in accs[a].items())
    assert m.overrides == []
