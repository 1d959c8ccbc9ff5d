"""SLAO's merge rule for LoRA adapters (Merge before Forget, arXiv 2512.23017; docs/methods.md "SLAO").

One LoRA is kept for every adapted module. When the i-th adapter arrives (i = t, 1-based):

    A_merge = A_i                                   (replaced)
    B_merge ← B_merge + i^{−1/2} (B_i − B_merge)    (B_merge = B_1 at i = 1)

and the merged model is θ0 + s·B_merge A_merge with the adapter's scaling s. The paper also
trains each adapter starting from A = Qᵀ of QR(A_{i−1}ᵀ) and B = B_{i−1}: that is the
training recipe (the LLM suite's), not part of the merge. Memory O((m + n) r) per module.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from ..errors import CmergeError
from ..io.peft import LoraFactors
from ..lowrank import LowRank
from .base import Method, TensorStep, TensorUpdate

SCALE = "scale:"  # per-tensor sums carrying each module's LoRA scaling into the global numbers


def same_rank(method: str, previous: int | None, incoming: int) -> int:
    """The width of a merge that keeps one LoRA of one rank per module."""
    if incoming == 0:
        return previous or 0
    if previous in (None, 0) or previous == incoming:
        return incoming
    raise CmergeError(f"{method} merges LoRA factors of one rank per module, but an adapter brings rank {incoming} "
                      f"where the merge holds rank {previous}.")


def scales_of(scalars: Mapping[str, Any], sums: Mapping[str, float]) -> dict[str, float]:
    """The modules' LoRA scalings: those known so far, and those a step's rules reported."""
    out = dict(scalars.get("lora_scale") or {})
    out.update({k[len(SCALE):]: v for k, v in sums.items() if k.startswith(SCALE)})
    return out


class SLAO(Method):
    name = "slao"
    summary = "SLAO (arXiv 2512.23017): LoRA factors merged as A ← A_t, B ← B + t^{-1/2}(B_t − B); LoRA adapters only."
    accumulators = ("S",)  # B A of each adapted weight as factors, in the weight's stored layout, without the scaling
    factored = True
    space = "lora"

    def factor_width(self, previous: int | None, incoming: int) -> int:
        return same_rank(self.name, previous, incoming)

    def initial_scalars(self) -> dict[str, Any]:
        return {"lora_scale": {}}

    def rule(self, s: TensorStep) -> TensorUpdate:
        if not isinstance(s.tau, LoraFactors):  # a tensor no LoRA can move (a norm): it stays at θ0
            return TensorUpdate({"S": torch.zeros_like(s.tau)})
        f = s.tau
        if f.rank == 0:  # this adapter does not touch the tensor
            return TensorUpdate({"S": s.acc["S"] if s.t > 1 else f.stored()})
        sums = {SCALE + s.name: f.scale}
        if s.t == 1 or s.acc["S"].width == 0:
            return TensorUpdate({"S": f.stored()}, sums)
        _, b = LoraFactors.unstore(s.acc["S"], f.transposed)
        b = b + (f.b - b) / math.sqrt(s.t)
        return TensorUpdate({"S": LoraFactors(f.a, b, f.scale, f.transposed).stored()}, sums)

    def finalize(self, scalars: Mapping[str, Any], sums: Mapping[str, float], t: int) -> dict[str, Any]:
        return {**scalars, "lora_scale": scales_of(scalars, sums)}

    def merged(self, base: torch.Tensor, acc: Mapping[str, torch.Tensor], scalars: Mapping[str, Any], *,
               name: str = "") -> torch.Tensor:
        return base + scalars["lora_scale"].get(name, 1.0) * acc["S"]

    def merged_delta(self, acc: Mapping[str, Any], scalars: Mapping[str, Any], *, name: str = "") -> Any:
        scale = scalars["lora_scale"].get(name, 1.0)
        s = acc["S"]
        return s.scaled(scale) if isinstance(s, LowRank) else scale * s
