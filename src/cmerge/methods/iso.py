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
- ``keep`` = f < 1: each τ_t enters the rule above as its truncated SVD, its top ⌈f · r⌉
  singular pairs of r nonzero ones (as task-singular-vector merges truncate each task), so the
  directions a task barely uses are not lifted to full weight by the flattening.

Each linear-layer weight: M_t = α · s̄(S_t) · U Vᵀ over S_t's nonzero singular pairs (a
rank-deficient S keeps its null space null; on a full-rank S this is Iso-C's rule). With
``power`` p ≠ 0 the spectrum is reshaped instead of flattened: M_t = α · U diag(w) Vᵀ,
w_i = s̄ · s_iᵖ / mean_j(s_jᵖ), the same mean singular value (p = 0 is the flat rule). Nonzero, in
the flattening and in the projection's rank: above `linalg.rank_rtol` of S as stored, so that in
a float32 state the rounding of a rank-deficient S (LoRA deltas, truncated task vectors) is
neither lifted to s̄ nor protected as directions. Every other tensor: the running mean of the
experts (``others="average"``) or θ0 (``"base"``).
"""
from __future__ import annotations

import math

import torch

from ..linalg import numerical_rank, opcm_project, rank_rtol, svd_factors
from .base import Method, Param, TensorStep, TensorUpdate

__all__ = ["Isotropic", "isotropic", "truncated"]


def isotropic(s_mat: torch.Tensor, scale: float, power: float = 0.0) -> torch.Tensor:
    """α · s̄ · U Vᵀ of one matrix over its R nonzero singular pairs (s̄ their mean), float64; zero for a zero matrix.

    With ``power`` p ≠ 0, α · U diag(w) Vᵀ with w_i = s̄ · s_iᵖ / mean_j(s_jᵖ): the same subspaces and
    the same mean singular value, the spectrum reshaped to sᵖ (p = 0 the flat one; p < 0 weighs S's
    weaker directions above its stronger ones). Nonzero: above `linalg.rank_rtol` of the matrix as
    given, so a rank-deficient matrix stored in float32 keeps its null space null instead of
    lifting its rounding to s̄ (or, for p < 0, above it)."""
    u, s, v = svd_factors(s_mat.to(torch.float64))
    rank = numerical_rank(s, rank_rtol(s_mat))
    if rank == 0:
        return torch.zeros(s_mat.shape, dtype=torch.float64, device=s_mat.device)
    u, s, v = u[:, :rank], s[:rank], v[:, :rank]
    if power == 0.0:
        return (scale * float(s.mean())) * (u @ v.mT)
    w = s.pow(power)
    return (u * (scale * float(s.mean()) * w / w.mean())) @ v.mT


def truncated(tau: torch.Tensor, fraction: float) -> torch.Tensor:
    """τ on its top ⌈fraction · r⌉ singular pairs (r its nonzero ones, as in `isotropic`), float64; τ itself in
    float64 for fraction 1."""
    x = tau.to(torch.float64)
    if fraction >= 1.0:
        return x
    u, s, v = svd_factors(x)
    k = math.ceil(fraction * numerical_rank(s, rank_rtol(tau)))
    return (u[:, :k] * s[:k]) @ v[:, :k].mT


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
        Param("keep", float, 1.0, "the fraction f of each task vector's nonzero singular pairs it enters S with "
              "(its top ⌈f · r⌉; 1 keeps all).", minimum=0.0, maximum=1.0, exclusive_minimum=True),
        Param("power", float, 0.0, "p: the merged linear weight's singular values are α · s̄ · sᵖ / mean(sᵖ) of the "
              "accumulated matrix's s (0: flat, Iso-C's rule; p < 0 weighs its weaker directions above its "
              "stronger ones).", minimum=-1.0, maximum=1.0),
        Param("others", str, "average", "every tensor that is not a linear-layer weight: 'average' the running mean "
              "of the experts, 'base' kept at θ0.", ("average", "base")),
    )
    accumulators = ("S", "M")

    def accumulators_of(self, projected: bool) -> tuple[str, ...]:
        return self.accumulators if projected else ("M",)  # S is flattened only for linear weights

    def elementwise(self, projected: bool) -> bool:
        return not projected  # linear weights need an SVD of the whole matrix

    def _kept(self, tau: torch.Tensor) -> torch.Tensor:
        if self.p["keep"] >= 1.0:
            return tau
        if tau.ndim == 2:
            return truncated(tau, self.p["keep"]).to(tau.dtype)
        return torch.stack([truncated(m, self.p["keep"]).to(tau.dtype) for m in tau])

    def _accumulate(self, s: TensorStep) -> torch.Tensor:
        tau = self._kept(s.tau)
        if s.t == 1:
            return tau.clone()
        prev = s.acc["S"]
        if self.p["accumulate"] == "sum":
            return prev + tau
        if tau.ndim == 2:
            return prev + opcm_project(prev, tau, self.p["protect"], rtol=rank_rtol(prev))[0]
        return prev + torch.stack([opcm_project(prev[e], tau[e], self.p["protect"], rtol=rank_rtol(prev))[0]
                                   for e in range(tau.shape[0])])

    def rule(self, s: TensorStep) -> TensorUpdate:
        if s.projected:
            new = self._accumulate(s)
            mats = [new] if new.ndim == 2 else list(new)  # a 3-D stack (MoE): each expert's matrix on its own
            flat = [isotropic(m, self.p["scale"], self.p["power"]).to(new.dtype) for m in mats]
            return TensorUpdate({"S": new, "M": flat[0] if new.ndim == 2 else torch.stack(flat)})
        if self.p["others"] == "base":
            return TensorUpdate({"M": torch.zeros_like(s.tau)})
        mean = s.tau.clone() if s.t == 1 else s.acc["M"] + (s.tau - s.acc["M"]) / s.t
        return TensorUpdate({"M": mean})

    def merged(self, base: torch.Tensor, acc, scalars, *, name: str = "") -> torch.Tensor:
        return base + acc["M"]
