"""MagMax, constant-memory form (Marczak et al. 2024; paper's baselines).

Keep, entry by entry, the task-vector value of largest magnitude seen so far (ties go to
the newer model): τ_max ← where(|τ_t| ≥ |τ_max|, τ_t, τ_max); θ_merged = θ0 + scale · τ_max.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from ..errors import CmergeError
from .base import Method, Param, TensorStep, TensorUpdate


class MagMax(Method):
    name = "magmax"
    summary = "Keep the largest-magnitude task-vector entry seen so far; θ0 + scale·τ_max."
    params = (Param("scale", float, 0.5, "scaling factor applied to the max-magnitude task vector."),)
    accumulators = ("M",)

    def elementwise(self, projected: bool) -> bool:
        return True  # element by element

    def rule(self, s: TensorStep) -> TensorUpdate:
        if s.t == 1:
            return TensorUpdate({"M": s.tau})
        m = s.acc["M"]
        return TensorUpdate({"M": torch.where(s.tau.abs() >= m.abs(), s.tau, m)})

    def merged(self, base: torch.Tensor, acc: Mapping[str, torch.Tensor], scalars: Mapping[str, Any]) -> torch.Tensor:
        return base + self.p["scale"] * acc["M"]

    def unmerge(self, base: torch.Tensor, merged: torch.Tensor, acc: Mapping[str, torch.Tensor],
                scalars: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """τ_max = (θ_merged − θ0) / scale: later models then compete with the corrected entries."""
        if self.p["scale"] == 0:
            raise CmergeError("magmax with scale 0 always returns the base model, so it cannot take a corrected "
                              "merged model.")
        return {"M": (merged - base) / self.p["scale"]}
