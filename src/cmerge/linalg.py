"""The OPCM projection kernel: exact, thin-SVD form of the paper's Eq. 9.

Notation (REFERENCE_NOTES §1, OPCM paper Eq. 6-10): D is the merged task vector of
one linear-layer weight (m × n), X the incoming task vector, D = U diag(s) Vᵀ its
reduced SVD, r = min(m, n), and k the protected rank (see `protected_rank`). The
reference projection keeps the coefficients C = UᵀXV except the top-left k × k block
and the whole diagonal:

    P(X) = X − U_k (U_kᵀ X V_k) V_kᵀ − Σ_{i=k}^{r−1} (u_iᵀ X v_i) u_i v_iᵀ

which never forms an m × m or n × n matrix and equals the full-SVD masking of C
exactly. Zeroing the diagonal is what makes ⟨P(X), D⟩_F = 0 (Theorem 5.1).

Everything here is pure math: tensors in, tensors out, no I/O, no logging.
"""

from __future__ import annotations

import torch

__all__ = ["protected_rank", "opcm_project"]


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
) -> tuple[torch.Tensor, int]:
    """Project the incoming task vector ``x`` away from ``delta`` (OPCM, Eq. 9).

    ``delta`` is the merged task vector D, or any positive multiple of it (OPCM
    passes S_t = λ_t·D, which has the same singular vectors); ``x`` is X. Both are
    2-D tensors of the same shape, dtype (float32 or float64) and device; the work is
    done in that dtype on that device. Returns ``(P(X), k)`` with k from
    `protected_rank`.

    Variants (REFERENCE_NOTES §1):

    - default (the reference since March 2025, Theorem 5.1): zero the k × k block
      of C = UᵀXV and its whole diagonal, keep the cross blocks.
    - ``keep_diagonal=True``: the Jan-2025 reference code, whose diagonal zeroing
      acted on a copy: only the k × k block is removed,
      P(X) = X − U_k (U_kᵀ X V_k) V_kᵀ. Not orthogonal to D in general.
    - ``drop_cross_blocks=True``: the strict reading of Eq. 9 (keep only
      i, j ≥ k, i ≠ j): P(X) = (I − U_kU_kᵀ) X (I − V_kV_kᵀ) minus the diagonal
      terms for k ≤ i < r (unless ``keep_diagonal``).

    Deliberate deviation: if D is exactly zero (a layer that fine-tuning never
    touched) there is nothing to protect and X is returned unchanged with k = 0;
    the reference would instead zero X's diagonal in an arbitrary SVD basis.

    For a rank-deficient D the diagonal terms with s_i = 0 depend on the arbitrary
    null-space basis that the SVD returns; orthogonality to D holds whatever it is.
    """
    _check_pair(delta, x)
    if not bool(torch.any(delta)):
        return x.clone(), 0
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = protected_rank(s, alpha)
    return _project_with_svd(u, vh, k, x, keep_diagonal, drop_cross_blocks), k


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


def _project_with_svd(
    u: torch.Tensor,
    vh: torch.Tensor,
    k: int,
    x: torch.Tensor,
    keep_diagonal: bool,
    drop_cross_blocks: bool,
) -> torch.Tensor:
    """P(X) from the reduced SVD factors of D: u (m × r), vh (r × n), as in Eq. 9.

    With B = UᵀX (r × n), every removed term is U times a matrix M (r × n):
    P(X) = X − U M, where M's first k rows are (B_k V_k) V_kᵀ (the protected block)
    and row i ≥ k is (b_i · v_i) v_iᵀ (the diagonal term u_iᵀXv_i). Dropping the
    cross blocks instead removes U_k B_k and (I − U_kU_kᵀ) X V_k V_kᵀ, which is
    U_kU_kᵀX + XV_kV_kᵀ − U_kU_kᵀXV_kV_kᵀ.
    """
    u = u.to(x.dtype)
    vh = vh.to(x.dtype)
    b = u.mT @ x  # r × n
    vh_k = vh[:k]
    m_rows = torch.empty_like(b)
    if drop_cross_blocks:
        m_rows[:k] = b[:k]
    else:
        m_rows[:k] = (b[:k] @ vh_k.mT) @ vh_k
    if keep_diagonal:
        m_rows[k:] = 0
    else:
        diag = torch.linalg.vecdot(b[k:], vh[k:])
        torch.mul(vh[k:], diag[:, None], out=m_rows[k:])
    out = x - u @ m_rows
    if drop_cross_blocks and k:
        # (I − U_kU_kᵀ) X V_k V_kᵀ = (X V_k − U_k B_k V_k) V_kᵀ
        xv_k = x @ vh_k.mT - u[:, :k] @ (b[:k] @ vh_k.mT)
        out -= xv_k @ vh_k
    return out
