"""DOP (docs/methods.md, "DOP"): both solvers against plain float64 implementations written here.

The references use only the loss as written, L_i(W) = ‖diag(s_i) U_iᵀ (W − τ_i)‖² +
‖(W − τ_i) V_i diag(s_i)‖² with a full LAPACK SVD, torch.autograd for gradients and
torch.optim.Adam for the published solver; the exact solver is checked against a dense
Kronecker-product solve of its normal equations.
"""
from __future__ import annotations

import itertools

import pytest
import torch

import helpers
from cmerge import Merger, merge
from cmerge.errors import CmergeError
from cmerge.methods.dop import mass_rank, schedule_weights, solve_adam, solve_exact

F64 = torch.float64


# ---------------------------------------------------------------- plain references

def ref_triplets(tau: torch.Tensor, eps: float):
    """Top singular triplets holding less than ε of the singular-value mass (a plain loop over c_j)."""
    u, s, vh = torch.linalg.svd(tau, full_matrices=False)
    total = float(s.sum())
    k, acc = 0, 0.0
    for j, val in enumerate(s.tolist()):
        acc += val
        share = 1.0 if j == len(s) - 1 else acc / total
        if eps >= 1.0 or share < eps:
            k += 1
    return u[:, :k], s[:k], vh.mT[:, :k]


def ref_loss(w: torch.Tensor, tau: torch.Tensor, eps: float, proj_space: str = "uv", triplets=None) -> torch.Tensor:
    u, s, v = triplets or ref_triplets(tau, eps)
    d = w - tau
    out = torch.zeros((), dtype=F64)
    if "u" in proj_space:
        out = out + torch.linalg.matrix_norm(torch.diag(s) @ u.T @ d) ** 2
    if "v" in proj_space:
        out = out + torch.linalg.matrix_norm(d @ v @ torch.diag(s)) ** 2
    return out


def ref_grad(w, t1, t2, c, eps, proj_space="uv"):
    w = w.detach().clone().requires_grad_(True)
    (c[0] * ref_loss(w, t1, eps, proj_space) + c[1] * ref_loss(w, t2, eps, proj_space)).backward()
    return w.grad


def ref_exact(t1, t2, c, eps, proj_space="uv"):
    """Dense solve of A W + W B = R (column-major vec: (I ⊗ A + Bᵀ ⊗ I) vec W), moving the start point
    (τ_1 + τ_2)/2 by the least-norm correction, so directions the loss does not see keep the start."""
    m, n = t1.shape
    a, b, r = torch.zeros(m, m, dtype=F64), torch.zeros(n, n, dtype=F64), torch.zeros(m, n, dtype=F64)
    for tau, ci in zip((t1, t2), c):
        u, s, v = ref_triplets(tau, eps)
        ai = u @ torch.diag(s ** 2) @ u.T if "u" in proj_space else torch.zeros(m, m, dtype=F64)
        bi = v @ torch.diag(s ** 2) @ v.T if "v" in proj_space else torch.zeros(n, n, dtype=F64)
        a, b, r = a + ci * ai, b + ci * bi, r + ci * (ai @ tau + tau @ bi)
    h = torch.kron(torch.eye(n, dtype=F64), a) + torch.kron(b.T.contiguous(), torch.eye(m, dtype=F64))
    x0 = ((t1 + t2) / 2).T.reshape(-1)
    x = x0 + torch.linalg.pinv(h, rtol=1e-11, hermitian=True) @ (r.T.reshape(-1) - h @ x0)
    return x.reshape(n, m).T


def ref_min_norm(v11, v12, v22):
    if v12 >= v11:
        return 0.999
    if v12 >= v22:
        return 0.001
    return -1.0 * ((v12 - v22) / (v11 + v22 - 2 * v12))


def ref_adam(t1, t2, *, eps=0.99999, steps=200, lr=1e-4, alpha=0.8, beta=0.999, mgda=True, ema=True):
    """The published solver with autograd and torch.optim.Adam: MGDA on loss-normalised gradients, EMA first."""
    w = ((t1 + t2) / 2).clone().requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr)
    trips = [ref_triplets(t1, eps), ref_triplets(t2, eps)]
    c = [alpha, 1 - alpha]
    for _ in range(steps):
        if mgda:
            grads = []
            for tau, tr in zip((t1, t2), trips):
                opt.zero_grad()
                loss = ref_loss(w, tau, eps, triplets=tr)
                loss.backward()
                grads.append(w.grad.detach().clone() / float(loss.detach()))
            gamma = ref_min_norm(float((grads[0] * grads[0]).sum()), float((grads[0] * grads[1]).sum()),
                                 float((grads[1] * grads[1]).sum()))
            c = [beta * c[0] + (1 - beta) * gamma, beta * c[1] + (1 - beta) * (1 - gamma)] if ema else [gamma, 1 - gamma]
        opt.zero_grad()
        (c[0] * ref_loss(w, t1, eps, triplets=trips[0]) + c[1] * ref_loss(w, t2, eps, triplets=trips[1])).backward()
        opt.step()
    return w.detach(), c


