"""Every method, step by step, against a slow float64 whole-model implementation (helpers.ref_*)."""
from __future__ import annotations

import math

import pytest
import torch

import helpers
from cmerge import Merger, merge
from cmerge.layers import LINEAR, OTHER, PASSTHROUGH


@pytest.fixture(scope="module")
def models():
    base = helpers.tiny_base(seed=3, hidden=16)
    return base, helpers.experts(base, 4, seed=7)


def run_merger(base, exps, method, precision="float64", fishers=None, **params):
    """Merged state dict after every step, and the step entries."""
    m = Merger(base, method, precision=precision, **params)
    if method == "fisher_merge" and fishers is None:
        fishers = [helpers.fisher_like(e, i) for i, e in enumerate(exps)]
    merged, entries = [], []
    for i, e in enumerate(exps):
        extras = {"fisher": fishers[i]} if fishers is not None else None
        entries.append(m.add(e, name=f"e{i}", extras=extras))
        merged.append(m.state_dict())
    return m, merged, entries


def test_tiny_model_classification(models):
    base, _ = models
    kinds = Merger(base, "opcm").kinds
    for name, t in base.items():
        if not t.dtype.is_floating_point:
            assert kinds[name] == PASSTHROUGH
        elif name in helpers.TINY_PROJECTED:
            assert kinds[name] == LINEAR, name
        else:
            assert kinds[name] == OTHER, name


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("keep_diagonal", [False, True], ids=["zero_diag", "keep_diag"])
def test_opcm_matches_full_svd_reference(models, alpha, keep_diagonal):
    base, exps = models
    ref = helpers.ref_opcm(base, exps, helpers.TINY_PROJECTED, alpha=alpha, keep_diagonal=keep_diagonal)
    _, merged, entries = run_merger(base, exps, "opcm", alpha=alpha, keep_diagonal=keep_diagonal)
    for t, (got, want, entry) in enumerate(zip(merged, ref, entries), start=1):
        assert entry["norm"] == pytest.approx(helpers.global_norm(want["tau"]), rel=1e-12), f"‖τ_{t}‖"
        assert entry["lambda"] == pytest.approx(want["lambda"], rel=1e-10), f"λ_{t}"
        assert helpers.max_rel_err(got, want["merged"]) < 1e-10, f"step {t}"
        assert torch.equal(got["position_ids"], base["position_ids"])
    # α = 0 and α = 1 both protect nothing (k = 0); α = 0.5 protects some directions.
    ks = [k for k, _ in entries[-1]["protected_rank"].values()]
    assert set(entries[-1]["protected_rank"]) == set(helpers.TINY_PROJECTED)
    assert (max(ks) > 0) == (alpha == 0.5)


@pytest.mark.parametrize("params", [
    dict(drop_cross_blocks=True),
    dict(scaling="sqrt_t"),
    dict(norm_average="projected"),
    dict(alpha=0.3, keep_diagonal=True, drop_cross_blocks=True, scaling="sqrt_t"),
], ids=["drop_cross", "sqrt_t", "projected_norms", "all_variants"])
def test_opcm_variants_match_reference(models, params):
    base, exps = models
    ref = helpers.ref_opcm(base, exps, helpers.TINY_PROJECTED, **params)
    _, merged, entries = run_merger(base, exps, "opcm", **params)
    for got, want, entry in zip(merged, ref, entries):
        assert helpers.max_rel_err(got, want["merged"]) < 1e-10
        assert entry["lambda"] == pytest.approx(want["lambda"], rel=1e-10)


def test_opcm_float32_close_to_reference(models):
    base, exps = models
    want = helpers.ref_opcm(base, exps, helpers.TINY_PROJECTED)[-1]["merged"]
    _, merged, _ = run_merger(base, exps, "opcm", precision="float32")
    assert all(t.dtype == torch.float32 for n, t in merged[-1].items() if n != "position_ids")
    assert helpers.max_rel_err(merged[-1], want) < 1e-4


def test_opcm_first_step_is_the_first_model(models):
    base, exps = models
    _, merged, entries = run_merger(base, exps[:1], "opcm")
    assert entries[0]["lambda"] == pytest.approx(1.0, rel=1e-12)
    assert helpers.max_rel_err(merged[0], helpers.f64(exps[0])) < 1e-12


