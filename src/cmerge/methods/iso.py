"""Continual isotropic merging — ours, after Iso-C (docs/methods.md, "Continual isotropic merging").

Iso-C merges task vectors per linear-layer weight by flattening the singular spectrum of
their sum: with Σ_i τ_i = U diag(s) Vᵀ (r singular values),

    Δ = α · s̄ · U Vᵀ,   s̄ = (s_1 + … + s_r) / r,

so every direction the tasks use gets the same weight, and α scales the result.

Continual use, stored per linear-layer weight: S_t (the matrix whose spectrum is flattened) and
M_t = θ_merged − θ0 (so the merged model is element-wise and exports stream); every other
tensor stores M_t only:

- ``accumulate="sum"``: S_t = S_{t−1} + τ_t. After T steps the merge is Iso-C's on the T
  experts, whatever their order.
- ``accumulate="opcm"``: S_t = S_{t−1} + P_{S_{t−1}}(τ_t), OPCM's projection (Eq. 9,
  threshold ``protect``), so each new task vector first loses the directions the merged
  update already uses most.

Each linear-layer weight: M_t = α · s̄(S_t) · U Vᵀ over S_t's nonzero singular pairs (a
rank-deficient S keeps its null space null; on a full-rank S this is Iso-C's rule). Every
other tensor: the running mean of the experts (``others="average"``) or θ0 (``"base"``).
"""
from __future__ import annotations

import torch

from ..linalg import numerical_rank, opcm_project, svd_factors
from .base import Method, Param, TensorStep, TensorUpdate

__all__ = ["Isotropic", "isotropic"]


def isotropic(s_mat: torch.Tensor, scale: float) -> torch.Tensor:
    """α · s̄ · U Vᵀ of one matrix over its R nonzero singular pairs (s̄ their mean), float64; zero for a zero matrix."""
    u, s, v = svd_factors(s_mat.to(torch.float64))
    rank = numerical_rank(s)
    if rank == 0:
        return torch.zeros(s_mat.shape, dtype=torch.float64, device=s_mat.device)
    u, s, v = u[:, :rank], s[:rank], v[:, :rank]
    return (scale * float(s.mean())) * (u @ v.mT)


class Isotropic(Method):
    name = "iso"
    summary = "The running sum (or OPCM's projected sum) with a flat singular spectrum per linear weight (ours, after Iso-C)."
    params = (
        Param("scale", float, 1.8, "α: the merged linear weight is α · s̄ · U Vᵀ of the accumulated matrix "
              "(default: the best on the text suite's validation split, 8 tasks).", minimum=0.0),
        Param("accumulate", str, "sum", "what is flattened: 'sum' the task vectors' sum (Iso-C on the experts seen "
              "so far) or 'opcm' OPCM's projected sum (Eq. 9).", ("sum", "opcm")),
        Param("protect", float, 0.5, "with accumulate=opcm: OPCM's projection threshold α (Eq. 9).",
              minimum=0.0, maximum=1.0),
        Param("others", str, "average", "every tensor that is not a linear-layer weight: 'average' the running mean "
              "of the experts, 'base' kept at θ0.", ("average", "base")),
    )
    accumulators = ("S", "M")

    def accumulators_of(self, projected: bool) -> tuple[str, ...]:
        return self.accumulators if projected else ("M",)  # S is flattened only for linear weights

    def elementwise(self, projected: bool) -> bool:
        return not projected  # linear weights need an SVD of the whole matrix

    def _accumulate(self, s: TensorStep) -> torch.Tensor:
        if s.t == 1:
            return s.tau.clone()
        prev = s.acc["S"]
        if self.p["accumulate"] == "sum":
            return prev + s.tau
        if s.tau.ndim == 2:
            return prev + opcm_project(prev, s.tau, self.p["protect"])[0]
        return prev + torch.stack([opcm_project(prev[e], s.tau[e], self.p["protect"])[0]
                                   for e in range(s.tau.shape[0])])

    def rule(self, s: TensorStep) -> TensorUpdate:
        if s.projected:
            new = self._accumulate(s)
            mats = [new] if new.ndim == 2 else list(new)  # a 3-D stack (MoE): each expert's matrix on its own
            flat = [isotropic(m, self.p["scale"]).to(new.dtype) for m in mats]
            return TensorUpdate({"S": new, "M": flat[0] if new.ndim == 2 else torch.stack(flat)})
        if self.p["others"] == "base":
            return TensorUpdate({"M": torch.zeros_like(s.tau)})
        mean = s.tau.clone() if s.t == 1 else s.acc["M"] + (s.tau - s.acc["M"]) / s.t
        return TensorUpdate({"M": mean})

    def merged(self, base: torch.Tensor, acc, scalars, *, name: str = "") -> torch.Tensor:
        return base + acc["M"]
