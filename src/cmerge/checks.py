"""Checks on what a step is given, shared by the on-disk state and the in-memory Merger."""
from __future__ import annotations

import math

import torch

from .errors import CmergeError

#: A task vector whose norm is at most this fraction of the base model's norm is "empty":
#: the expert is (a re-saved copy of) the base model, and merging it would only rescale the
#: merge (OPCM's λ grows, the average moves towards θ0).
EMPTY_TOLERANCE = 1e-6
PRECISIONS = {"float32": torch.float32, "float64": torch.float64}


def precision_dtype(precision: str) -> torch.dtype:
    """The compute (and accumulator) dtype of a merge: float32 or float64."""
    try:
        return PRECISIONS[precision]
    except (KeyError, TypeError):
        raise CmergeError(f"precision must be float32 or float64, got {precision!r}.") from None


def norm64(t: torch.Tensor) -> float:
    """‖t‖ in float64, scaled so that it does not overflow where the squares would (|x| > 1e154)."""
    x = t.detach().double().reshape(-1)
    if x.numel() == 0:
        return 0.0
    big = float(x.abs().max())
    if big == 0.0 or not math.isfinite(big):
        return big
    return big * float(torch.linalg.vector_norm(x / big))


def global_norm(norms: list[float]) -> float:
    """‖(n_1, n_2, …)‖ of per-tensor norms, without overflow (math.hypot scales)."""
    return math.hypot(*norms) if norms else 0.0


def check_task_vector(norm: float, base_norm: float | None, description: str, allow_empty: bool) -> None:
    """Refuse a zero (or negligible: ≤ EMPTY_TOLERANCE·‖θ0‖) task vector unless ``allow_empty``."""
    if allow_empty:
        return
    limit = EMPTY_TOLERANCE * base_norm if base_norm else 0.0
    if norm <= limit:
        size = "zero" if norm == 0 else f"{norm:.3g}, below {EMPTY_TOLERANCE:g} of the base model's norm"
        raise CmergeError(f"{description} is identical to the base model (its task vector's norm is {size}); check "
                          f"that you passed the fine-tuned model, or pass --allow-empty to merge it anyway.")
