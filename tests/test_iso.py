"""Continual isotropic merging (docs/methods.md, "Continual isotropic merging"): the flattening against a
plain float64 LAPACK SVD, and the whole method against a float64 whole-model implementation written here."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from safetensors.torch import load_file

import helpers
from cmerge import Merger, init_state, merge, open_state
from cmerge.layers import PASSTHROUGH, is_projected
from cmerge.errors import CmergeError
from cmerge.methods.iso import isotropic, truncated

F64 = torch.float64


def ref_isotropic(x: torch.Tensor, scale: float, power: float = 0.0) -> torch.Tensor:
    """α · mean(s) · U Vᵀ over the singular values above 1e-10 · s_1 (full LAPACK SVD); with ``power`` p,
    α · Σ_i mean(s) · s_iᵖ / mean(sᵖ) · u_i v_iᵀ, one pair at a time."""
    u, s, vh = torch.linalg.svd(x, full_matrices=True)
    if not float(s.max()) > 0:
        return torch.zeros_like(x)
    r = int((s > 1e-10 * s[0]).sum())
    mean_power = sum(float(s[i]) ** power for i in range(r)) / r
    out = torch.zeros_like(x)
    for i in range(r):
        out += scale * float(s[:r].mean()) * float(s[i]) ** power / mean_power * torch.outer(u[:, i], vh[i])
    return out


@pytest.mark.parametrize("shape", [(12, 30), (30, 12), (16, 16)])
@pytest.mark.parametrize("rank", [None, 3])
def test_flattening_matches_lapack_and_is_flat(shape, rank):
    g = torch.Generator().manual_seed(sum(shape) + (rank or 0))
    m, n = shape
    x = (torch.randn(m, rank, generator=g, dtype=F64) @ torch.randn(rank, n, generator=g, dtype=F64) if rank
         else torch.randn(m, n, generator=g, dtype=F64) * torch.logspace(0, -3, n, dtype=F64))
    got = isotropic(x, 1.7)
    want = ref_isotropic(x, 1.7)
    assert float((got - want).norm() / want.norm()) < 1e-10
    s = torch.linalg.svdvals(got)
    r = rank or min(shape)
    s_x = torch.linalg.svdvals(x)[:r]
    assert torch.allclose(s[:r], torch.full((r,), 1.7 * float(s_x.mean()), dtype=F64), rtol=1e-10)
    assert float(s[r:].abs().sum()) < 1e-10 * float(s[0])   # the null space stays null
    # the flattened update keeps the matrix's singular subspaces: U Uᵀ got V Vᵀ = got
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    pu, pv = u[:, :r] @ u[:, :r].T, vh[:r].T @ vh[:r]
    assert float((pu @ got @ pv - got).norm()) < 1e-10 * float(got.norm())


@pytest.mark.parametrize("power", [-0.2, 0.5])
@pytest.mark.parametrize("rank", [None, 3])
def test_reshaped_spectrum_matches_lapack_keeps_the_mean_and_the_order(power, rank):
    g = torch.Generator().manual_seed(7 + (rank or 0))
    x = (torch.randn(12, rank, generator=g, dtype=F64) @ torch.randn(rank, 20, generator=g, dtype=F64) if rank
         else torch.randn(12, 20, generator=g, dtype=F64) * torch.logspace(0, -3, 20, dtype=F64))
    got = isotropic(x, 1.3, power)
    assert float((got - ref_isotropic(x, 1.3, power)).norm() / got.norm()) < 1e-10
    r = rank or 12
    s, s_x = torch.linalg.svdvals(got)[:r], torch.linalg.svdvals(x)[:r]
    assert math.isclose(float(s.mean()), 1.3 * float(s_x.mean()), rel_tol=1e-10)   # the flat rule's mean
    ratio = torch.sort(s, descending=True).values / torch.sort(s_x ** power, descending=True).values
    assert torch.allclose(ratio, ratio[0].expand(r), rtol=1e-9)   # s^p up to one factor
    assert float(torch.linalg.svdvals(got)[r:].abs().sum()) < 1e-10 * float(s.max())   # the null space stays null
    assert float((isotropic(x, 1.3, 0.0) - isotropic(x, 1.3)).abs().max()) == 0.0


@pytest.mark.parametrize("fraction", [0.1, 0.5, 1.0])
def test_truncation_keeps_the_top_singular_pairs(fraction):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(14, 20, generator=g, dtype=F64) * torch.logspace(0, -2, 20, dtype=F64)
    got = truncated(x, fraction)
    assert float((got - ref_truncated(x, fraction)).norm()) < 1e-10 * float(x.norm())
    k = math.ceil(fraction * 14)
    s, s_x = torch.linalg.svdvals(got), torch.linalg.svdvals(x)
    assert torch.allclose(s[:k], s_x[:k], rtol=1e-10) and float(s[k:].abs().sum()) < 1e-10 * float(s_x[0])


def test_power_changes_the_merge_and_out_of_range_is_refused(models):
    base, exps = models
    flat = merge(base, exps, "iso", accumulate="opcm", precision="float64")
    shaped = merge(base, exps, "iso", accumulate="opcm", power=-0.2, precision="float64")
    assert helpers.max_rel_err(shaped, flat) > 1e-3
    with pytest.raises(CmergeError, match="power"):
        Merger(base, "iso", power=-1.5)


def test_keep_changes_the_merge_and_zero_is_refused(models):
    base, exps = models
    full = merge(base, exps, "iso", accumulate="opcm", precision="float64")
    kept = merge(base, exps, "iso", accumulate="opcm", keep=0.3, precision="float64")
    assert helpers.max_rel_err(kept, full) > 1e-3
    with pytest.raises(CmergeError, match="keep"):
        Merger(base, "iso", keep=0.0)


def test_flattening_a_zero_matrix_is_zero():
    assert torch.equal(isotropic(torch.zeros(4, 6, dtype=F64), 2.0), torch.zeros(4, 6, dtype=F64))


@pytest.fixture(scope="module")
def models():
    base = helpers.tiny_base(seed=21, hidden=8)
    return base, helpers.experts(base, 4, seed=23)


def ref_truncated(x: torch.Tensor, fraction: float) -> torch.Tensor:
    """x on its top ⌈fraction · r⌉ singular pairs, r those above 1e-10 · s_1 (full LAPACK SVD)."""
    u, s, vh = torch.linalg.svd(x, full_matrices=True)
    k = math.ceil(fraction * int((s > 1e-10 * s[0]).sum()))
    return u[:, :k] @ torch.diag(s[:k]) @ vh[:k]


def ref_iso_model(base, exps, scale=1.8, accumulate="sum", protect=0.5, others="average", keep=1.0, power=0.0):
    """Whole models in float64: S_t the sum (or OPCM's projected sum) of the task vectors (each truncated to
    its top ⌈keep · r⌉ singular pairs); linear weights α · s̄ · U Vᵀ of S_t (its spectrum reshaped to sᵖ with
    ``power``), every other tensor the running mean of the task vectors (or θ0)."""
    b = helpers.f64(base)
    acc, mean, out = {}, {}, []
    for t, e in enumerate(exps, start=1):
        tau = helpers.sub(helpers.f64(e), b)
        merged = {}
        for n in b:
            if n in helpers.TINY_PROJECTED:
                x = ref_truncated(tau[n], keep) if keep < 1 else tau[n]
                if t == 1:
                    acc[n] = x
                elif accumulate == "sum":
                    acc[n] = acc[n] + x
                else:
                    acc[n] = acc[n] + helpers.ref_project(acc[n], x, protect, rank_rule=True)[0]
                merged[n] = b[n] + ref_isotropic(acc[n], scale, power)
            else:
                mean[n] = tau[n] if t == 1 else mean[n] + (tau[n] - mean[n]) / t
                merged[n] = b[n] + (mean[n] if others == "average" else 0 * mean[n])
        out.append(merged)
    return out


@pytest.mark.parametrize("params", [{}, dict(accumulate="opcm", protect=0.3, scale=2.2), dict(others="base", scale=0.7),
                                    dict(accumulate="opcm", keep=0.3, scale=2.6), dict(keep=0.5),
                                    dict(accumulate="opcm", power=-0.2, scale=3.0)],
                         ids=["sum", "opcm", "base", "opcm-keep", "sum-keep", "opcm-power"])
def test_merger_matches_whole_model_reference(models, params):
    base, exps = models
    merger = Merger(base, "iso", precision="float64", **params)
    want = ref_iso_model(base, exps, **params)
    for t, (e, w) in enumerate(zip(exps, want), start=1):
        merger.add(e)
        assert helpers.max_rel_err(merger.state_dict(), w) < 1e-10, f"step {t}"


def low_rank_experts(base, n: int, rank: int, seed: int) -> list[dict]:
    """Experts in float64 whose linear weights move by an exactly rank-``rank`` delta (a merged LoRA adapter)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        e = {k: v.double() if v.is_floating_point() else v for k, v in base.items()}
        for name in helpers.TINY_PROJECTED:
            m, k = base[name].shape
            e[name] = e[name] + 0.05 * torch.randn(m, rank, generator=g, dtype=F64) @ torch.randn(rank, k, generator=g,
                                                                                                dtype=F64)
        out.append(e)
    return out


