"""OPCM's two projection kernels and the batched path, against float64 references written here.

The float32 kernel's bound is the reference approach's own error: the paper's code computes
Eq. 9 in float32 with a full SVD (`reference_float32` below), and the float32 kernel must be
no further from the float64 result than that, on realistic, rank-deficient and clustered
spectra. The batched kernel (for GPUs, run here on the CPU) must give the per-tensor result
to the kernel's rounding. No timing here (docs/benchmarks.md has the speed).
"""
from __future__ import annotations

import pytest
import torch

import helpers
from cmerge import Merger, init_state, open_state
from cmerge import engine
from cmerge.engine import CUDA_BATCH, StepOptions, batch_size
from cmerge.io import open_source
from cmerge.linalg import KERNELS, opcm_project, opcm_project_batched

VARIANTS = [dict(), dict(keep_diagonal=True), dict(drop_cross_blocks=True),
            dict(keep_diagonal=True, drop_cross_blocks=True)]
VARIANT_IDS = ["default", "keep_diag", "drop_cross", "both"]


# ---------------------------------------------------------------- references and inputs


def reference_float64(delta, x, alpha, keep_diagonal=False, drop_cross_blocks=False):
    """Eq. 9 by the full float64 SVD, with the rank rule (docs/methods.md): only the R nonzero
    singular pairs count (R = those above 1e-10 s_1)."""
    d, x = delta.double(), x.double()
    u, s, vh = torch.linalg.svd(d, full_matrices=True)
    rank = int((s > 1e-10 * s[0]).sum())
    k = helpers.reference_k(s[:rank], alpha)
    c = u.T @ x @ vh.T
    keep = torch.ones_like(c, dtype=torch.bool)
    keep[:k, :k] = False
    if drop_cross_blocks:
        keep[:k, :] = False
        keep[:, :k] = False
    if not keep_diagonal:
        keep[torch.arange(rank), torch.arange(rank)] = False
    return u @ (c * keep) @ vh, k


def reference_float32(delta, x, alpha, keep_diagonal=False, drop_cross_blocks=False):
    """The reference approach's arithmetic: everything in float32, full SVD, C = UᵀXV, mask, U C' Vᵀ."""
    d, x = delta.float(), x.float()
    u, s, vh = torch.linalg.svd(d, full_matrices=True)
    k = helpers.reference_k(s, alpha)
    c = u.T @ x @ vh.T
    c[:k, :k] = 0
    if drop_cross_blocks:
        c[:k, :] = 0
        c[:, :k] = 0
    if not keep_diagonal:
        c.diagonal().zero_()
    return u @ c @ vh


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def with_spectrum(shape, s, seed):
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    r = min(m, n)
    qu, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
    qv, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    return (qu * s) @ qv.T