@pytest.mark.parametrize("lam", [0.3, 0.7])
def test_task_arithmetic_matches_reference(models, lam):
    base, exps = models
    ref = helpers.ref_task_arithmetic(base, exps, lam=lam)
    _, merged, _ = run_merger(base, exps, "task_arithmetic", lam=lam)
    for got, want in zip(merged, ref):
        assert helpers.max_rel_err(got, want) < 1e-12


def test_task_arithmetic_default_lambda_is_0_3(models):
    base, exps = models
    _, merged, _ = run_merger(base, exps, "task_arithmetic")
    assert helpers.max_rel_err(merged[-1], helpers.ref_task_arithmetic(base, exps, lam=0.3)[-1]) < 1e-12


def test_average_matches_reference(models):
    base, exps = models
    ref = helpers.ref_average(base, exps)
    _, merged, _ = run_merger(base, exps, "average")
    for got, want in zip(merged, ref):
        assert helpers.max_rel_err(got, want) < 1e-12


@pytest.mark.parametrize("variant", ["paper", "reference"])
@pytest.mark.parametrize("density", [0.2, 0.5])
def test_ties_matches_reference(models, variant, density):
    base, exps = models
    ref = helpers.ref_ties(base, exps, density=density, lam=0.3, variant=variant)
    _, merged, _ = run_merger(base, exps, "ties", density=density, variant=variant)
    for t, (got, want) in enumerate(zip(merged, ref), start=1):
        assert helpers.max_rel_err(got, want) < 1e-12, f"step {t}"


def test_ties_variants_differ_and_paper_is_the_default(models):
    base, exps = models
    _, paper, _ = run_merger(base, exps[:3], "ties")
    _, refv, _ = run_merger(base, exps[:3], "ties", variant="reference")
    want = helpers.ref_ties(base, exps[:3], variant="paper")[-1]
    assert helpers.max_rel_err(paper[-1], want) < 1e-12
    assert helpers.max_rel_err(refv[-1], want) > 1e-3


def test_ties_trims_per_tensor(models):
    """Per-tensor trimming: a tensor whose entries are all tiny still keeps its top 20 %."""
    base, exps = models
    small = {n: (base[n] + 1e-6 * (e - base[n]) if n == "layers.0.norm.weight" else e)
             if e.dtype.is_floating_point else e for n, e in exps[1].items()}
    seq = [exps[0], small]
    want = helpers.ref_ties(base, seq, density=0.2)[-1]
    _, merged, _ = run_merger(base, seq, "ties", density=0.2)
    assert helpers.max_rel_err(merged[-1], want) < 1e-12


@pytest.mark.parametrize("scale", [0.5, 1.0])
def test_magmax_matches_reference(models, scale):
    base, exps = models
    ref = helpers.ref_magmax(base, exps, scale=scale)
    _, merged, _ = run_merger(base, exps, "magmax", scale=scale)
    for got, want in zip(merged, ref):
        assert helpers.max_rel_err(got, want) < 1e-12


def test_magmax_ties_go_to_the_newer_model():
    base = {"w": torch.zeros(2, 3, dtype=torch.float64)}
    a = {"w": torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.0, -1.0]], dtype=torch.float64)}
    b = {"w": torch.tensor([[-1.0, 2.0, 1.0], [-0.5, 0.0, 4.0]], dtype=torch.float64)}
    got = merge(base, [a, b], "magmax", scale=1.0, precision="float64")["w"]
    assert torch.equal(got, torch.tensor([[-1.0, 2.0, 3.0], [-0.5, 0.0, 4.0]], dtype=torch.float64))


@pytest.mark.parametrize("params", [dict(), dict(alpha=0.7), dict(alpha_schedule="running")],
                         ids=["default", "alpha0.7", "running"])
def test_fisher_merge_matches_reference(models, params):
    base, exps = models
    fishers = [helpers.fisher_like(e, i) for i, e in enumerate(exps)]
    # some elements with zero Fisher in both models: ε keeps the merged value there (no 0/0)
    for f in fishers[:2]:
        f["head.weight"][0, :4] = 0.0
    ref = helpers.ref_fisher(base, exps, fishers, alpha=params.get("alpha", 0.4),
                             schedule=params.get("alpha_schedule", "constant"))
    _, merged, _ = run_merger(base, exps, "fisher_merge", fishers=fishers, **params)
    for t, (got, want) in enumerate(zip(merged, ref), start=1):
        assert all(bool(torch.isfinite(v).all()) for v in got.values())
        assert helpers.max_rel_err(got, want) < 1e-10, f"step {t}"
    assert torch.equal(merged[1]["head.weight"][0, :4], merged[0]["head.weight"][0, :4])


