"""A toy task suite built in seconds on a CPU: for tests, docs and trying the protocol.

A small MLP body with frozen per-task heads (the paper's CLIP setting in miniature:
the zero-shot heads stay fixed, only the encoder is fine-tuned) is pre-trained briefly
on a mixture of every task, then fine-tuned from that base on each task alone. So the
pre-trained model is mediocre, each expert is good at its own task, and the experts'
task vectors interfere when merged. The suite implements the Evaluator protocol.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from cmerge.evaluation.protocol import TaskResult


class ToyMLP(nn.Module):
    """A shared body (two ReLU layers) and one frozen linear head per task, stacked in ``heads``.

    Like CLIP's zero-shot heads in the paper's setting, the heads are fixed at
    initialisation and only the body is trained, so every task vector lives in the body.
    """

    def __init__(self, dim: int, hidden: int, n_classes: int, n_tasks: int) -> None:
        super().__init__()
        self.n_classes = n_classes
        self.body = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.heads = nn.Linear(hidden, n_classes * n_tasks, bias=False)
        self.heads.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor, task: int) -> torch.Tensor:
        rows = slice(task * self.n_classes, (task + 1) * self.n_classes)
        return self.body(x) @ self.heads.weight[rows].T


@dataclass
class ToySuite:
    """Base weights, one expert per task, and each task's test split; ``evaluate`` scores any state dict."""

    module: ToyMLP
    base: dict[str, torch.Tensor]
    experts: dict[str, dict[str, torch.Tensor]]
    test: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def tasks(self) -> list[str]:
        return list(self.experts)

    @torch.no_grad()
    def evaluate(self, model: Mapping[str, torch.Tensor], tasks: Sequence[str]) -> dict[str, TaskResult]:
        params = {name: t.to(torch.float32) for name, t in model.items()}
        results = {}
        for task in tasks:
            x, y = self.test[task]
            logits = functional_call(self.module, params, (x, self.tasks.index(task)))
            accuracy = (logits.argmax(dim=1) == y).double().mean().item()
            results[task] = TaskResult(accuracy=accuracy, loss=F.cross_entropy(logits, y).item())
        return results


def _train(module: ToyMLP, data: Sequence[tuple[int, torch.Tensor, torch.Tensor]], steps: int, lr: float) -> None:
    optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = sum(F.cross_entropy(module(x, task), y) for task, x, y in data) / len(data)
        loss.backward()
        optimizer.step()


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in module.state_dict().items()}


def build_toy_suite(
    n_tasks: int = 4, seed: int = 0, dim: int = 16, hidden: int = 64, n_classes: int = 4,
    n_train: int = 512, n_test: int = 1024, pretrain_steps: int = 10, finetune_steps: int = 150,
) -> ToySuite:
    """Pre-train briefly on the mixture, fine-tune one expert per task (``task1`` … ``taskN``).

    Task i draws inputs around its own centre and labels them with its own random linear
    teacher. ``pretrain_steps`` sets how good the base is. Deterministic in ``seed``.
    """
    g = torch.Generator().manual_seed(seed)
    tasks = [f"task{i + 1}" for i in range(n_tasks)]
    centres = [2.0 * F.normalize(torch.randn(dim, generator=g), dim=0) for _ in tasks]
    teachers = [torch.randn(n_classes, dim, generator=g) for _ in tasks]

    def split(i: int, n: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        x = centres[i] + torch.randn(n, dim, generator=g)
        return i, x, (x @ teachers[i].T).argmax(dim=1)

    train = [split(i, n_train) for i in range(n_tasks)]
    test = {t: split(i, n_test)[1:] for i, t in enumerate(tasks)}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = ToyMLP(dim, hidden, n_classes, n_tasks)
        _train(module, train, pretrain_steps, lr=1e-2)
        base = _state(module)
        experts = {}
        for i, t in enumerate(tasks):
            module.load_state_dict(base)
            _train(module, [train[i]], finetune_steps, lr=1e-3)
            experts[t] = _state(module)
    module.load_state_dict(base)
    module.eval()
    return ToySuite(module=module, base=base, experts=experts, test=test)
