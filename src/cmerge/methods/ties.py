"""Continual TIES-merging (paper Appendix C.1.1, Eq. 38).

TIES (Yadav et al. 2023) on the pair {M_{t−1}, τ_t}, where M_{t−1} = θ_merged^(t−1) − θ0:
trim each vector to its top-``density`` magnitudes, elect each entry's sign as the sign of
the sum of the trimmed values, and add up the trimmed entries that agree with it
(disjoint sum). Then (variant ``paper``, Eq. 38)

    M_1 = λ τ_1,   M_t = λ · TIES(M_{t−1}, τ_t)

Variant ``reference`` follows the public code, which adds the result to the previous
merged model instead: M_t = M_{t−1} + λ · TIES(M_{t−1}, τ_t), counting M_{t−1} twice.

Trimming is per tensor (the top ``density`` fraction of each tensor's entries), which is
what makes the method streamable; the reference code trims over the whole flattened model.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .base import DeltaMethod, Param, TensorStep, TensorUpdate


def trim_top_magnitude(x: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ⌈density · numel⌉ entries of largest magnitude, zero the rest."""
    n = x.numel()
    k = min(n, max(1, math.ceil(density * n)))
    if k == n:
        return x.clone()
    flat = x.reshape(-1)
    idx = torch.topk(flat.abs(), k, sorted=False).indices
    out = torch.zeros_like(flat)
    out[idx] = flat[idx]
    return out.reshape(x.shape)


def elect_sign(trimmed: Sequence[torch.Tensor]) -> torch.Tensor:
    """The sign of the sum of the trimmed vectors (TIES' "elect"), entry by entry."""
    return torch.sign(torch.stack(list(trimmed)).sum(dim=0))


def disjoint_sum(trimmed: Sequence[torch.Tensor], sign: torch.Tensor) -> torch.Tensor:
    """Sum of the entries whose sign agrees with the elected sign (zeros never agree)."""
    out = torch.zeros_like(sign)
    for v in trimmed:
        out += torch.where(torch.sign(v) == sign, v, torch.zeros_like(v))
    return out


def ties(vectors: Sequence[torch.Tensor], density: float) -> torch.Tensor:
    """TIES-merging of task vectors (trim, elect sign, disjoint sum), without the λ."""
    trimmed = [trim_top_magnitude(v, density) for v in vectors]
    return disjoint_sum(trimmed, elect_sign(trimmed))


class Ties(DeltaMethod):
    name = "ties"
    summary = "Continual TIES-merging of the merged task vector and the new one (Eq. 38)."
    params = (
        Param("density", float, 0.2, "fraction of entries kept per tensor when trimming (top magnitudes).",
              minimum=0.0, maximum=1.0, exclusive_minimum=True),
        Param("lam", float, 0.3, "scaling factor λ (paper: the same as task arithmetic's)."),
        Param("variant", str, "paper", "'paper': M_t = λ·TIES(M_{t−1}, τ_t) (Eq. 38); 'reference': the public code's "
              "M_t = M_{t−1} + λ·TIES(M_{t−1}, τ_t).", ("paper", "reference")),
    )

    def elementwise(self, projected: bool) -> bool:
        return False  # the trim keeps each tensor's top magnitudes: it needs the whole tensor

    def rule(self, s: TensorStep) -> TensorUpdate:
        lam = self.p["lam"]
        if s.t == 1:
            return TensorUpdate({"M": lam * s.tau})
        prev = s.acc["M"]
        merged = lam * ties([prev, s.tau], self.p["density"])
        return TensorUpdate({"M": merged if self.p["variant"] == "paper" else prev + merged})
