"""NUFILT (docs/methods.md, "NUFILT"): the filter, the adapter fit and the whole method against plain
float64 implementations written here (full LAPACK SVDs, torch.autograd, torch.optim.Adam)."""
from __future__ import annotations

import pytest
import torch

import helpers
from cmerge import Merger, merge
from cmerge.methods.nufilt import adapter_init, nufilt_update, top_right_vectors

F64 = torch.float64


def ref_right(x: torch.Tensor, r: int) -> torch.Tensor:
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    rank = int((s > max(x.shape) * torch.finfo(F64).eps * s[0]).sum()) if float(s[0]) > 0 else 0
    return vh.T[:, :min(r, rank)]


def ref_update(d, tau, a0, null_rank=128, grad_rank=8, steps=50, lr=1e-3):
    """Filter + adapter as written: M(A, B) = D + T P + T B A,
    L = ‖T V_g − M V_g‖² + ‖D V_p − M V_p‖², torch.optim.Adam on (A, B) from (a0, 0)."""
    vp, vg = ref_right(d, null_rank), ref_right(tau, grad_rank)
    proj = torch.eye(tau.shape[1], dtype=F64) - vp @ vp.T
    a = a0.clone().requires_grad_(True)
    b = torch.zeros(a0.shape[1], a0.shape[0], dtype=F64, requires_grad=True)
    opt = torch.optim.Adam([a, b], lr=lr)

    def loss_fn():
        m = d + tau @ proj + tau @ b @ a
        return ((tau @ vg - m @ vg) ** 2).sum() + ((d @ vp - m @ vp) ** 2).sum()

    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn()
        losses.append(float(loss.detach()))
        loss.backward()
        opt.step()
    losses.append(float(loss_fn().detach()))
    return (d + tau @ (proj + b @ a)).detach(), losses


def pair(seed, m, n, rank=None):
    g = torch.Generator().manual_seed(seed)

    def one():
        low = torch.randn(m, 4, generator=g, dtype=F64) @ torch.randn(4, n, generator=g, dtype=F64) * 0.1
        return low if rank else low + 0.02 * torch.randn(m, n, generator=g, dtype=F64)
    return one(), one()


def test_filtered_update_is_orthogonal_to_the_protected_subspace():
    d, tau = pair(0, 20, 30)
    for r_p in (3, 12, 100):
        new, info = nufilt_update(d, tau, None, null_rank=r_p)  # the filter alone
        vp = ref_right(d, r_p)
        assert info["null_rank"] == vp.shape[1] == min(r_p, 20)
        assert float(((new - d) @ vp).abs().max()) < 1e-12 * float(tau.norm())
        # and it removes nothing else: τ_t P = τ_t − τ_t V̂ V̂ᵀ
        assert torch.allclose(new - d, tau - tau @ vp @ vp.T, atol=1e-13)


def test_protected_rank_is_capped_by_the_merged_update_rank():
    d, tau = pair(1, 16, 24, rank=4)
    assert top_right_vectors(d, 128).shape == (24, 4)
    assert top_right_vectors(torch.zeros(5, 7, dtype=F64), 3).shape == (7, 0)
    new, info = nufilt_update(torch.zeros_like(tau), tau, None)
    assert info["null_rank"] == 0 and torch.equal(new, tau)  # nothing to protect: P = I


@pytest.mark.parametrize("shape,grad_rank", [((24, 16), 8), ((16, 24), 8), ((20, 20), 3)])
def test_adapter_fit_matches_autograd_adam_and_lowers_the_loss(shape, grad_rank):
    d, tau = pair(sum(shape), *shape)
    a0 = adapter_init(7, 2, "w", 6, shape[1], 0.02)
    hist = []
    got, info = nufilt_update(d, tau, a0, null_rank=5, grad_rank=grad_rank, steps=40, lr=1e-2, history=hist)
    want, want_losses = ref_update(d, tau, a0, null_rank=5, grad_rank=grad_rank, steps=40, lr=1e-2)
    assert float((got - want).norm()) <= 1e-11 * float(want.norm())
    assert hist == pytest.approx(want_losses, rel=1e-10)
    assert info["loss"] == [hist[0], hist[-1]] and hist[-1] < 0.8 * hist[0]
    assert min(hist) < hist[0] and hist[-1] <= min(hist[:5])


