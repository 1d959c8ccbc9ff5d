"""Plain interpolation (EMA): holistic CMM's ablation of Fisher merging without the Fisher weights.

With α the weight of the new model:

    θ̄_1 = θ_1,   θ̄_t = θ̄_{t−1} + α_t (θ_t − θ̄_{t−1}) = (1 − α_t) θ̄_{t−1} + α_t θ_t

an exponential moving average of the experts (θ0 not included). This is ``fisher_merge``
with all Fisher values equal (ω = α everywhere), so it needs no second moments. Stored as
M_t = θ̄_t − θ0, so M_t = M_{t−1} + α_t (τ_t − M_{t−1}). ``alpha_schedule=running`` uses
α_t = 1/t, which is ``average`` (the mean of the experts).
"""
from __future__ import annotations

from .base import DeltaMethod, TensorStep, TensorUpdate
from .fisher_merge import ALPHA_PARAMS, alpha_at


class EMA(DeltaMethod):
    name = "ema"
    summary = "Plain interpolation θ̄_t = (1−α) θ̄_{t−1} + α θ_t: fisher_merge without the Fisher weights."
    params = ALPHA_PARAMS

    def rule(self, s: TensorStep) -> TensorUpdate:
        if s.t == 1:
            return TensorUpdate({"M": s.tau})
        m = s.acc["M"]
        return TensorUpdate({"M": m + alpha_at(self.p, s.t) * (s.tau - m)})