@pytest.mark.parametrize("params", [dict(accumulate="opcm", keep=0.3, scale=2.6), dict(keep=0.5),
                                    dict(accumulate="opcm", low_rank=2), dict(low_rank=2),
                                    dict(accumulate="opcm", low_rank=2, power=-0.2, scale=3.0)],
                         ids=["opcm-keep", "sum-keep", "opcm-low-rank", "sum-low-rank", "opcm-low-rank-power"])
def test_float32_state_on_rank_deficient_updates_matches_the_float64_reference(models, params):
    """In the default float32 state, a rank-deficient S (truncated task vectors, low-rank experts) is
    flattened over its genuine directions only: its float32 rounding is neither lifted to s̄ by the
    flattening nor counted as directions by the projection (both were, before `linalg.rank_rtol`)."""
    params = dict(params)
    base, exps = models
    rank = params.pop("low_rank", None)
    if rank:  # the reference sees the exact deltas, the merge their float32 copies
        exps = low_rank_experts(base, 4, rank, seed=31)
    merger = Merger(base, "iso", **params)
    want = ref_iso_model(base, exps, **params)
    for t, (e, w) in enumerate(zip(exps, want), start=1):
        merger.add({k: v.float() if v.is_floating_point() else v for k, v in e.items()})
        got = merger.state_dict()
        assert helpers.max_rel_err(got, w) < 1e-4, f"step {t}"
        if rank:  # the merged update stays in the experts' span: rank ≤ t · rank
            for name in helpers.TINY_PROJECTED:
                delta = got[name].double() - base[name].double()
                assert int(torch.linalg.matrix_rank(delta, rtol=1e-4)) <= t * rank


