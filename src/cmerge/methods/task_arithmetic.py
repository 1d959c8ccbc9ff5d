"""Continual task arithmetic (paper Baseline 3.3, Eq. 5 / Eq. 35).

θ_merged^(0) = θ0,  θ_merged^(t) = θ_merged^(t−1) + λ τ_t.  Stored as M_t = θ_merged^(t) − θ0.
The paper picks λ from {0.1, …, 1.0}: 0.3 for 8 tasks, 0.1 for 14 and 20.
"""
from __future__ import annotations

from ..lowrank import LowRank
from .base import DeltaMethod, Param, TensorStep, TensorUpdate


class TaskArithmetic(DeltaMethod):
    name = "task_arithmetic"
    summary = "Add λ·τ_t to the merged model at every step (Eq. 35)."
    params = (Param("lam", float, 0.3, "scaling factor λ of every task vector (paper: 0.3 for 8 tasks, 0.1 for 14/20)."),)

    factored = True

    def rule(self, s: TensorStep) -> TensorUpdate:
        if isinstance(s.tau, LowRank):  # factors: M_{t−1} + λ τ_t by concatenation, exactly
            step_lr = s.tau.scaled(self.p["lam"])
            return TensorUpdate({"M": step_lr if s.t == 1 else LowRank.cat(s.acc["M"], step_lr)})
        step = self.p["lam"] * s.tau
        return TensorUpdate({"M": step if s.t == 1 else step.add_(s.acc["M"])})  # M_{t−1} + λ τ_t