def pair(seed: int, m: int, n: int, rank: int | None = None):
    g = torch.Generator().manual_seed(seed)
    if rank is None:
        return [torch.randn(m, n, generator=g, dtype=F64) * sc for sc in (1.0, 0.6)]
    return [torch.randn(m, rank, generator=g, dtype=F64) @ torch.randn(rank, n, generator=g, dtype=F64) for _ in "ab"]


# ---------------------------------------------------------------- the pieces

def test_mass_rank_is_the_reference_searchsorted():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        s = torch.rand(12, generator=g, dtype=F64).sort(descending=True).values ** 3
        for eps in (0.3, 0.9, 0.99999):
            want = int(torch.searchsorted(torch.cumsum(s, 0) / s.sum(), torch.tensor(eps, dtype=F64)))
            assert mass_rank(s, eps) == want
    assert mass_rank(torch.ones(5), 1.0) == 5  # ε = 1 keeps every pair
    assert mass_rank(torch.zeros(5), 0.9) == 0
    assert mass_rank(torch.tensor([3.0, 1.0]), 0.75) == 0  # the pair whose share reaches ε is not kept


CASES = list(itertools.product([(6, 9), (9, 6), (7, 7), (4, 20), (20, 4)], [None, 2]))


@pytest.mark.parametrize("proj_space", ["uv", "u", "v"])
@pytest.mark.parametrize("shape,rank", CASES, ids=[f"{m}x{n}{'-rank' + str(r) if r else ''}" for (m, n), r in CASES])
def test_exact_solver_zero_gradient_and_dense_reference(shape, rank, proj_space):
    t1, t2 = pair(sum(shape) + (rank or 0), *shape, rank)
    for c, eps in (((0.8, 0.2), 0.99999), ((0.3, 0.7), 0.9), ((1.0, 0.0), 0.99999)):
        w = solve_exact(t1, t2, c, eps=eps, proj_space=proj_space)
        scale = float(ref_grad((t1 + t2) / 2, t1, t2, c, eps, proj_space).norm())
        assert float(ref_grad(w, t1, t2, c, eps, proj_space).norm()) <= 1e-10 * scale, (c, eps)
        want = ref_exact(t1, t2, c, eps, proj_space)
        assert float((w - want).norm()) <= 1e-9 * float(want.norm()), (c, eps)


def test_exact_solver_keeps_the_start_point_where_the_loss_is_blind():
    t1, t2 = pair(3, 8, 10, rank=2)
    w = solve_exact(t1, t2, (0.5, 0.5), eps=0.99999)
    u = torch.linalg.svd(torch.cat([t1, t2], 1))[0][:, 4:]    # left null space of both
    v = torch.linalg.svd(torch.cat([t1, t2], 0))[2][4:].T     # right null space of both
    x0 = (t1 + t2) / 2
    assert float((u.T @ (w - x0) @ v).abs().max()) < 1e-12
    assert float((u.T @ x0 @ v).abs().max()) < 1e-12  # here the start has no such component either
    # a start point with a blind component: add one to both targets' average through a third direction
    extra = u[:, :1] @ v[:, :1].T
    w2 = solve_exact(t1 + extra, t2 + extra, (0.5, 0.5), eps=0.99999)
    assert torch.allclose(u[:, :1].T @ w2 @ v[:, :1], torch.ones(1, 1, dtype=F64), atol=1e-10)


def test_adam_solver_is_the_published_algorithm():
    """MGDA on loss-normalised gradients, EMA before use, Adam: equal to autograd + torch.optim.Adam."""
    t1, t2 = pair(1, 7, 5)
    for kw in (dict(), dict(ema=False), dict(mgda=False, alpha=0.6), dict(lr=0.05)):
        kw = {"steps": 20, **kw}
        want, want_c = ref_adam(t1, t2, eps=0.99999, **kw)
        got, got_c, ks = solve_adam(t1, t2, **kw)
        assert float((got - want).norm()) <= 1e-12 * float(want.norm()), kw
        assert got_c[0] == pytest.approx(want_c[0], abs=1e-12)
        assert ks == (4, 4)  # the smallest pair holds more than 1 − ε of the mass


def test_adam_loss_decreases_and_approaches_the_exact_minimum():
    t1, t2 = pair(2, 6, 5)
    c = (0.7, 0.3)

    def total(w):
        return float(c[0] * ref_loss(w, t1, 0.99999) + c[1] * ref_loss(w, t2, 0.99999))

    best = total(solve_exact(t1, t2, c))
    start = total((t1 + t2) / 2)
    gaps = []
    for steps in (10, 100, 1500):
        w, _, _ = solve_adam(t1, t2, steps=steps, lr=0.02, mgda=False, alpha=c[0])
        gaps.append(total(w) - best)
    assert start - best > gaps[0] > gaps[1] > gaps[2] >= -1e-12
    assert gaps[2] < 1e-6 * (start - best)