def test_the_sum_is_order_independent_and_the_projected_sum_is_not(models):
    base, exps = models
    finals = {order: merge(base, [exps[i] for i in order], "iso", precision="float64")
              for order in itertools.islice(itertools.permutations(range(len(exps))), 0, 24, 7)}
    first = next(iter(finals.values()))
    assert all(helpers.max_rel_err(f, first) < 1e-12 for f in finals.values())
    a = merge(base, exps, "iso", accumulate="opcm", precision="float64")
    b = merge(base, exps[::-1], "iso", accumulate="opcm", precision="float64")
    assert helpers.max_rel_err(a, b) > 1e-6


def test_memory_is_two_tensors_per_linear_weight_and_one_per_other_tensor(models):
    base, exps = models
    merger = Merger(base, "iso", accumulate="opcm")
    linear = {n for n, kind in merger.kinds.items() if is_projected(kind)}
    others = {n for n, kind in merger.kinds.items() if kind != PASSTHROUGH} - linear
    assert linear and others
    shapes = []
    for e in exps + exps[:2]:
        merger.add(e)
        acc = merger.accumulators
        assert set(acc) == {"S", "M"}
        assert set(acc["S"]) == linear and set(acc["M"]) == linear | others
        shapes.append({a: {n: tuple(x.shape) for n, x in acc[a].items()} for a in acc})
    assert all(s == shapes[0] for s in shapes)


def test_on_disk_state_stores_s_only_for_linear_weights(models, tmp_path):
    """The state's accumulator file holds S for the linear weights only, and the state's merge, resumed from
    disk after the first step, exports the whole-model reference's."""
    base, exps = models
    base_dir = helpers.save_model(base, tmp_path / "base")
    paths = [helpers.save_model(e, tmp_path / f"e{i}") for i, e in enumerate(exps)]
    params = dict(accumulate="opcm", protect=0.3, scale=2.2)
    want = ref_iso_model(base, exps, **params)[-1]
    st = init_state(tmp_path / "state", base_dir, "iso", precision="float64", **params)
    st.add(paths[0])
    st = open_state(tmp_path / "state")  # the later steps read the first step's accumulators from disk
    for p in paths[1:]:
        st.add(p)
    merger = Merger(base, "iso")
    linear = {n for n, kind in merger.kinds.items() if is_projected(kind)}
    files = list((tmp_path / "state").glob("gen-*/accumulators.safetensors"))
    assert files
    for f in files:
        stored = load_file(str(f))
        assert {k.split("/", 1)[1] for k in stored if k.startswith("S/")} == linear
        assert {k.split("/", 1)[1] for k in stored if k.startswith("M/")} > linear
    st.export(tmp_path / "out")
    assert helpers.max_rel_err(helpers.load_safetensors_dir(tmp_path / "out"), want) < 1e-6
