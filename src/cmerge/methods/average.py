"""Weight averaging (SWA / model soup), continual form (paper Appendix C.1.1, Eq. 32).

θ_SWA^(t) = ((t−1) θ_SWA^(t−1) + θ_t) / t, the mean of the experts (θ0 not included).
Stored as M_t = θ_SWA^(t) − θ0, so M_t = M_{t−1} + (τ_t − M_{t−1}) / t.
"""
from __future__ import annotations

import torch

from ..lowrank import LowRank
from .base import DeltaMethod, TensorStep, TensorUpdate


class Average(DeltaMethod):
    name = "average"
    summary = "Running mean of the experts (SWA), Eq. 32."

    factored = True

    def rule(self, s: TensorStep) -> TensorUpdate:
        if s.t == 1:
            return TensorUpdate({"M": s.tau})
        if isinstance(s.tau, LowRank):  # factors: (1 − 1/t) M + τ / t by concatenation, exactly
            return TensorUpdate({"M": LowRank.cat(s.acc["M"].scaled(1 - 1 / s.t), s.tau.scaled(1 / s.t))})
        m = s.acc["M"]
        return TensorUpdate({"M": torch.sub(s.tau, m).div_(s.t).add_(m)})  # m + (τ − m) / t
