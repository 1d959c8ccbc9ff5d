"""Low-rank matrices kept as factors, and OPCM's projection computed on them exactly.

A LoRA adapter moves a weight W (m × n) by ΔW = s·B·A, a matrix of rank ≤ r. Held as
factors ΔW = L Rᵀ (L m × w, R n × w), every exact operation of the methods that stay
linear in their inputs keeps that form: task arithmetic and averaging concatenate factors,
and OPCM's projection of X = L_x R_xᵀ against D = L_d R_dᵀ lives in span[L_d, L_x] ×
span[R_d, R_x] (docs/methods.md, "OPCM on low-rank task vectors"): a QR of each stacked
side and an SVD of the small core give D's exact thin SVD, and P(X) is computed in the
core's coordinates — O((m + n)·K²) for K = w_d + w_x instead of an SVD of an m × n matrix.

Everything here is pure math on tensors; the factors are combined in float64 and the
results come back in the inputs' dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .linalg import numerical_rank, protected_rank

__all__ = ["LowRank", "factored_svd", "opcm_project_lowrank", "truncate"]


@dataclass
class LowRank:
    """The matrix L Rᵀ, with L (m × w) and R (n × w); w may be 0 (the zero matrix)."""

    left: torch.Tensor
    right: torch.Tensor

    def __post_init__(self) -> None:
        if self.left.ndim != 2 or self.right.ndim != 2 or self.left.shape[1] != self.right.shape[1]:
            raise ValueError(f"factors must be m × w and n × w, got {tuple(self.left.shape)} and "
                             f"{tuple(self.right.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        return self.left.shape[0], self.right.shape[0]

    @property
    def width(self) -> int:
        return self.left.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.left.dtype

    @classmethod
    def zeros(cls, m: int, n: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> "LowRank":
        return cls(torch.zeros(m, 0, dtype=dtype, device=device), torch.zeros(n, 0, dtype=dtype, device=device))

    def dense(self, rows: slice | None = None) -> torch.Tensor:
        """L Rᵀ, or only rows ``rows`` of it."""
        left = self.left if rows is None else self.left[rows]
        return left @ self.right.mT

    def to(self, *args, **kwargs) -> "LowRank":
        return LowRank(self.left.to(*args, **kwargs), self.right.to(*args, **kwargs))

    def scaled(self, c: float) -> "LowRank":
        return LowRank(self.left * c, self.right)

    def transposed(self) -> "LowRank":
        return LowRank(self.right, self.left)

    def sq_norm(self) -> float:
        """‖L Rᵀ‖_F² = tr((LᵀL)(RᵀR)), in float64."""
        if self.width == 0:
            return 0.0
        gl = self.left.to(torch.float64).mT @ self.left.to(torch.float64)
        gr = self.right.to(torch.float64).mT @ self.right.to(torch.float64)
        return float(torch.sum(gl * gr))

    def padded(self, width: int) -> "LowRank":
        """The same matrix with zero columns appended to both factors, up to ``width``."""
        extra = width - self.width
        if extra < 0:
            raise ValueError(f"cannot pad width {self.width} down to {width}")
        if extra == 0:
            return self
        return LowRank(torch.nn.functional.pad(self.left, (0, extra)), torch.nn.functional.pad(self.right, (0, extra)))

    def isfinite(self) -> bool:
        return bool(torch.isfinite(self.left).all()) and bool(torch.isfinite(self.right).all())

    @staticmethod
    def cat(*parts: "LowRank") -> "LowRank":
        """Σ parts, by concatenating the factors (width = Σ widths)."""
        return LowRank(torch.cat([p.left for p in parts], 1), torch.cat([p.right for p in parts], 1))


def _qr_core(parts: list[LowRank]) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Orthonormal bases Q_u (m × K), Q_v (n × K) of the stacked factors, and each part's K × K core.

    Part i is Q_u C_i Q_vᵀ exactly (float64).
    """
    f64 = torch.float64
    lefts = torch.cat([p.left.to(f64) for p in parts], 1)
    rights = torch.cat([p.right.to(f64) for p in parts], 1)
    qu, ru = torch.linalg.qr(lefts)
    qv, rv = torch.linalg.qr(rights)
    cores, start = [], 0
    for p in parts:
        cols = slice(start, start + p.width)
        cores.append(ru[:, cols] @ rv[:, cols].mT)
        start += p.width
    return qu, qv, cores


