"""Continual TIES-merging (paper Appendix C.1.1, Eq. 38).

TIES (Yadav et al. 2023) on the pair {M_{t−1}, τ_t}, where M_{t−1} = θ_merged^(t−1) − θ0:
trim each vector to its top-``density`` magnitudes, elect each entry's sign as the sign of
the sum of the trimmed values, and add up the trimmed entries that agree with it
(disjoint sum). Then (variant ``paper``, Eq. 38)

    M_1 = λ τ_1,   M_t = λ · TIES(M_{t−1}, τ_t)

Variant ``reference`` follows the public code, which adds the result to the previous
merged model instead: M_t = M_{t−1} + λ · TIES(M_{t−1}, τ_t), counting M_{t−1} twice; it
also keeps the public code's count (⌊density · n⌋ + 1 entries, and every entry tied with
the smallest kept magnitude) and gives an entry whose trimmed values sum to exactly 0 the
majority sign, where the paper variant keeps ⌈density · n⌉ and drops such entries.

Trimming is per tensor (the top ``density`` fraction of each tensor's entries), which is
what makes the method streamable; the reference code trims over the whole flattened model.
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Sequence

import torch

from .base import DeltaMethod, Param, TensorStep, TensorUpdate


def kept_count(density: float, n: int, rule: str = "paper") -> int:
    """How many of n entries a trim to ``density`` keeps.

    ``paper``: ⌈density · n⌉, with density read as the decimal it was written as (0.07 · 100
    keeps 7, where the float product 7.000000000000001 would round up to 8). ``reference``:
    the public code's ⌊density · n⌋ + 1 (its float product, truncated), the smallest kept
    magnitude then keeping its ties too. At least 1, at most n.
    """
    if rule == "paper":
        k = math.ceil(Fraction(repr(float(density))) * n)
    else:
        k = int(density * n) + 1
    return min(n, max(1, k))


def trim_top_magnitude(x: torch.Tensor, density: float, rule: str = "paper") -> torch.Tensor:
    """Keep the `kept_count` entries of largest magnitude, zero the rest (``reference``: with ties)."""
    n = x.numel()
    k = kept_count(density, n, rule)
    if k == n:
        return x.clone()
    flat = x.reshape(-1)
    mags = flat.abs()
    if rule == "paper":
        idx = torch.topk(mags, k, sorted=False).indices
        out = torch.zeros_like(flat)
        out[idx] = flat[idx]
    else:  # every entry at least as large as the k-th largest magnitude
        threshold = torch.kthvalue(mags, n - k + 1).values
        out = torch.where(mags >= threshold, flat, torch.zeros_like(flat))
    return out.reshape(x.shape)


def elect_sign(trimmed: Sequence[torch.Tensor], majority: bool = False) -> torch.Tensor:
    """The sign of the sum of the trimmed vectors (TIES' "elect"), entry by entry.

    ``majority``: an entry whose sum is exactly 0 takes the sign of the sum of every entry
    (+ if that is 0 too), as the public code does; otherwise it has no sign and is dropped.
    """
    total = torch.stack(list(trimmed)).sum(dim=0)
    sign = torch.sign(total)
    if majority:
        sign = torch.where(sign == 0, 1.0 if float(total.sum()) >= 0 else -1.0, sign)
    return sign


def disjoint_sum(trimmed: Sequence[torch.Tensor], sign: torch.Tensor) -> torch.Tensor:
    """Sum of the entries whose sign agrees with the elected sign (zeros never agree)."""
    out = torch.zeros_like(sign)
    for v in trimmed:
        out += torch.where(torch.sign(v) == sign, v, torch.zeros_like(v))
    return out


def ties(vectors: Sequence[torch.Tensor], density: float, rule: str = "paper") -> torch.Tensor:
    """TIES-merging of task vectors (trim, elect sign, disjoint sum), without the λ."""
    trimmed = [trim_top_magnitude(v, density, rule) for v in vectors]
    return disjoint_sum(trimmed, elect_sign(trimmed, majority=rule == "reference"))


class Ties(DeltaMethod):
    name = "ties"
    summary = "Continual TIES-merging of the merged task vector and the new one (Eq. 38)."
    params = (
        Param("density", float, 0.2, "fraction of entries kept per tensor when trimming (top magnitudes).",
              minimum=0.0, maximum=1.0, exclusive_minimum=True),
        Param("lam", float, 0.3, "scaling factor λ (paper: the same as task arithmetic's)."),
        Param("variant", str, "paper", "'paper': M_t = λ·TIES(M_{t−1}, τ_t) (Eq. 38), keeping ⌈density·n⌉ entries; "
              "'reference': the public code's M_t = M_{t−1} + λ·TIES(M_{t−1}, τ_t), keeping ⌊density·n⌋ + 1 "
              "entries and ties, zero sums taking the majority sign.", ("paper", "reference")),
    )

    def elementwise(self, projected: bool) -> bool:
        return False  # the trim keeps each tensor's top magnitudes: it needs the whole tensor

    def rule(self, s: TensorStep) -> TensorUpdate:
        lam = self.p["lam"]
        if s.t == 1:
            return TensorUpdate({"M": lam * s.tau})
        prev = s.acc["M"]
        merged = lam * ties([prev, s.tau], self.p["density"], self.p["variant"])
        return TensorUpdate({"M": merged if self.p["variant"] == "paper" else prev + merged})
