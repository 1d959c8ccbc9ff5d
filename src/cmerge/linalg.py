"""The OPCM projection kernel: exact, thin-SVD form of the paper's Eq. 9.

Notation (docs/methods.md, OPCM paper Eq. 6-10): D is the merged task vector of
one linear-layer weight (m × n), X the incoming task vector, D = U diag(s) Vᵀ its
reduced SVD, r = min(m, n), and k the protected rank (see `protected_rank`). The
reference projection keeps the coefficients C = UᵀXV except the top-left k × k block
and the whole diagonal:

    P(X) = X − U_k (U_kᵀ X V_k) V_kᵀ − Σ_{i=k}^{r−1} (u_iᵀ X v_i) u_i v_iᵀ

which never forms an m × m or n × n matrix and equals the full-SVD masking of C
exactly. Zeroing the diagonal is what makes ⟨P(X), D⟩_F = 0 (Theorem 5.1).

Precision. The diagonal terms need every singular pair, including those inside the
dense bulk of a noisy task vector, where a float32 SVD's vectors are off by
~1e-3 (eps · s_1 / gap): a float32 SVD moves P(X) by ~1e-4 relative. So the factors
and all products are computed in float64 (on the input's device) whatever the input
dtype, and only the result is rounded back; this matches a float64 full-SVD
reference to float32 rounding.

Speed. The default factorization ("gram") takes the SVD from the float64
eigendecomposition of the smaller Gram matrix D Dᵀ (or Dᵀ D): one r × r `eigh`
and a few products instead of an m × n SVD. It is exact for the singular values
that the Gram matrix resolves (s_i ≥ 1e-3 s_1 here, so eigenvalues ≥ 1e-6 s_1²);
the few smaller ones are recomputed by a small float64 SVD of their own block, and a
numerically rank-deficient D (a large tail) falls back to the float64 LAPACK SVD.

Kernels (docs/methods.md, "Kernels"). ``kernel="float64"`` (the default) is the exact
kernel above. ``kernel="float32"`` keeps in float64 what decides the accuracy — the Gram
matrix and its r × r ``eigh`` (hence the singular values and left vectors), the recomputed
tail and the rank rule — and does the three products of size r·m·n that touch D or X
(Dᵀ U, UᵀX and the result) in float32. Its error against the float64 result is ~1e-7
relative, well below that of the reference code's float32 SVD; a float32 ``eigh`` of the
Gram matrix would be faster but is 1e-3 off (measured, docs/benchmarks.md).
`opcm_project_batched` runs either kernel on a stack of same-shape weights (for GPUs; on a
CPU it gives the per-tensor result to rounding).

Everything here is pure math: tensors in, tensors out, no I/O, no logging.
"""

from __future__ import annotations

import torch

__all__ = ["FACTORIZATIONS", "KERNELS", "RANK_RTOL", "numerical_rank", "rank_rtol", "protected_rank", "opcm_project",
           "opcm_project_batched", "svd_factors"]

FACTORIZATIONS = ("gram", "svd")
#: The projection's arithmetic: "float64" (exact, the default) or "float32" products (see above).
KERNELS = ("float64", "float32")

# Singular values below this fraction of s_1 are recomputed outside the Gram matrix.
_GRAM_TAIL = 1e-3
# More tail than this fraction of r: the Gram route gives way to the LAPACK SVD.
_GRAM_MAX_TAIL = 0.25
# Elements (float64) per column chunk of the streamed products (32 MiB).
COLUMN_CHUNK_ELEMENTS = 1 << 22


#: Singular values at most this fraction of the largest count as zero (D is then rank-deficient):
#: an exactly low-rank matrix computed in float64 has its "zero" singular values at ~1e-16 of
#: the largest, and a task vector has no genuine direction that small.
RANK_RTOL = 1e-10


def numerical_rank(singular_values: torch.Tensor, rtol: float = RANK_RTOL) -> int:
    """The number of singular values above ``rtol`` (default RANK_RTOL) times the largest (0 for a zero spectrum)."""
    s = singular_values.detach().reshape(-1)
    if s.numel() == 0 or not float(s.max()) > 0:
        return 0
    return int(torch.count_nonzero(s > rtol * s.max()))