def test_fisher_merge_needs_fisher_values(models):
    from cmerge.errors import CmergeError

    base, exps = models
    with pytest.raises(CmergeError, match="fisher"):
        Merger(base, "fisher_merge").add(exps[0])


@pytest.mark.parametrize("method", ["opcm", "task_arithmetic", "average", "ties", "magmax"])
def test_merge_function_equals_merger(models, method):
    base, exps = models
    _, merged, _ = run_merger(base, exps[:3], method, precision="float32")
    again = merge(base, exps[:3], method)
    assert set(again) == set(base)
    for n in base:
        assert torch.equal(again[n], merged[-1][n]), n


def test_inputs_are_not_modified(models):
    base, exps = models
    before = [{n: t.clone() for n, t in e.items()} for e in [base] + exps]
    merge(base, exps, "opcm")
    for orig, now in zip(before, [base] + exps):
        assert all(torch.equal(orig[n], now[n]) for n in orig)


def test_modules_and_state_dicts_give_the_same_result():
    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3)) for _ in range(3)]
    sds = [{k: v.detach().clone() for k, v in n.state_dict().items()} for n in nets]
    a = merge(nets[0], nets[1:], "opcm")
    b = merge(sds[0], sds[1:], "opcm")
    assert all(torch.equal(a[n], b[n]) for n in a)
    want = helpers.ref_opcm(sds[0], sds[1:], ("0.weight", "2.weight"))[-1]["merged"]
    assert helpers.max_rel_err(a, want) < 1e-4
    assert not math.isnan(float(a["0.weight"].sum()))


# ---------------------------------------------------------------- TIES: how many entries a trim keeps

@pytest.mark.parametrize("density,n,paper,reference", [
    (0.2, 10, 2, 3), (0.2, 100, 20, 21), (0.2, 5, 1, 2),   # density·n an integer: the two rules differ by one
    (0.07, 100, 7, 8),       # the float product is 7.000000000000001: the paper rule still keeps 7
    (0.29, 100, 29, 29),     # the reference truncates 28.999999999999996 to 28, then adds one
    (0.25, 7, 2, 2), (1.0, 9, 9, 9), (1e-9, 50, 1, 1),
])
def test_ties_trim_counts_at_the_boundaries(density, n, paper, reference):
    from cmerge.methods.ties import kept_count, trim_top_magnitude

    assert kept_count(density, n, "paper") == paper
    assert kept_count(density, n, "reference") == reference
    x = torch.randperm(n, generator=torch.Generator().manual_seed(n)).double() + 1  # distinct magnitudes
    for rule, want in (("paper", paper), ("reference", reference)):
        kept = trim_top_magnitude(x, density, rule)
        assert int(torch.count_nonzero(kept)) == want
        assert torch.equal(kept, helpers._trim(x, density, rule))
    ties_ = torch.tensor([5.0, 3.0, 3.0, 3.0, 1.0])  # the reference also keeps entries tied with the last kept
    assert int(torch.count_nonzero(trim_top_magnitude(ties_, 0.2, "reference"))) == 4
    assert int(torch.count_nonzero(trim_top_magnitude(ties_, 0.2, "paper"))) == 1


def test_ties_zero_sum_entries():
    """An entry whose two trimmed values cancel exactly: dropped (paper), or the majority sign (reference)."""
    from cmerge.methods.ties import ties

    a, b = torch.tensor([2.0, 1.0, -1.0]), torch.tensor([-2.0, 1.0, 0.5])
    assert torch.equal(ties([a, b], 1.0, "paper"), torch.tensor([0.0, 2.0, -1.0]))
    # total of the trimmed values is +1.5: the cancelled entry takes +, keeping a's +2
    assert torch.equal(ties([a, b], 1.0, "reference"), torch.tensor([2.0, 2.0, -1.0]))
