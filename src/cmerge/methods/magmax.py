"""MagMax, constant-memory form (Marczak et al. 2024; paper's baselines).

Keep, entry by entry, the task-vector value of largest magnitude seen so far (ties go to
the newer model): τ_max ← where(|τ_t| ≥ |τ_max|, τ_t, τ_max); θ_merged = θ0 + scale · τ_max.
"""
from __future__ import annotations

import torch

from .base import DeltaMethod, Param, TensorStep, TensorUpdate


class MagMax(DeltaMethod):
    name = "magmax"
    summary = "Keep the largest-magnitude task-vector entry seen so far; θ0 + scale·τ_max."
    params = (Param("scale", float, 0.5, "scaling factor applied to the max-magnitude task vector."),)

    def merged_scale(self) -> float:
        """θ_merged = θ0 + scale·τ_max; a corrected merged model gives τ_max = (θ_merged − θ0) / scale,
        so later models compete with the corrected entries."""
        return self.p["scale"]

    def rule(self, s: TensorStep) -> TensorUpdate:
        if s.t == 1:
            return TensorUpdate({"M": s.tau})
        m = s.acc["M"]
        return TensorUpdate({"M": torch.where(s.tau.abs() >= m.abs(), s.tau, m)})
