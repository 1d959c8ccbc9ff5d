"""The rows that train in order: SeqLoRA and SLAO (docs/llm_suite.md, "Experts and trained rows").

**SeqLoRA**: one LoRA fine-tuned task after task; task i starts from the adapter left by
task i − 1 (a fresh AdamW per task). The model after step i is that adapter.

**SLAO** ("Merge before Forget", arXiv 2512.23017), per adapted module, task i ≥ 2:

* start: A ← Qᵀ with Q R = A_{ft,i−1}ᵀ (reduced QR; signs fixed so diag(R) ≥ 0, which
  makes Q unique), B ← B_{ft,i−1};
* fine-tune both on task i, giving A_{ft,i}, B_{ft,i};
* merge: A_merge = A_{ft,i} (replaced), B_merge ← B_merge + i^{−1/2} (B_{ft,i} − B_merge).

Task 1 is trained from the usual initialisation and A_merge, B_merge = A_{ft,1}, B_{ft,1}
(the rule at i = 1). The model after step i is the merged adapter.

Both rows score the model after every step on the tasks of the order seen so far, like
the merging rows. An order's accuracy matrix is cached as JSON (training is cached per
adapter anyway, :mod:`adapters`), keyed by the adapters' chain and the test prompts.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from cmerge.evaluation.results import method_entry
from cmerge.evaluation.runner import score
from cmerge.fsutil import atomic_write
from cmerge.suites.claims import claim_each
from cmerge.suites.llm.adapters import TRAINER_VERSION, AdapterStore
from cmerge.suites.llm.tasks import Prompts

log = logging.getLogger(__name__)

KINDS = {"seqlora": "SeqLoRA", "slao": "SLAO"}
FOLDER = "llm-sequential"
State = dict[str, torch.Tensor]


def slao_init(a_prev: torch.Tensor, b_prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SLAO's start for the next task from the last fine-tuned (A, B): (Qᵀ, B) with Q R = Aᵀ, diag(R) ≥ 0."""
    q, r = torch.linalg.qr(a_prev.double().T, mode="reduced")
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return (q * signs).T.to(a_prev.dtype).contiguous(), b_prev.clone()


def slao_merge_b(b_merge: torch.Tensor, b_ft: torch.Tensor, i: int) -> torch.Tensor:
    """B_merge + i^{−1/2} (B_ft − B_merge), i the 1-based task number."""
    return b_merge + (b_ft - b_merge) * i ** -0.5


def _is_a(name: str) -> bool:
    return name.endswith(".lora_A.weight")


def _partner(name: str) -> str:
    return name.replace(".lora_A.weight", ".lora_B.weight")


def slao_start(ft: Mapping[str, torch.Tensor]) -> State:
    """The start of the next task's training from the last fine-tuned adapter, module by module."""
    out: State = {}
    for name in ft:
        if _is_a(name):
            out[name], out[_partner(name)] = slao_init(ft[name], ft[_partner(name)])
    if set(out) != set(ft):
        raise ValueError("the adapter's A and B factors do not pair up")
    return out


def slao_merge(merged: Mapping[str, torch.Tensor] | None, ft: Mapping[str, torch.Tensor], i: int) -> State:
    """The merged adapter after task i: every A from ``ft``, every B by :func:`slao_merge_b`."""
    if merged is None:
        return {n: t.clone() for n, t in ft.items()}
    return {n: t.clone() if _is_a(n) else slao_merge_b(merged[n], t, i) for n, t in ft.items()}


def run_order(kind: str, order: Sequence[str], train: Mapping[str, Prompts], store: AdapterStore,
              evaluate: Callable[[State, Sequence[str]], tuple[list[float], list[float]]],
              progress: bool = True) -> dict[str, list]:
    """One order of SeqLoRA or SLAO: ``{"matrix", "losses", "adapters"}`` (accuracies in percent).

    ``evaluate(adapter_state, tasks)`` scores an adapter (runner.score's accuracies and losses).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    record: dict[str, list] = {"matrix": [], "losses": [], "adapters": []}
    previous, merged = None, None
    for i, task in enumerate(order, start=1):
        if previous is None:
            adapter = store.get(task, [train[task]], progress=progress)
        else:
            start = previous.state if kind == "seqlora" else slao_start(previous.state)
            adapter = store.get(task, [train[task]], start=start, start_id=f"{kind}:{previous.key}",
                                progress=progress)
        merged = adapter.state if kind == "seqlora" else slao_merge(merged, adapter.state, i)
        accs, losses = evaluate(merged, order[:i])
        record["matrix"].append(accs)
        record["losses"].append(losses)
        record["adapters"].append(adapter.folder.name)
        log.info("%s after %s: %s", KINDS[kind], task, ", ".join(f"{a:.1f}" for a in accs))
        previous = adapter
    return record


def order_key(kind: str, store: AdapterStore, order: Sequence[str], train: Mapping[str, Prompts],
              test: Mapping[str, Prompts]) -> str:
    payload = {"kind": kind, "trainer": TRAINER_VERSION, "recipe": store.trainer.recipe.to_dict(),
               "base": store.base, "train": [train[t].fingerprint() for t in order],
               "test": [test[t].fingerprint() for t in order]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def sequential_entry(kind: str, orders: Sequence[Sequence[str]], train: Mapping[str, Prompts],
                     test: Mapping[str, Prompts], store: AdapterStore, evaluator, to_weights: Callable[[State], dict],
                     progress: bool = True) -> dict:
    """A results-document method entry for SeqLoRA or SLAO over ``orders``, reusing cached orders.

    ``evaluator`` scores the test prompts; ``to_weights`` turns an adapter state into model weights.
    """
    folder = store.root.parent / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{kind}-{order_key(kind, store, o, train, test)}.json" for o in orders]

    def evaluate(state: State, tasks: Sequence[str]) -> tuple[list[float], list[float]]:
        return score(evaluator, to_weights(state), tasks)

    pending = [(o, p) for o, p in zip(orders, paths) if not p.is_file()]
    for order, path in claim_each(pending, lambda item: item[1].with_suffix(".lock")):
        if not path.is_file():
            record = run_order(kind, order, train, store, evaluate, progress=progress)
            atomic_write(path, json.dumps({"order": list(order), **record}) + "\n")
    records = [json.loads(Path(p).read_text()) for p in paths]
    recipe = store.trainer.recipe
    return method_entry([r["matrix"] for r in records], orders, method=None,
                        params={"row": KINDS[kind], "lr": recipe.lr, "steps": recipe.steps},
                        loss_matrices=[r["losses"] for r in records], adapters=[r["adapters"] for r in records])