def test_grad_rank_zero_leaves_the_adapter_at_zero():
    d, tau = pair(3, 12, 10)
    filt, _ = nufilt_update(d, tau, None, null_rank=4)
    got, info = nufilt_update(d, tau, adapter_init(0, 2, "w", 4, 10, 0.02), null_rank=4, grad_rank=0)
    assert torch.equal(got, filt) and info["loss"] == [0.0, 0.0]


def test_adapter_init_is_deterministic_per_seed_step_and_name():
    a = adapter_init(0, 2, "layers.0.q", 4, 6, 0.02)
    assert torch.equal(a, adapter_init(0, 2, "layers.0.q", 4, 6, 0.02))
    for other in (adapter_init(1, 2, "layers.0.q", 4, 6, 0.02), adapter_init(0, 3, "layers.0.q", 4, 6, 0.02),
                  adapter_init(0, 2, "layers.1.q", 4, 6, 0.02)):
        assert not torch.equal(a, other)
    assert float(a.std()) == pytest.approx(0.02, rel=0.5)


# ---------------------------------------------------------------- through the Merger

@pytest.fixture(scope="module")
def models():
    base = helpers.tiny_base(seed=11, hidden=8)
    return base, helpers.experts(base, 3, seed=13)


def ref_nufilt_model(base, exps, others="base", layers=(), **kw):
    """Whole models in float64. Selected linear weights: τ_1 at t = 1, then D + T (P + B A); every other
    tensor: θ0 (base), sum of task vectors (add) or the running mean (average)."""
    b = helpers.f64(base)
    m, out = {}, []
    for t, e in enumerate(exps, start=1):
        tau = {n: e[n].double() - b[n] for n in b}
        for n in b:
            selected = n in helpers.TINY_PROJECTED and (not layers or any(f in n for f in layers))
            if selected:
                if t == 1:
                    m[n] = tau[n]
                else:
                    a0 = adapter_init(kw.get("init_seed", 0), t, n, 64, tau[n].shape[1], 0.02)
                    m[n] = ref_update(m[n], tau[n], a0, steps=kw.get("steps", 50))[0]
            elif others == "base":
                m[n] = torch.zeros_like(tau[n])
            elif t == 1:
                m[n] = tau[n]
            else:
                m[n] = m[n] + tau[n] if others == "add" else m[n] + (tau[n] - m[n]) / t
        out.append({n: b[n] + m[n] for n in b})
    return out


@pytest.mark.parametrize("params", [dict(steps=15), dict(steps=10, others="average", layers="mlp"),
                                    dict(steps=10, others="add", init_seed=3)], ids=["default", "average_mlp", "add"])
def test_merger_matches_whole_model_reference(models, params):
    base, exps = models
    merger = Merger(base, "nufilt", precision="float64", **params)
    got = []
    for e in exps:
        merger.add(e)
        got.append(merger.state_dict())
    kw = dict(params)
    layers = tuple(kw.pop("layers").split(",")) if "layers" in kw else ()
    want = ref_nufilt_model(base, exps, others=kw.pop("others", "base"), layers=layers, **kw)
    for t, (g, w) in enumerate(zip(got, want), start=1):
        assert helpers.max_rel_err(g, w) < 1e-10, f"step {t}"
        assert torch.equal(g["position_ids"], base["position_ids"])


def test_deterministic_and_float32_close(models):
    base, exps = models
    a = merge(base, exps, "nufilt", steps=10)
    assert all(torch.equal(a[n], v) for n, v in merge(base, exps, "nufilt", steps=10).items())
    c = merge(base, exps, "nufilt", steps=10, init_seed=1)
    assert any(not torch.equal(a[n], c[n]) for n in helpers.TINY_PROJECTED)
    b = merge(base, exps, "nufilt", steps=10, precision="float64")
    assert helpers.max_rel_err(a, b) < 1e-4


def test_memory_is_one_tensor_per_tensor(models):
    base, exps = models
    merger = Merger(base, "nufilt", steps=3, others="average")
    shapes = []
    for e in exps + exps[:2]:
        merger.add(e)
        acc = merger.accumulators
        assert set(acc) == {"M"}
        shapes.append({n: tuple(t.shape) for n, t in acc["M"].items()})
    assert all(s == shapes[0] for s in shapes)
    assert shapes[0] == {n: tuple(t.shape) for n, t in base.items() if t.dtype.is_floating_point}