def test_schedule_weights_are_the_ema_with_w_held_at_the_start():
    t1, t2 = pair(4, 6, 8)
    hist = []
    solve_adam(t1, t2, steps=200, lr=0.0, history=hist)  # lr 0: W stays at the start point
    c1, c2 = schedule_weights(t1, t2, steps=200)
    assert c1 == pytest.approx(hist[-1][1], rel=1e-12) and c1 + c2 == pytest.approx(1.0)
    assert 0.8 * 0.999 ** 200 <= c1 <= 0.8 * 0.999 ** 200 + 1 - 0.999 ** 200
    assert schedule_weights(t1, t2, mgda=False, alpha=0.6) == (0.6, pytest.approx(0.4))


def test_zero_task_vector_gives_no_nan():
    t1, t2 = pair(5, 5, 6)
    zero = torch.zeros_like(t1)
    for a, b in ((t1, zero), (zero, t2), (zero, zero)):
        w, c, _ = solve_adam(a, b, steps=5)
        assert bool(torch.isfinite(w).all()) and all(map(lambda x: x == x, c))
        assert bool(torch.isfinite(solve_exact(a, b, schedule_weights(a, b))).all())
    assert torch.equal(solve_exact(zero, zero, (0.8, 0.2)), zero)


# ---------------------------------------------------------------- through the Merger

@pytest.fixture(scope="module")
def models():
    base = helpers.tiny_base(seed=5, hidden=8)
    return base, helpers.experts(base, 3, seed=9)


def ref_dop_model(base, exps, solver="adam", others="pairwise", **kw):
    """Whole models in float64: M_1 = τ_1; linear weights by the solver, every other tensor averaged."""
    b = helpers.f64(base)
    m = {n: exps[0][n].double() - b[n] for n in b}
    out = []
    for t, e in enumerate(exps[1:], start=2):
        tau = {n: e[n].double() - b[n] for n in b}
        new = {}
        for n in b:
            if n not in helpers.TINY_PROJECTED:
                new[n] = (m[n] + tau[n]) / 2 if others == "pairwise" else m[n] + (tau[n] - m[n]) / t
            elif solver == "adam":
                new[n] = ref_adam(m[n], tau[n], **kw)[0]
            else:
                c = kw.get("weights") or schedule_weights(m[n], tau[n])
                if c == "count":  # the merged model weighs as the t − 1 experts it holds
                    c = ((t - 1) / t, 1 / t)
                new[n] = ref_exact(m[n], tau[n], c, 0.99999)
        m = new
        out.append({n: b[n] + m[n] for n in b})
    return out


@pytest.mark.parametrize("params", [dict(steps=12), dict(solver="exact"), dict(solver="exact", weights="0.6,0.4"),
                                    dict(solver="exact", others="running"),
                                    dict(solver="exact", weights="count", others="running")],
                         ids=["adam", "exact", "exact_weights", "exact_running", "exact_count"])
def test_merger_matches_whole_model_reference(models, params):
    base, exps = models
    merger = Merger(base, "dop", precision="float64", **params)
    got, entries = [], []
    for e in exps:
        entries.append(merger.add(e))
        got.append(merger.state_dict())
    assert helpers.max_rel_err(got[0], helpers.f64(exps[0])) < 1e-14  # the first expert as is
    kw = dict(params)
    solver, others = kw.pop("solver", "adam"), kw.pop("others", "pairwise")
    if kw.get("weights", "count") != "count":
        kw["weights"] = tuple(float(v) for v in kw["weights"].split(","))
    want = ref_dop_model(base, exps, solver, others, **kw)
    for t, (g, w) in enumerate(zip(got[1:], want), start=2):
        assert helpers.max_rel_err(g, w) < 1e-10, f"step {t}"
        assert torch.equal(g["position_ids"], base["position_ids"])
    notes = entries[-1]["protected_rank"]  # per linear weight: k_1, k_2, c_1, c_2
    assert set(notes) == set(helpers.TINY_PROJECTED)
    assert all(sum(note[2:]) == pytest.approx(1.0, abs=1e-5) for note in notes.values())


def test_memory_is_one_tensor_per_tensor(models):
    base, exps = models
    merger = Merger(base, "dop", solver="exact")
    shapes = []
    for e in exps + exps[:2]:
        merger.add(e)
        acc = merger.accumulators
        assert set(acc) == {"M"}
        shapes.append({n: tuple(t.shape) for n, t in acc["M"].items()})
    assert all(s == shapes[0] for s in shapes)
    assert shapes[0] == {n: tuple(t.shape) for n, t in base.items() if t.dtype.is_floating_point}


def test_merge_function_float32_close_to_float64(models):
    base, exps = models
    a = merge(base, exps, "dop", solver="exact")
    b = merge(base, exps, "dop", solver="exact", precision="float64")
    assert helpers.max_rel_err(a, b) < 1e-5


def test_bad_parameters_are_refused():
    with pytest.raises(CmergeError, match="weights"):
        Merger(helpers.tiny_base(), "dop", weights="0.5")  # weights is for the exact solver
    for bad in ("x", "1.5", "-1,2", "0,0", "1,2,3"):
        with pytest.raises(CmergeError, match="weights"):
            Merger(helpers.tiny_base(), "dop", solver="exact", weights=bad)
    with pytest.raises(CmergeError, match="solver"):
        Merger(helpers.tiny_base(), "dop", solver="sgd")