def rank_rtol(x: torch.Tensor) -> float:
    """The relative threshold below which a singular value of the matrix ``x``, as stored, is rounding:
    RANK_RTOL, or max(m, n) · ε of x's dtype where that is larger (float32: ~1e-4 on a 768 × 768 weight).
    A matrix of rank r stored in float32 has its other singular values at ~1e-7 of the largest, far
    above RANK_RTOL."""
    return max(RANK_RTOL, max(x.shape[-2:]) * torch.finfo(x.dtype).eps)


def protected_rank(singular_values: torch.Tensor, alpha: float) -> int:
    """Size k of the protected block for the projection threshold ``alpha`` (Eq. 9).

    With c_i = (s_1 + … + s_i) / Σ s the cumulative singular-value mass, k is the
    0-based index of the first c_i > alpha (the reference implementation's
    convention: k = number of i with c_i ≤ alpha), and k = 0 if no c_i exceeds alpha.
    So alpha = 1.0 gives k = 0, and alpha = 0 gives k = 0 for any nonzero spectrum.

    The sums are taken in float64 and the last c is set to exactly 1.0, so
    alpha = 1.0 is deterministic whatever the rounding. An all-zero spectrum gives 0.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha!r}")
    s = singular_values.detach().reshape(-1).to(device="cpu", dtype=torch.float64)
    if s.numel() == 0:
        return 0
    total = s.sum()
    if not total > 0:
        return 0
    c = torch.cumsum(s, 0) / total
    c[-1] = 1.0
    above = torch.nonzero(c > alpha)
    return int(above[0, 0]) if above.numel() else 0


def opcm_project(
    delta: torch.Tensor,
    x: torch.Tensor,
    alpha: float,
    *,
    keep_diagonal: bool = False,
    drop_cross_blocks: bool = False,
    factorization: str = "gram",
    kernel: str = "float64",
    out: torch.Tensor | None = None,
    rtol: float = RANK_RTOL,
) -> tuple[torch.Tensor, int]:
    """Project the incoming task vector ``x`` away from ``delta`` (OPCM, Eq. 9).

    ``delta`` is the merged task vector D, or any positive multiple of it (OPCM
    passes S_t = λ_t·D, which has the same singular vectors); ``x`` is X. Both are
    2-D tensors of the same shape, dtype (float32 or float64) and device. The work
    is done on that device in float64; the result comes back in the input dtype.
    Returns ``(P(X), k)`` with k from `protected_rank`.

    Variants (docs/methods.md):

    - default (the reference since March 2025, Theorem 5.1): zero the k × k block
      of C = UᵀXV and its whole diagonal, keep the cross blocks.
    - ``keep_diagonal=True``: the Jan-2025 reference code, whose diagonal zeroing
      acted on a copy: only the k × k block is removed,
      P(X) = X − U_k (U_kᵀ X V_k) V_kᵀ. Not orthogonal to D in general.
    - ``drop_cross_blocks=True``: the strict reading of Eq. 9 (keep only
      i, j ≥ k, i ≠ j): P(X) = (I − U_kU_kᵀ) X (I − V_kV_kᵀ) minus the diagonal
      terms for k ≤ i < r (unless ``keep_diagonal``).

    ``factorization`` picks how the SVD of D is obtained (see `svd_factors`):
    "gram" (default, fast) or "svd" (float64 LAPACK SVD); both give the same P(X)
    to float64 accuracy.

    ``kernel``: "float64" (default) does every product in float64 and matches a float64
    reference to float64 rounding before the result is rounded to the input dtype;
    "float32" takes the same float64 Gram ``eigh``, tail and rank rule but does Dᵀ U, UᵀX
    and the result in float32 (~1e-7 relative from the float64 result on task vectors;
    docs/methods.md, "Kernels").

    ``out``: where to write P(X), shaped and typed like ``x``; it may be ``x`` itself
    (X is read in column chunks, each before its own columns of the result are written),
    which saves a tensor of X's size. Default: a new tensor.

    Deliberate deviation: if D is exactly zero (a layer that fine-tuning never
    touched) there is nothing to protect and X is returned unchanged with k = 0;
    the reference would instead zero X's diagonal in an arbitrary SVD basis.

    A rank-deficient D (R = `numerical_rank` < r, e.g. a merge of LoRA deltas in float64)
    follows the rule for its R nonzero singular pairs: k from their mass, the diagonal
    zeroed for i < R only, so P(X) does not depend on the arbitrary null-space basis an
    SVD returns; ⟨P(X), D⟩ = 0 still. On a full-rank D this is the rule above.
    ``rtol``: D's singular values at most this fraction of the largest count as zero (default
    RANK_RTOL; `iso` passes `rank_rtol` of D, so that a rank-deficient D stored in float32 does not
    count its rounding as directions).
    """
    _check_pair(delta, x)
    _check_kernel(kernel)
    if out is not None and (out.shape != x.shape or out.dtype != x.dtype or out.device != x.device):
        raise ValueError(f"out must match x's shape, dtype and device, got {tuple(out.shape)} {out.dtype} {out.device}")
    if not bool(torch.any(delta)):
        return (x.clone() if out is None else out.copy_(x)), 0
    tall = delta.shape[0] > delta.shape[1]
    # P commutes with transposition (P_{Dᵀ}(Xᵀ) = P_D(X)ᵀ): work on the wide side.
    d_w, x_w = (delta.mT, x.mT) if tall else (delta, x)
    u, s, v = svd_factors(d_w, factorization) if kernel == "float64" else _factors_f32(d_w, factorization)
    rank = numerical_rank(s, rtol)
    if rank < s.numel():  # a rank-deficient D: only its nonzero singular pairs count (docs/methods.md)
        u, s, v = u[:, :rank], s[:rank], v[:, :rank]
    k = protected_rank(s, alpha)
    if kernel == "float32":  # the products' factors (the float64 ones are dropped here)
        u, v = u.to(torch.float32), v.to(torch.float32)
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _project_into(out.mT if tall else out, u, v, k, x_w, keep_diagonal, drop_cross_blocks)
    return out, k


def opcm_project_batched(
    delta: torch.Tensor,
    x: torch.Tensor,
    alpha: float,
    *,
    keep_diagonal: bool = False,
    drop_cross_blocks: bool = False,
    kernel: str = "float64",
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[int]]:
    """`opcm_project` of every pair of a stack: ``delta`` and ``x`` are (B, m, n), one D and X per entry.

    The Gram matrices, their ``eigh`` and the products are batched calls (on a GPU one
    launch each instead of B). Every entry follows `opcm_project`'s rule and kernel and
    equals its result to the kernel's rounding — float64: ~1e-15 relative, float32:
    float32 rounding (~1e-7) — not bit for bit, since batched products add in another
    order. Entries that need more than the plain Gram route (D = 0, singular values below
    1e-3 s_1, a rank-deficient D) go through `opcm_project` one at a time.

    Returns ``(P, ks)``: P shaped like ``x`` (written into ``out``, which may be ``x``) and
    each entry's protected rank. Memory: no column chunks; a few float64 (B, m, n) and
    (B, n, r) arrays besides the inputs, so B is the caller's memory budget.
    """
    if delta.ndim != 3 or x.ndim != 3 or delta.shape != x.shape:
        raise ValueError(f"delta and x must be stacks of matrices of one shape (B, m, n), got shapes "
                         f"{tuple(delta.shape)} and {tuple(x.shape)}")
    if delta.dtype != x.dtype or delta.dtype not in (torch.float32, torch.float64) or delta.device != x.device:
        raise ValueError(f"delta and x must share one dtype (float32 or float64) and one device; got {delta.dtype} "
                         f"on {delta.device} and {x.dtype} on {x.device}")
    _check_kernel(kernel)
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    elif out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"out must match x's shape, dtype and device, got {tuple(out.shape)} {out.dtype} {out.device}")
    n_batch = x.shape[0]
    ks = [0] * n_batch
    if n_batch == 0:
        return out, ks
    tall = x.shape[1] > x.shape[2]
    d_w, x_w, o_w = (delta.mT, x.mT, out.mT) if tall else (delta, x, out)
    plain, u, s, v = _batched_factors(d_w, kernel)
    apart = {}  # entries the plain route does not cover, computed before ``out`` (maybe ``x``) is written
    for i in range(n_batch):
        if not plain[i]:
            apart[i], ks[i] = opcm_project(delta[i], x[i], alpha, keep_diagonal=keep_diagonal,
                                           drop_cross_blocks=drop_cross_blocks, kernel=kernel)
    idx = [i for i in range(n_batch) if plain[i]]
    if idx:
        for j, i in enumerate(idx):
            ks[i] = protected_rank(s[j], alpha)
        sel = torch.tensor(idx, device=x.device)
        p = _project_batched(u, v, [ks[i] for i in idx], x_w.index_select(0, sel), keep_diagonal, drop_cross_blocks)
        o_w.index_copy_(0, sel, p.to(x.dtype))
    for i, p in apart.items():
        out[i] = p
    return out, ks


def svd_factors(delta: torch.Tensor, factorization: str = "gram") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reduced SVD of ``delta`` (m × n) in float64: U (m × r), s (r), V (n × r).

    ``factorization``:

    - "gram": eigendecomposition of the smaller Gram matrix (D Dᵀ if m ≤ n),
      s_i = ‖Dᵀ u_i‖ and v_i = Dᵀ u_i / s_i for s_i ≥ 1e-3 s_1; the pairs below that
      are recomputed by a float64 SVD of their own block (Dᵀ U_tail with the head's
      right vectors projected out). If more than a quarter of the spectrum is that
      small (a numerically low-rank D), the LAPACK SVD is used instead.
    - "svd": ``torch.linalg.svd(full_matrices=False)`` in float64.

    Singular values come out in non-increasing order.
    """
    if factorization not in FACTORIZATIONS:
        raise ValueError(f"factorization must be one of {FACTORIZATIONS}, got {factorization!r}")
    if factorization == "gram":
        factors = _gram_factors(delta.mT) if delta.shape[0] > delta.shape[1] else _gram_factors(delta)
        if factors is not None:
            u, s, v = factors
            return (v, s, u) if delta.shape[0] > delta.shape[1] else (u, s, v)
    u, s, vh = torch.linalg.svd(delta.to(torch.float64), full_matrices=False)
    return u, s, vh.mT


