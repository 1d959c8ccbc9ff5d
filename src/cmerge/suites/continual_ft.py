"""The continual fine-tuning baseline (OPCM paper, Appendix C.1.1) on the text suite.

Task t is fine-tuned starting from the model left by task t − 1, with the same recipe
(a fresh optimizer per task, as separate fine-tuning runs would have), and the model is
scored after each task on the tasks of the order seen so far. Each order's accuracy and
loss matrices are cached as JSON, keyed like the experts (recipe, the ordered tasks'
data, the backbone, the evaluation settings), because one order of 8 tasks costs 8
fine-tuning runs. Runs that share the cache split the orders between them (a lock per
order), so two processes can compute one row's orders in parallel.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
from pathlib import Path
from typing import Mapping, Sequence

import torch

from cmerge.evaluation.results import method_entry
from cmerge.evaluation.runner import score
from cmerge.suites.backbone import base_fingerprint
from cmerge.suites.claims import claim_each
from cmerge.suites.experts import TRAINER_VERSION, task_fingerprint
from cmerge.suites.finetune import FinetuneRecipe, finetune
from cmerge.suites.heads import zero_shot_head
from cmerge.suites.text import TextSuiteEvaluator
from cmerge.suites.text_data import TextTask, cache_root

log = logging.getLogger(__name__)

METHOD_NAME = "continual fine-tuning"


def continual_finetuning(
    backbone: torch.nn.Module, tokenizer, tasks: Mapping[str, TextTask], order: Sequence[str],
    recipe: FinetuneRecipe, evaluator: TextSuiteEvaluator, *, progress: bool = True,
) -> dict[str, list]:
    """``{"matrix": ..., "losses": ...}`` of one order: lower-triangular, accuracies in percent.

    ``backbone`` holds the pre-trained weights and is not modified.
    """
    model = copy.deepcopy(backbone)
    anchor = {n: p.detach() for n, p in backbone.named_parameters()} if recipe.linearized else None
    record: dict[str, list] = {"matrix": [], "losses": []}
    for t, name in enumerate(order):
        head = zero_shot_head(backbone, tokenizer, tasks[name].descriptions, recipe.max_len)
        finetune(model, tokenizer, tasks[name].train, head, recipe, anchor=anchor,
                 progress=f"continual FT {t + 1}/{len(order)} {name}" if progress else False)
        accs, losses = score(evaluator, model.state_dict(), order[: t + 1])
        record["matrix"].append(accs)
        record["losses"].append(losses)
        log.info("continual FT after %s: %s", name, ", ".join(f"{a:.1f}" for a in accs))
    return record


def order_key(recipe: FinetuneRecipe, tasks: Mapping[str, TextTask], order: Sequence[str], base: str,
              evaluator: TextSuiteEvaluator) -> str:
    payload = {"trainer": TRAINER_VERSION, "recipe": recipe.to_dict(), "base": base,
               "order": [task_fingerprint(tasks[name]) for name in order],
               "eval": [evaluator.max_len, evaluator.logit_scale]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def continual_finetuning_entry(
    backbone: torch.nn.Module, tokenizer, base_folder: Path, tasks: Mapping[str, TextTask],
    orders: Sequence[Sequence[str]], recipe: FinetuneRecipe, evaluator: TextSuiteEvaluator, *,
    cache_dir: Path | None = None, progress: bool = True,
) -> dict:
    """A results-document method entry (``results.method_entry``) for continual fine-tuning,
    reusing each order's cached matrices. Its ``params`` name the recipe's lr and steps."""
    folder = (Path(cache_dir) if cache_dir is not None else cache_root()) / "continual-ft"
    folder.mkdir(parents=True, exist_ok=True)
    base = base_fingerprint(base_folder)
    paths = [folder / f"{order_key(recipe, tasks, order, base, evaluator)}.json" for order in orders]
    # Runs sharing the cache split the orders: each is claimed with a lock beside its file.
    pending = [(order, path) for order, path in zip(orders, paths) if not path.is_file()]
    for order, path in claim_each(pending, lambda item: item[1].with_suffix(".lock")):
        if not path.is_file():  # not cached earlier, nor by another run while this one waited
            record = continual_finetuning(backbone, tokenizer, tasks, order, recipe, evaluator, progress=progress)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"order": list(order), **record}) + "\n")
            tmp.replace(path)
    records = [json.loads(path.read_text()) for path in paths]
    params = {"lr": recipe.lr, "steps": recipe.steps, **({"linearized": True} if recipe.linearized else {})}
    return method_entry([r["matrix"] for r in records], orders, method=None, params=params,
                        loss_matrices=[r["losses"] for r in records])
