"""OPCM applied to LoRA factors A and B separately — the way the seed's LLM leaderboard ran it.

Not OPCM on the task vector ΔW = s·B A (that is ``opcm`` on the same adapters, exact in a
factored state). Here every adapted module's A (r × in) and B (out × r) are two weight
matrices of their own, with task vectors A_t and B_t (LoRA's own zero point): per factor
(docs/methods.md "OPCM on LoRA factors"),

    S^A_t = S^A_{t−1} + P_{S^A_{t−1}}(A_t),   S^B_t = S^B_{t−1} + P_{S^B_{t−1}}(B_t)

with OPCM's projection (Eq. 9) and λ_t = ‖S_t‖ / mean_i ‖(A_i, B_i)‖ over all factors
(Eq. 10); the merged factors are S/λ_t, so the merged model is θ0 + s·(S^B/λ_t)(S^A/λ_t).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from ..io.peft import LoraFactors
from ..linalg import opcm_project
from ..lowrank import LowRank
from .base import Method, TensorStep, TensorUpdate, sq_norm
from .opcm import OPCM
from .slao import SCALE, same_rank, scales_of


class OPCMFactors(OPCM):
    name = "opcm_ab"
    summary = ("OPCM on LoRA factors A and B separately (the seed leaderboard's way; not OPCM on ΔW, which is "
               "`opcm`); LoRA adapters only.")
    space = "lora"

    def factor_width(self, previous: int | None, incoming: int) -> int:
        return same_rank(self.name, previous, incoming)

    def initial_scalars(self) -> dict[str, Any]:
        return {**super().initial_scalars(), "lora_scale": {}}

    def rule(self, s: TensorStep) -> TensorUpdate:
        if not isinstance(s.tau, LoraFactors):  # a tensor no LoRA can move (a norm): it stays at θ0
            return TensorUpdate({"S": torch.zeros_like(s.tau)}, {"factor_sq": 0.0, "proj_sq": 0.0, "s_sq": 0.0})
        f = s.tau
        prev = s.acc.get("S") if s.t > 1 else None
        if f.rank == 0:  # untouched by this adapter: S stays
            new = prev if prev is not None else f.stored()
            return TensorUpdate({"S": new}, {"factor_sq": 0.0, "proj_sq": 0.0,
                                             "s_sq": sq_norm(new.left) + sq_norm(new.right)})
        sums = {SCALE + s.name: f.scale, "factor_sq": sq_norm(f.a) + sq_norm(f.b)}
        note = None
        if prev is None or prev.width == 0:
            sa, sb = f.a, f.b
            sums["proj_sq"] = sums["factor_sq"]
        else:
            pa0, pb0 = LoraFactors.unstore(prev, f.transposed)
            opts = dict(keep_diagonal=self.p["keep_diagonal"], drop_cross_blocks=self.p["drop_cross_blocks"])
            pa, ka = opcm_project(pa0, f.a, self.p["alpha"], **opts)
            pb, kb = opcm_project(pb0, f.b, self.p["alpha"], **opts)
            sums["proj_sq"] = sq_norm(pa) + sq_norm(pb)
            sa, sb = pa0 + pa, pb0 + pb
            note = [(ka + kb) / 2, f.rank]
        sums["s_sq"] = sq_norm(sa) + sq_norm(sb)
        return TensorUpdate({"S": LoraFactors(sa, sb, f.scale, f.transposed).stored()}, sums, note)

    def finalize(self, scalars: Mapping[str, Any], sums: Mapping[str, float], t: int) -> dict[str, Any]:
        """OPCM's λ_t (Eq. 10) with the norms of the factors: ‖(A_t, B_t)‖ over every adapted module."""
        raw = {**sums, "tau_sq": sums.get("factor_sq", 0.0)}
        out = super().finalize({k: v for k, v in scalars.items() if k != "lora_scale"}, raw, t)
        return {**out, "lora_scale": scales_of(scalars, sums)}

    def merged(self, base: torch.Tensor, acc: Mapping[str, torch.Tensor], scalars: Mapping[str, Any], *,
               name: str = "") -> torch.Tensor:
        return base + self._scale(scalars, name) * acc["S"]

    def merged_delta(self, acc: Mapping[str, Any], scalars: Mapping[str, Any], *, name: str = "") -> Any:
        c, s = self._scale(scalars, name), acc["S"]
        return s.scaled(c) if isinstance(s, LowRank) else c * s

    @staticmethod
    def _scale(scalars: Mapping[str, Any], name: str) -> float:
        """s / λ_t²: the merged factors are S^A/λ_t and S^B/λ_t."""
        return scalars["lora_scale"].get(name, 1.0) / scalars["lambda"] ** 2

    unmerge = Method.unmerge  # the factors cannot be recovered from a corrected product