def _check_kernel(kernel: str) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")


def _check_pair(delta: torch.Tensor, x: torch.Tensor) -> None:
    if delta.ndim != 2 or x.ndim != 2:
        raise ValueError(
            f"delta and x must be 2-D matrices, got shapes {tuple(delta.shape)} and {tuple(x.shape)}"
        )
    if delta.shape != x.shape:
        raise ValueError(f"delta and x must have the same shape, got {tuple(delta.shape)} and {tuple(x.shape)}")
    if delta.dtype != x.dtype or delta.dtype not in (torch.float32, torch.float64):
        raise ValueError(
            f"delta and x must share one dtype, float32 or float64; got {delta.dtype} and {x.dtype}"
        )
    if delta.device != x.device:
        raise ValueError(f"delta and x must be on one device, got {delta.device} and {x.device}")


def _column_chunks(m: int, n: int):
    step = max(1, COLUMN_CHUNK_ELEMENTS // max(m, 1))
    return [slice(j, min(j + step, n)) for j in range(0, n, step)]


def _gram_factors(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """SVD factors of a wide d (m ≤ n) from eigh(d dᵀ) in float64; None: use LAPACK SVD."""
    m, n = d.shape
    f64 = torch.float64
    chunks = _column_chunks(m, n)
    whole = d.to(f64) if len(chunks) == 1 else None  # converted once when D is one chunk
    gram = torch.zeros(m, m, dtype=f64, device=d.device)
    for cols in chunks:
        dj = whole if whole is not None else d[:, cols].to(f64)
        gram.addmm_(dj, dj.mT)
    _, u = torch.linalg.eigh(gram)  # ascending
    del gram
    u = u.flip(1)
    w = torch.empty(n, m, dtype=f64, device=d.device)  # Dᵀ U, column i = s_i v_i
    for cols in chunks:
        dj = whole if whole is not None else d[:, cols].to(f64)
        torch.matmul(dj.mT, u, out=w[cols])
    del whole
    s = torch.linalg.vector_norm(w, dim=0)
    u, s, w = _sorted(u, s, w)
    if not s[0] > 0:
        return None
    head = int(torch.count_nonzero(s >= _GRAM_TAIL * s[0]))
    tail = m - head
    if tail > _GRAM_MAX_TAIL * m:
        return None
    v = w
    v[:, :head] /= s[:head]
    if tail:
        v_head = v[:, :head]
        w_tail = v[:, head:]
        for _ in range(2):  # project the head's right vectors out, twice for orthogonality
            w_tail -= v_head @ (v_head.mT @ w_tail)
        q, s_tail, rh = torch.linalg.svd(w_tail, full_matrices=False)
        # Degenerate tails (exact zeros) give LAPACK an arbitrary basis: check it.
        if not bool(torch.all(torch.isfinite(q))) or float(torch.linalg.matrix_norm(v_head.mT @ q, ord=2)) > 1e-9:
            return None
        v[:, head:] = q
        s[head:] = s_tail
        u[:, head:] = u[:, head:] @ rh.mT
        u, s, v = _sorted(u, s, v)
    return u, s, v


def _factors_f32(d: torch.Tensor, factorization: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The float32 kernel's factors of a wide d (m ≤ n): U (float64), s (float64), V (float32).

    The Gram matrix and its ``eigh`` are float64 as in `svd_factors`; s_i = √λ_i for
    λ_i ≥ 1e-6 λ_1 (relative error ≤ 1e-10 there) and v_i = Dᵀu_i / s_i with the product
    in float32. The smaller values (the tail) are recomputed in float64 from Dᵀ U_tail by
    a small SVD, which also gives the rank rule its exact zeros; more tail than a quarter of
    r, or ``factorization="svd"``: the float64 LAPACK SVD.
    """
    if factorization not in FACTORIZATIONS:
        raise ValueError(f"factorization must be one of {FACTORIZATIONS}, got {factorization!r}")
    factors = _gram_factors_f32(d) if factorization == "gram" else None
    if factors is not None:
        return factors
    u, s, vh = torch.linalg.svd(d.to(torch.float64), full_matrices=False)
    return u, s, vh.mT


def _gram_factors_f32(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    m, n = d.shape
    f64, f32 = torch.float64, torch.float32
    chunks = _column_chunks(m, n)
    whole = d.to(f64) if len(chunks) == 1 else None

    def d64(cols: slice) -> torch.Tensor:
        return whole if whole is not None else d[:, cols].to(f64)

    gram = torch.zeros(m, m, dtype=f64, device=d.device)
    for cols in chunks:
        dj = d64(cols)
        gram.addmm_(dj, dj.mT)
    lam, u = torch.linalg.eigh(gram)  # ascending
    del gram
    lam, u = lam.flip(0), u.flip(1)
    if not lam[0] > 0:
        return None
    head = int(torch.count_nonzero(lam >= _GRAM_TAIL ** 2 * lam[0]))
    tail = m - head
    if tail > _GRAM_MAX_TAIL * m:
        return None
    s = lam.clamp_min(0).sqrt()
    u_head = u[:, :head].to(f32)
    v = torch.empty(n, m, dtype=f32, device=d.device)
    for cols in chunks:
        torch.matmul(d[:, cols].to(f32).mT, u_head, out=v[cols, :head])
    v[:, :head] /= s[:head].to(f32)
    if tail:  # Dᵀ U_tail in float64, and its own SVD
        w_tail = torch.empty(n, tail, dtype=f64, device=d.device)
        for cols in chunks:
            torch.matmul(d64(cols).mT, u[:, head:], out=w_tail[cols])
        q, s_tail, rh = torch.linalg.svd(w_tail, full_matrices=False)
        v[:, head:] = q
        s[head:] = s_tail
        u[:, head:] = u[:, head:] @ rh.mT
        u, s, v = _sorted(u, s, v)
    return u, s, v


def _batched_factors(d: torch.Tensor, kernel: str) -> tuple[list[bool], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gram-route factors of a stack of wide matrices (B, m, n), m ≤ n, in the kernel's product dtype.

    Returns ``plain`` (per entry: D ≠ 0 and every s_i ≥ 1e-3 s_1, the case the batched
    projection covers) and U (·, m, m), s (·, m) and V (·, n, m) of the plain entries only.
    The float64 kernel takes s_i = ‖Dᵀu_i‖ as `svd_factors` does, the float32 one √λ_i as
    `_factors_f32` does.
    """
    f64 = torch.float64
    work = torch.float64 if kernel == "float64" else torch.float32
    d64 = d.to(f64)
    gram = d64 @ d64.mT
    del d64
    lam, u = torch.linalg.eigh(gram)
    del gram
    lam, u = lam.flip(-1), u.flip(-1)
    w = d.to(work).mT @ u.to(work)  # (B, n, m): column i is s_i v_i
    s = torch.linalg.vector_norm(w, dim=-2, dtype=f64) if kernel == "float64" else lam.clamp_min(0).sqrt()
    order = torch.argsort(s, dim=-1, descending=True, stable=True)
    s = s.gather(-1, order)
    u = u.gather(-1, order.unsqueeze(-2).expand_as(u))
    w = w.gather(-1, order.unsqueeze(-2).expand_as(w))
    top = s[:, :1]
    plain_t = (top[:, 0] > 0) & torch.all(s >= _GRAM_TAIL * top, dim=-1)
    if kernel != "float64":
        plain_t &= torch.all(lam >= _GRAM_TAIL ** 2 * lam[:, :1], dim=-1)
    plain = plain_t.tolist()
    sel = torch.nonzero(plain_t).flatten()
    u, s, w = u.index_select(0, sel), s.index_select(0, sel), w.index_select(0, sel)
    return plain, u.to(work), s, w / s.to(work).unsqueeze(-2)


def _project_batched(u: torch.Tensor, v: torch.Tensor, ks: list[int], x: torch.Tensor, keep_diagonal: bool,
                     drop_cross_blocks: bool) -> torch.Tensor:
    """P(X) of a stack from its factors u (B, m, r), v (B, n, r) in the product dtype, entry i protecting ks[i].

    The rule of `_project_into` with the k × k blocks of different sizes padded to K = max k
    and masked: L's first k_i columns U_k (U_kᵀ X V_k) (or X V_k − U_k (U_kᵀ X V_k) without
    the cross blocks), column j ≥ k_i (u_jᵀ X v_j) u_j; P = X − L Vᵀ (− U_k (U_kᵀ X)).
    """
    work = u.dtype
    x = x.to(work)
    big_k = max(ks)
    keep = torch.arange(u.shape[-1], device=u.device) >= torch.tensor(ks, device=u.device).unsqueeze(-1)  # (B, r)
    in_k = ~keep[:, :big_k]  # (B, K)
    u_k = u[..., :big_k] * in_k.unsqueeze(-2).to(work)  # U_k padded with zero columns
    v_k = v[..., :big_k] * in_k.unsqueeze(-2).to(work)
    coeff = u.mT @ x  # (B, r, n): UᵀX
    block = coeff[:, :big_k] @ v_k * in_k.unsqueeze(-1).to(work)  # U_kᵀ X V_k, zero outside k_i × k_i
    left = torch.zeros_like(u)
    left[..., :big_k] = u_k @ block
    if drop_cross_blocks:
        left[..., :big_k] = x @ v_k - left[..., :big_k]
    if not keep_diagonal:
        diag = torch.linalg.vecdot(coeff, v.mT) * keep.to(work)  # u_jᵀ X v_j for j ≥ k_i
        left += u * diag.unsqueeze(-2)
    p = torch.baddbmm(x, left, v.mT, alpha=-1.0)
    if drop_cross_blocks and big_k:
        p.baddbmm_(u_k, coeff[:, :big_k] * in_k.unsqueeze(-1).to(work), alpha=-1.0)
    return p


def _sorted(u: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Permute singular triplets into non-increasing order of s (a no-op if they are)."""
    if bool(torch.all(s[:-1] >= s[1:])):
        return u, s, v
    order = torch.argsort(s, descending=True, stable=True)
    return u[:, order], s[order], v[:, order]


def _project_into(
    out: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    k: int,
    x: torch.Tensor,
    keep_diagonal: bool,
    drop_cross_blocks: bool,
) -> None:
    """Write P(X) into ``out`` from factors u (m × r), v (n × r) of D (Eq. 9), computing in their dtype
    (float64 for the exact kernel, float32 for the float32 kernel).

    ``u`` is overwritten (L is built in its memory); the caller must not use it again.

    Every removed term but one is L Vᵀ for an m × r matrix L: its first k columns
    are U_k (U_kᵀ X V_k) (the protected block) and column i ≥ k is (u_iᵀ X v_i) u_i
    (the diagonal). Dropping the cross blocks removes U_kU_kᵀX + (I − U_kU_kᵀ) X V_kV_kᵀ
    instead of the block: the first k columns of L become X V_k − U_k (U_kᵀ X V_k) and
    U_k (U_kᵀ X) is removed apart. X is streamed twice in column chunks, so float64
    copies of X are whole only when X fits in one chunk: one pass for the coefficients,
    one for the result.
    """
    m, n = x.shape
    r = u.shape[1]
    f64 = u.dtype  # the products' dtype: float64 unless the float32 kernel
    chunks = _column_chunks(m, n)
    u_k = u[:, :k]
    rows = slice(0, k) if keep_diagonal else slice(0, r)  # rows of UᵀX that are needed
    block = torch.zeros(k, k, dtype=f64, device=x.device)  # U_kᵀ X V_k
    diag = torch.zeros(r - k, dtype=f64, device=x.device)  # u_iᵀ X v_i, i ≥ k
    xv_k = torch.zeros(m, k, dtype=f64, device=x.device) if drop_cross_blocks else None
    whole = x.to(f64, copy=True) if len(chunks) == 1 else None  # one chunk: converted once

    def x64(cols: slice) -> torch.Tensor:  # a copy of X's columns in the products' dtype, ours to modify
        return whole if whole is not None else x[:, cols].to(f64, copy=True)

    for cols in chunks:
        xj = x64(cols)
        vj = v[cols]
        bj = u[:, rows].mT @ xj
        block.addmm_(bj[:k], vj[:, :k])
        if not keep_diagonal:
            diag += torch.linalg.vecdot(bj[k:], vj[:, k:].mT)
        if xv_k is not None:
            xv_k.addmm_(xj, vj[:, :k])
    width = k if keep_diagonal else r
    head = u_k @ block
    if xv_k is not None:
        torch.sub(xv_k, head, out=head)
    if keep_diagonal:
        left = head
    elif drop_cross_blocks:  # pass 2 still needs U_k
        left = torch.empty(m, r, dtype=f64, device=x.device)
        left[:, :k] = head
        torch.mul(u[:, k:], diag, out=left[:, k:])
    else:  # L is built in U's memory: U is not needed any more
        left = u
        left[:, k:] *= diag
        left[:, :k] = head
    del head
    v_used = v[:, :width]
    for cols in chunks:  # pass 1 is over: the chunks may now be updated in place
        xj = x64(cols)
        b_kj = u_k.mT @ xj if drop_cross_blocks and k else None
        xj.addmm_(left, v_used[cols].mT, alpha=-1.0)
        if b_kj is not None:
            xj.addmm_(u_k, b_kj, alpha=-1.0)
        out[:, cols] = xj
