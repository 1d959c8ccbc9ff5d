"""Continual Fisher merging with optimizer second moments (holistic CMM, arXiv 2509.23592).

Each expert comes with F_t, the raw ``exp_avg_sq`` of the AdamW run that produced it (a
diagonal Fisher proxy). With α the weight of the new model, element by element:

    ω_t = α F_t / ((1 − α) F̄_{t−1} + α F_t + ε)
    θ̄_t = θ̄_{t−1} + ω_t ⊙ (θ_t − θ̄_{t−1})
    F̄_t = (1 − α) F̄_{t−1} + α F_t                 (θ̄_1 = θ_1, F̄_1 = F_1)

Stored: M = θ̄ − θ0 and F̄, so memory is constant in the number of experts. ε guards the
elements where both Fisher values are zero (the reference code has none: 0/0 = NaN there);
such elements keep the merged value. ``alpha_schedule=running`` uses α_t = 1/t (the new
model's share of a running mean over t models) instead of a constant α;
``bias_correction`` divides F_t by 1 − β2^step first.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from ..errors import CmergeError
from .base import DeltaMethod, Param, TensorStep, TensorUpdate


#: α and its schedule, shared with ``ema`` (this rule with all Fisher values equal).
ALPHA_PARAMS = (
    Param("alpha", float, 0.4, "weight α ∈ (0, 1] of the new model in the interpolation (fisher_merge: before the "
          "element-wise Fisher weighting).", minimum=0.0, maximum=1.0, exclusive_minimum=True),
    Param("alpha_schedule", str, "constant", "'constant' α, or 'running' α_t = 1/t (a running mean over the "
          "t models merged so far).", ("constant", "running")),
)


def alpha_at(params: Mapping[str, Any], t: int) -> float:
    """α_t, the new model's weight at step t (1-based): the constant α, or 1/t for alpha_schedule=running."""
    return 1.0 / t if params["alpha_schedule"] == "running" else params["alpha"]


def fisher_weight(f_new: torch.Tensor, f_bar: torch.Tensor, alpha: float, eps: float) -> torch.Tensor:
    """ω = α F_t / ((1 − α) F̄_{t−1} + α F_t + ε), element-wise."""
    return alpha * f_new / ((1 - alpha) * f_bar + alpha * f_new + eps)


def adam_bias_correction(meta: Mapping[str, str]) -> float:
    """1 − β2^step from a second-moment file's metadata (Adam's bias correction of v)."""
    try:
        step, beta2 = int(meta["adam_step"]), float(meta["adam_beta2"])
    except (KeyError, ValueError):
        raise CmergeError("bias_correction needs the Fisher file's metadata 'adam_step' and 'adam_beta2'; "
                          "this file has none.") from None
    return 1.0 - beta2 ** step


class FisherMerge(DeltaMethod):
    name = "fisher_merge"
    summary = "Element-wise Fisher-weighted interpolation with AdamW second moments (holistic CMM, Sec. 'during merging')."
    params = ALPHA_PARAMS + (
        Param("eps", float, 1e-12, "ε added to the denominator; elements with zero Fisher in both keep the merged value.",
              minimum=0.0, exclusive_minimum=True),
        Param("bias_correction", bool, False, "divide each F_t by 1 − β2^step (Adam's bias correction), with step and "
              "β2 from the Fisher file's metadata keys 'adam_step' and 'adam_beta2'; the reference uses raw values."),
    )
    accumulators = ("M", "F")
    extra_inputs = {"fisher": "exp_avg_sq.safetensors"}

    def rule(self, s: TensorStep) -> TensorUpdate:
        f_new = s.extra["fisher"]
        if bool((f_new < 0).any()):
            raise CmergeError(f"the fisher values of tensor {s.name!r} are negative in places; second moments are ≥ 0.")
        if self.p["bias_correction"]:
            f_new = f_new / adam_bias_correction(s.extra_meta.get("fisher", {}))
        if s.t == 1:
            return TensorUpdate({"M": s.tau, "F": f_new})
        a = alpha_at(self.p, s.t)
        m, f_bar = s.acc["M"], s.acc["F"]
        omega = fisher_weight(f_new, f_bar, a, self.p["eps"])
        return TensorUpdate({"M": m + omega * (s.tau - m), "F": (1 - a) * f_bar + a * f_new})

    def unmerge(self, base: torch.Tensor, merged: torch.Tensor, acc: Mapping[str, torch.Tensor],
                scalars: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """M = θ_merged − θ0; F̄ is kept (it does not depend on the merged weights)."""
        return {"M": merged - base, "F": acc["F"]}
