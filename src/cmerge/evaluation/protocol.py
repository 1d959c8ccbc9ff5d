"""The evaluator protocol: what a task suite must provide to be evaluated continually."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Protocol, Sequence, runtime_checkable

import torch


@dataclass(frozen=True)
class TaskResult:
    """Accuracy in [0, 1] and mean loss of one model on one task's test split."""

    accuracy: float
    loss: float = float("nan")


@runtime_checkable
class Evaluator(Protocol):
    """Anything that scores a model (a state dict over the base's tensor names) on named tasks."""

    def evaluate(self, model: Mapping[str, torch.Tensor], tasks: Sequence[str]) -> dict[str, TaskResult]:
        ...