def spectrum_case(kind: str, shape, seed: int):
    """(D, X) in float64: a task vector's spectrum and three harder ones."""
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    r = min(m, n)
    if kind == "realistic":  # a few strong directions over a dense noise bulk (speed_models' task vectors)
        d = (torch.randn(m, 4, generator=g, dtype=torch.float64) @ torch.randn(4, n, generator=g, dtype=torch.float64)
             * 5e-4 + torch.randn(m, n, generator=g, dtype=torch.float64) * 1e-3)
    elif kind == "rank_deficient":  # a merge of LoRA deltas: exact rank r/4, computed in float64
        q = r // 4
        d = torch.randn(m, q, generator=g, dtype=torch.float64) @ torch.randn(q, n, generator=g, dtype=torch.float64)
    elif kind == "clustered":  # groups of 6 singular values equal to 1e-5: float32 cannot tell them apart
        # (over one decade: the Gram route resolves a cluster of width δ at s_i to ~1e-16 (s_1 / s_i)² / δ)
        levels = torch.logspace(0, -1, (r + 5) // 6, dtype=torch.float64).repeat_interleave(6)[:r]
        s = levels * (1 + 1e-5 * torch.rand(r, generator=g, dtype=torch.float64))
        d = with_spectrum(shape, s.sort(descending=True).values, seed)
    elif kind == "tail":  # a graded spectrum with a tail far below what a Gram matrix resolves
        s = torch.logspace(0, -2, r, dtype=torch.float64)
        s[-3:] = torch.tensor([1e-5, 1e-7, 1e-9], dtype=torch.float64)
        d = with_spectrum(shape, s, seed)
    else:
        raise ValueError(kind)
    x = torch.randn(m, n, generator=g, dtype=torch.float64) * float(d.norm()) / (m * n) ** 0.5
    return d, x


KINDS = ["realistic", "rank_deficient", "clustered", "tail"]
SHAPES = [(72, 120), (120, 72), (90, 90)]


# ---------------------------------------------------------------- the two kernels


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_float64_kernel_matches_float64_reference(kind, shape):
    delta, x = spectrum_case(kind, shape, seed=1)
    for variant in VARIANTS:
        want, k_ref = reference_float64(delta, x, 0.5, **variant)
        got, k = opcm_project(delta, x, 0.5, kernel="float64", **variant)
        assert k == k_ref
        # the target is 1e-6; a cluster's basis (on which its diagonal terms depend) is resolved to ~1e-16 (s_1 /
        # s_i)² / δ by the Gram route and to ~1e-16 s_1 / (s_i δ) by the reference's SVD (docs/methods.md, Kernels)
        assert rel(got, want) < (1e-6 if kind in ("clustered", "tail") else 1e-12)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("storage", [torch.float32, torch.float64])
def test_float32_kernel_is_no_further_from_float64_than_the_reference_approach(kind, shape, storage):
    """The stated bound: err(float32 kernel) ≤ err(reference approach), both against float64 on the same
    stored D and X; and at most 2e-6 relative. A rank-deficient D stored in float32 is rounded to full
    rank (its zero singular values become ~1e-8 s_1), so there the float64 rule acts on that rounding."""
    delta, x = spectrum_case(kind, shape, seed=2)
    delta, x = delta.to(storage), x.to(storage)
    for variant in VARIANTS:
        want, k_ref = reference_float64(delta, x, 0.5, **variant)
        got, k = opcm_project(delta, x, 0.5, kernel="float32", **variant)
        assert got.dtype == storage and k == k_ref
        err, err_ref = rel(got, want), rel(reference_float32(delta, x, 0.5, **variant), want)
        assert err <= err_ref, (variant, err, err_ref)
        assert err < 2e-6, (variant, err)


@pytest.mark.parametrize("shape", SHAPES)
def test_float32_kernel_keeps_the_invariants(shape):
    delta, x = spectrum_case("realistic", shape, seed=3)
    delta, x = delta.float(), x.float()
    p, _ = opcm_project(delta, x, 0.5, kernel="float32")
    assert abs(float((p.double() * delta.double()).sum())) < 1e-6 * float(delta.norm() * x.norm())  # Theorem 5.1
    assert float(p.norm()) <= float(x.norm()) * (1 + 1e-6)
    # written over its input: the same result
    x2 = x.clone()
    q, _ = opcm_project(delta, x2, 0.5, kernel="float32", out=x2)
    assert q.data_ptr() == x2.data_ptr() and torch.equal(q, p)
    # and transposition commutes
    pt, _ = opcm_project(delta.T, x.T, 0.5, kernel="float32")
    assert rel(pt.T, p) < 1e-6


def test_float32_kernel_svd_factorization_and_zero_delta():
    delta, x = spectrum_case("realistic", (40, 64), seed=4)
    want, _ = reference_float64(delta, x, 0.3)
    got, _ = opcm_project(delta.float(), x.float(), 0.3, kernel="float32", factorization="svd")
    assert rel(got, want) < 2e-6
    p, k = opcm_project(torch.zeros(5, 7), x[:5, :7].float(), 0.5, kernel="float32")
    assert k == 0 and torch.equal(p, x[:5, :7].float())


def test_rejects_unknown_kernel():
    with pytest.raises(ValueError, match="kernel"):
        opcm_project(torch.randn(3, 4), torch.randn(3, 4), 0.5, kernel="bfloat16")
    with pytest.raises(ValueError, match="kernel"):
        opcm_project_batched(torch.randn(2, 3, 4), torch.randn(2, 3, 4), 0.5, kernel="float16")


# ---------------------------------------------------------------- the batched path


def batch_case(shape, dtype, seed=5):
    """Six entries: realistic ones, and the cases the batched route hands to the per-tensor one."""
    pairs = [spectrum_case(kind, shape, seed + i) for i, kind in
             enumerate(["realistic", "realistic", "tail", "rank_deficient", "clustered", "realistic"])]
    d = torch.stack([p[0] for p in pairs]).to(dtype)
    x = torch.stack([p[1] for p in pairs]).to(dtype)
    d[1] = 0  # a layer that never moved
    return d, x


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("shape,alpha", [((24, 40), 0.5), ((40, 24), 0.9), ((30, 30), 0.0), ((30, 30), 0.5)])
def test_batched_equals_per_tensor(kernel, shape, alpha):
    """float64 kernel: to float64 rounding (1e-12); float32 kernel: to float32 rounding (1e-6)."""
    tol = 1e-12 if kernel == "float64" else 1e-6
    for dtype in (torch.float64, torch.float32):
        d, x = batch_case(shape, dtype)
        for variant in VARIANTS:
            got, ks = opcm_project_batched(d, x, alpha, kernel=kernel, **variant)
            assert got.dtype == dtype and got.shape == x.shape
            for i in range(len(d)):
                want, k = opcm_project(d[i], x[i], alpha, kernel=kernel, **variant)
                assert ks[i] == k
                tol_i = tol if dtype == torch.float64 else max(tol, 1e-6)
                assert rel(got[i], want) < tol_i, (i, variant)


@pytest.mark.parametrize("kernel", KERNELS)
def test_batched_in_place_and_empty(kernel):
    d, x = batch_case((20, 28), torch.float64, seed=9)
    want, ks = opcm_project_batched(d, x, 0.5, kernel=kernel)
    x2 = x.clone()
    got, ks2 = opcm_project_batched(d, x2, 0.5, kernel=kernel, out=x2)
    assert got.data_ptr() == x2.data_ptr() and ks2 == ks and torch.equal(got, want)
    empty, none = opcm_project_batched(d[:0], x[:0], 0.5, kernel=kernel)
    assert empty.shape == (0, 20, 28) and none == []
    with pytest.raises(ValueError, match="stacks"):
        opcm_project_batched(d[0], x[0], 0.5, kernel=kernel)


def test_batch_size_defaults():
    assert batch_size(StepOptions(), torch.device("cpu")) == 1  # the per-tensor path, bit for bit as before
    assert batch_size(StepOptions(), torch.device("cuda")) == CUDA_BATCH
    assert batch_size(StepOptions(batch=3), torch.device("cpu")) == 3
    assert batch_size(StepOptions(batch=0), torch.device("cpu")) == 1


def same_shape_model(seed: int, hidden: int = 12) -> dict:
    """Two decoder-like layers whose four attention weights share a shape (batched in groups), with biases
    and norms in between in the sorted order (they go through one by one, past a pending group)."""
    g = torch.Generator().manual_seed(seed)
    sd = {"embed_tokens.weight": torch.randn(17, hidden, generator=g), "head.weight": torch.randn(5, hidden, generator=g)}
    for i in range(2):
        for proj in ("k_proj", "o_proj", "q_proj", "v_proj"):
            sd[f"layers.{i}.attn.{proj}.weight"] = torch.randn(hidden, hidden, generator=g)
            sd[f"layers.{i}.attn.{proj}.bias"] = torch.randn(hidden, generator=g)
        sd[f"layers.{i}.mlp.up.weight"] = torch.randn(2 * hidden, hidden, generator=g)
        sd[f"layers.{i}.mlp.down.weight"] = torch.randn(hidden, 2 * hidden, generator=g)
        sd[f"layers.{i}.norm.weight"] = torch.randn(hidden, generator=g)
    return sd


@pytest.mark.parametrize("kernel", KERNELS)
def test_engine_batched_step_equals_per_tensor_step(tmp_path, monkeypatch, kernel):
    """A state streamed with batches of 3 (forced on the CPU) against the per-tensor path: accumulators
    to the kernel's rounding, the same protected ranks in the same order, the same λ_t to rounding."""
    base = same_shape_model(0)
    models = helpers.experts(base, 4, seed=3)
    helpers.save_model(base, tmp_path / "base")
    for i, m in enumerate(models):
        helpers.save_model(m, tmp_path / f"m{i}")
    calls = []
    original = engine.batch_size

    def run(tag, batch):
        monkeypatch.setattr(engine, "batch_size", lambda opt, dev: batch)
        st = init_state(tmp_path / tag, tmp_path / "base", "opcm", precision="float64", kernel=kernel,
                        project=[r"attn\..*\.weight$"])
        entries = [st.add(tmp_path / f"m{i}") for i in range(len(models))]
        acc = open_source(next((tmp_path / tag).glob("gen-*/accumulators.safetensors")))
        return entries, {n: acc.get(n) for n in acc.keys()}, open_state(tmp_path / tag).manifest.scalars

    from cmerge.methods.opcm import OPCM

    spy = OPCM.rule_batch

    def counting(self, steps):
        calls.append(len(steps))
        return spy(self, steps)

    monkeypatch.setattr(OPCM, "rule_batch", counting)
    one, acc1, sc1 = run("one", 1)
    assert calls == []
    three, acc3, sc3 = run("three", 3)
    monkeypatch.setattr(engine, "batch_size", original)
    # each step after the first: per layer, 3 of the 4 attention weights batched, the 4th alone (rule)
    assert calls == [3] * 2 * (len(models) - 1)
    tol = 1e-12 if kernel == "float64" else 1e-6
    assert acc1.keys() == acc3.keys()
    for n in acc1:
        assert rel(acc3[n], acc1[n]) < tol, n
    for a, b in zip(one, three):
        assert a["protected_rank"] == b["protected_rank"]
        assert list(a["protected_rank"] or {}) == list(b["protected_rank"] or {})
        assert b["lambda"] == pytest.approx(a["lambda"], rel=tol)
    assert sc3["lambda"] == pytest.approx(sc1["lambda"], rel=tol)


# ---------------------------------------------------------------- the OPCM parameter


def test_kernel_parameter_through_the_merger_and_an_older_state(tmp_path):
    """--kernel float32 is recorded and stays within 1e-6 of the float64 reference chain; a state created
    before the parameter existed (no "kernel" in its manifest) continues with the float64 kernel, bit for bit."""
    base = helpers.tiny_base(seed=4, hidden=16)
    models = helpers.experts(base, 3, seed=5)
    ref = helpers.ref_opcm(base, models, helpers.TINY_PROJECTED)[-1]["merged"]
    m32 = Merger(base, "opcm", kernel="float32")
    for m in models:
        m32.add(m)
    assert helpers.max_rel_err(m32.state_dict(), ref) < 1e-5

    helpers.save_model(base, tmp_path / "base")
    for i, m in enumerate(models):
        helpers.save_model(m, tmp_path / f"m{i}")
    old = init_state(tmp_path / "old", tmp_path / "base", "opcm")
    new = init_state(tmp_path / "new", tmp_path / "base", "opcm", kernel="float64")
    assert new.info()["params"]["kernel"] == "float64"
    manifest = tmp_path / "old" / "manifest.json"
    import json

    data = json.loads(manifest.read_text())
    del data["params"]["kernel"]  # as written before the parameter existed
    manifest.write_text(json.dumps(data))
    old = open_state(tmp_path / "old")
    for i in range(len(models)):
        old.add(tmp_path / f"m{i}")
        new.add(tmp_path / f"m{i}")
    a = open_source(next((tmp_path / "old").glob("gen-*/accumulators.safetensors")))
    b = open_source(next((tmp_path / "new").glob("gen-*/accumulators.safetensors")))
    for n in a.keys():
        assert torch.equal(a.get(n), b.get(n)), n


# ---------------------------------------------------------------- CUDA (skipped without one)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("kernel", KERNELS)
def test_cuda_batched_equals_cpu_per_tensor(kernel):
    d, x = batch_case((48, 80), torch.float32, seed=11)
    got, ks = opcm_project_batched(d.cuda(), x.cuda(), 0.5, kernel=kernel)
    for i in range(len(d)):
        want, k = opcm_project(d[i], x[i], 0.5, kernel=kernel)
        assert ks[i] == k and rel(got[i].cpu(), want) < 1e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_step_equals_cpu_step():
    base = same_shape_model(1)
    models = helpers.experts(base, 3, seed=6)
    cpu, gpu = Merger(base, "opcm"), Merger(base, "opcm", device="cuda")  # cuda: batches of CUDA_BATCH
    for m in models:
        cpu.add(m)
        gpu.add(m)
    assert helpers.max_rel_err(gpu.state_dict(), {n: t.double() for n, t in cpu.state_dict().items()}) < 1e-5
