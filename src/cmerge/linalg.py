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

Everything here is pure math: tensors in, tensors out, no I/O, no logging.
"""

from __future__ import annotations

import torch

__all__ = ["FACTORIZATIONS", "RANK_RTOL", "numerical_rank", "protected_rank", "opcm_project", "svd_factors"]

FACTORIZATIONS = ("gram", "svd")

# Singular values below this fraction of s_1 are recomputed outside the Gram matrix.
_GRAM_TAIL = 1e-3
# More tail than this fraction of r: the Gram route gives way to the LAPACK SVD.
_GRAM_MAX_TAIL = 0.25
# Elements (float64) per column chunk of the streamed products (32 MiB).
_CHUNK_ELEMENTS = 1 << 22


#: Singular values at most this fraction of the largest count as zero (D is then rank-deficient):
#: an exactly low-rank matrix computed in float64 has its "zero" singular values at ~1e-16 of
#: the largest, and a task vector has no genuine direction that small.
RANK_RTOL = 1e-10


def numerical_rank(singular_values: torch.Tensor) -> int:
    """The number of singular values above RANK_RTOL times the largest (0 for a zero spectrum)."""
    s = singular_values.detach().reshape(-1)
    if s.numel() == 0 or not float(s.max()) > 0:
        return 0
    return int(torch.count_nonzero(s > RANK_RTOL * s.max()))


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
    out: torch.Tensor | None = None,
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
    """
    _check_pair(delta, x)
    if out is not None and (out.shape != x.shape or out.dtype != x.dtype or out.device != x.device):
        raise ValueError(f"out must match x's shape, dtype and device, got {tuple(out.shape)} {out.dtype} {out.device}")
    if not bool(torch.any(delta)):
        return (x.clone() if out is None else out.copy_(x)), 0
    tall = delta.shape[0] > delta.shape[1]
    # P commutes with transposition (P_{Dᵀ}(Xᵀ) = P_D(X)ᵀ): work on the wide side.
    d_w, x_w = (delta.mT, x.mT) if tall else (delta, x)
    u, s, v = svd_factors(d_w, factorization)
    rank = numerical_rank(s)
    if rank < s.numel():  # a rank-deficient D: only its nonzero singular pairs count (docs/methods.md)
        u, s, v = u[:, :rank], s[:rank], v[:, :rank]
    k = protected_rank(s, alpha)
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _project_into(out.mT if tall else out, u, v, k, x_w, keep_diagonal, drop_cross_blocks)
    return out, k


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
    step = max(1, _CHUNK_ELEMENTS // max(m, 1))
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
    """Write P(X) into ``out`` from float64 factors u (m × r), v (n × r) of D (Eq. 9).

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
    f64 = torch.float64
    chunks = _column_chunks(m, n)
    u_k = u[:, :k]
    rows = slice(0, k) if keep_diagonal else slice(0, r)  # rows of UᵀX that are needed
    block = torch.zeros(k, k, dtype=f64, device=x.device)  # U_kᵀ X V_k
    diag = torch.zeros(r - k, dtype=f64, device=x.device)  # u_iᵀ X v_i, i ≥ k
    xv_k = torch.zeros(m, k, dtype=f64, device=x.device) if drop_cross_blocks else None
    whole = x.to(f64, copy=True) if len(chunks) == 1 else None  # one chunk: converted once

    def x64(cols: slice) -> torch.Tensor:  # a float64 copy of X's columns, ours to modify
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