def factored_svd(x: LowRank) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The exact thin SVD of L Rᵀ restricted to its numerical rank ρ: U (m × ρ), s (ρ), V (n × ρ), float64."""
    if x.width == 0:
        f64 = torch.float64
        return (torch.zeros(x.shape[0], 0, dtype=f64, device=x.left.device), torch.zeros(0, dtype=f64),
                torch.zeros(x.shape[1], 0, dtype=f64, device=x.left.device))
    qu, qv, (core,) = _qr_core([x])
    u, s, vh = torch.linalg.svd(core)
    rho = numerical_rank(s)
    return qu @ u[:, :rho], s[:rho], qv @ vh[:rho].mT


def _compress(qu: torch.Tensor, qv: torch.Tensor, core: torch.Tensor) -> LowRank:
    """Q_u C Q_vᵀ as factors of its numerical rank (an SVD of the core): L = Q_u U s, R = Q_v V."""
    u, s, vh = torch.linalg.svd(core)
    rho = numerical_rank(s)
    return LowRank(qu @ (u[:, :rho] * s[:rho]), qv @ vh[:rho].mT)


def opcm_project_lowrank(d: LowRank, x: LowRank, alpha: float, *, keep_diagonal: bool = False,
                         drop_cross_blocks: bool = False) -> tuple[LowRank, LowRank, int]:
    """OPCM's projection of X against D, both low rank, exactly; returns (P(X), D + P(X), k).

    With R = rank(D) and D = Σ_{i<R} s_i u_i v_iᵀ (docs/methods.md), the rule for a
    rank-deficient D: k from the cumulative mass of the R nonzero singular values, and

        P(X) = X − U_k (U_kᵀ X V_k) V_kᵀ − Σ_{i=k}^{R−1} (u_iᵀ X v_i) u_i v_iᵀ

    (``keep_diagonal``: without the sum; ``drop_cross_blocks``: (I − U_kU_kᵀ) X (I − V_kV_kᵀ)
    minus the sum). Every term lies in span[L_d, L_x] × span[R_d, R_x], so it is computed in
    the coordinates of a QR of the stacked factors: ⟨P(X), D⟩_F = 0 exactly as in the dense
    rule, and on a full-rank D it is that rule. Results are in X's dtype, both of numerical
    rank ≤ w_d + w_x. A zero D leaves X unchanged (k = 0), as the dense kernel does.
    """
    dtype = x.dtype
    if d.width == 0 or x.width == 0:
        return x.to(dtype), LowRank.cat(d.to(dtype), x.to(dtype)), 0
    qu, qv, (cd, cx) = _qr_core([d, x])
    u, s, vh = torch.linalg.svd(cd)
    big = numerical_rank(s)
    if big == 0:
        return x.to(dtype), _compress(qu, qv, cd + cx).to(dtype), 0
    u, s, v = u[:, :big], s[:big], vh[:big].mT
    k = protected_rank(s, alpha)
    u_k, v_k = u[:, :k], v[:, :k]
    if drop_cross_blocks:
        p = cx - u_k @ (u_k.mT @ cx)
        p = p - (p @ v_k) @ v_k.mT
    else:
        p = cx - u_k @ ((u_k.mT @ cx @ v_k) @ v_k.mT)
    if not keep_diagonal:
        coef = torch.linalg.vecdot(u[:, k:].mT @ cx, v[:, k:].mT)  # u_iᵀ X v_i, k ≤ i < R
        p = p - (u[:, k:] * coef) @ v[:, k:].mT
    proj = _compress(qu, qv, p).to(dtype)
    new = _compress(qu, qv, cd + p).to(dtype)
    return proj, new, k


def truncate(x: LowRank, rank: int) -> tuple[LowRank, float]:
    """The best rank-``rank`` approximation of L Rᵀ (Eckart–Young, through the factored SVD), and its
    relative Frobenius error ‖X − X_r‖ / ‖X‖ (0 when exact)."""
    u, s, v = factored_svd(x)
    total = float(torch.sum(s * s))
    kept = s[:rank]
    err = (max(total - float(torch.sum(kept * kept)), 0.0) / total) ** 0.5 if total > 0 else 0.0
    return LowRank((u[:, :rank] * kept).to(x.dtype), v[:, :rank].to(x.dtype)), err
