"""The continual fine-tuning baseline (OPCM paper, Appendix C.1.1) on the text suite.

Task t is fine-tuned starting from the model left by task t − 1, with the same recipe
(a fresh optimizer per task, as separate fine-tuning runs would have), and the model is
scored after each task on the tasks of the order seen so far. Each order's accuracy and
loss matrices are cached as JSON, keyed like the experts (recipe, the ordered tasks'
data, the backbone, the evaluation settings and split), because one order of 8 tasks
costs 8 fine-tuning runs. Inside an order, the model and the matrix rows so far are
checkpointed after every task (``<key>.partial/``), so an interrupted order resumes at
its next task with the same result as an uninterrupted one (each task's fine-tuning
starts from the saved weights with the recipe's own seed). Runs that share the cache
split the orders between them (a lock per order), so two processes can compute one
row's orders in parallel.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Mapping, Sequence

import torch
from safetensors.torch import load_file, save_file

from cmerge.evaluation.results import method_entry
from cmerge.evaluation.runner import score
from cmerge.fsutil import atomic_write
from cmerge.suites.backbone import base_fingerprint, load_weights
from cmerge.suites.claims import claim_each
from cmerge.suites.experts import TRAINER_VERSION, task_fingerprint
from cmerge.suites.finetune import FinetuneRecipe, finetune
from cmerge.suites.heads import zero_shot_head
from cmerge.suites.text import TextSuiteEvaluator
from cmerge.suites.text_data import TextTask, cache_root

log = logging.getLogger(__name__)

METHOD_NAME = "continual fine-tuning"


RECORD_FILE = "record.json"


def continual_finetuning(
    backbone: torch.nn.Module, tokenizer, tasks: Mapping[str, TextTask], order: Sequence[str],
    recipe: FinetuneRecipe, evaluator: TextSuiteEvaluator, *, progress: bool = True,
    checkpoint: Path | None = None, device: str | torch.device = "cpu",
) -> dict[str, list]:
    """``{"matrix": ..., "losses": ...}`` of one order: lower-triangular, accuracies in percent.

    ``backbone`` holds the pre-trained weights and is not modified. With ``checkpoint``
    (a folder), the weights and rows so far are saved there after every task and, when
    the folder holds an earlier partial run of this order, training resumes after its
    last finished task. Training runs on ``device``.
    """
    model = copy.deepcopy(backbone).to(device)
    anchor = {n: p.detach() for n, p in backbone.named_parameters()} if recipe.linearized else None
    record: dict[str, list] = {"matrix": [], "losses": []}
    resumed = _read_checkpoint(checkpoint, order) if checkpoint is not None else None
    if resumed is not None:
        record, weights = resumed
        load_weights(model, weights)
        log.info("continual FT: resuming %s after task %d of %d", checkpoint.name, len(record["matrix"]), len(order))
    for t in range(len(record["matrix"]), len(order)):
        name = order[t]
        head = zero_shot_head(backbone, tokenizer, tasks[name].descriptions, recipe.max_len)
        finetune(model, tokenizer, tasks[name].train, head, recipe, anchor=anchor,
                 progress=f"continual FT {t + 1}/{len(order)} {name}" if progress else False)
        accs, losses = score(evaluator, model.state_dict(), order[: t + 1])
        record["matrix"].append(accs)
        record["losses"].append(losses)
        log.info("continual FT after %s: %s", name, ", ".join(f"{a:.1f}" for a in accs))
        if checkpoint is not None and t + 1 < len(order):
            _write_checkpoint(checkpoint, order, record, model)
    return record


def _read_checkpoint(folder: Path, order: Sequence[str]) -> tuple[dict[str, list], dict] | None:
    """The rows and weights an interrupted run of ``order`` left in ``folder``, or None."""
    try:
        saved = json.loads((folder / RECORD_FILE).read_text())
        if saved["order"] != list(order):
            return None
        weights = load_file(str(folder / saved["weights"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {"matrix": saved["matrix"], "losses": saved["losses"]}, weights


def _write_checkpoint(folder: Path, order: Sequence[str], record: dict[str, list], model: torch.nn.Module) -> None:
    """Weights after task t as ``step-t.safetensors``, then the record naming them (atomic), then older weights out."""
    folder.mkdir(parents=True, exist_ok=True)
    t = len(record["matrix"])
    weights = f"step-{t:03d}.safetensors"
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(folder / weights))
    atomic_write(folder / RECORD_FILE, json.dumps({"order": list(order), "weights": weights, **record}) + "\n")
    for old in folder.glob("step-*.safetensors"):
        if old.name != weights:
            old.unlink(missing_ok=True)


def order_key(recipe: FinetuneRecipe, tasks: Mapping[str, TextTask], order: Sequence[str], base: str,
              evaluator: TextSuiteEvaluator) -> str:
    payload = {"trainer": TRAINER_VERSION, "recipe": recipe.to_dict(), "base": base,
               "order": [task_fingerprint(tasks[name]) for name in order],
               "eval": [evaluator.max_len, evaluator.logit_scale, evaluator.split]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def continual_finetuning_entry(
    backbone: torch.nn.Module, tokenizer, base_folder: Path, tasks: Mapping[str, TextTask],
    orders: Sequence[Sequence[str]], recipe: FinetuneRecipe, evaluator: TextSuiteEvaluator, *,
    cache_dir: Path | None = None, progress: bool = True, device: str | torch.device = "cpu",
) -> dict:
    """A results-document method entry (``results.method_entry``) for continual fine-tuning,
    reusing each order's cached matrices. Its ``params`` name the recipe's lr and steps.
    The missing orders are trained on ``device``; the cache key does not name it."""
    folder = (Path(cache_dir) if cache_dir is not None else cache_root()) / "continual-ft"
    folder.mkdir(parents=True, exist_ok=True)
    base = base_fingerprint(base_folder)
    paths = [folder / f"{order_key(recipe, tasks, order, base, evaluator)}.json" for order in orders]
    # Runs sharing the cache split the orders: each is claimed with a lock beside its file.
    pending = [(order, path) for order, path in zip(orders, paths) if not path.is_file()]
    for order, path in claim_each(pending, lambda item: item[1].with_suffix(".lock")):
        if not path.is_file():  # not cached earlier, nor by another run while this one waited
            partial = path.with_suffix(".partial")
            record = continual_finetuning(backbone, tokenizer, tasks, order, recipe, evaluator, progress=progress,
                                          checkpoint=partial, device=device)
            atomic_write(path, json.dumps({"order": list(order), **record}) + "\n")
            shutil.rmtree(partial, ignore_errors=True)
    records = [json.loads(path.read_text()) for path in paths]
    params = {"lr": recipe.lr, "steps": recipe.steps, **({"linearized": True} if recipe.linearized else {})}
    return method_entry([r["matrix"] for r in records], orders, method=None, params=params,
                        loss_matrices=[r["losses"] for r in records])
