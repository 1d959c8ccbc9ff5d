"""The expert cache: one fine-tuned encoder per (task, recipe, backbone), built once.

An expert is a loadable Hugging Face folder::

    <cache>/text-experts/<task>-<key>/
        model.safetensors      the fine-tuned encoder, with exactly the base file's tensor names
        exp_avg_sq.safetensors AdamW's raw second moments, by parameter name (the Fisher proxy)
        recipe.json            recipe, fingerprints, training losses and time
        config.json, tokenizer files, ...   copied from the backbone's folder

``key`` hashes everything that determines the weights: the recipe, the task's data
(name, labels, descriptions, the three splits), the backbone's weights file, the start point and
:data:`TRAINER_VERSION` (bump it when the training code changes its results). A changed
recipe therefore lands in a new folder; nothing is ever overwritten. A folder is written
beside its final name and renamed into place, so a crash leaves no half expert.

The cache root is ``$CMERGE_CACHE`` or ``~/.cache/cmerge`` (:func:`text_data.cache_root`).
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Iterable, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cmerge.fsutil import cached_folder
from cmerge.io import content_hash, copy_aux_files, open_source
from cmerge.suites.backbone import WEIGHTS_FILE, base_fingerprint, load_weights
from cmerge.suites.claims import claim_each
from cmerge.suites.finetune import FinetuneRecipe, finetune
from cmerge.suites.heads import zero_shot_head
from cmerge.suites.text_data import SPLITS, TextTask, cache_root

log = logging.getLogger(__name__)

TRAINER_VERSION = 1
SECOND_MOMENTS_FILE = "exp_avg_sq.safetensors"
INFO_FILE = "recipe.json"


def task_fingerprint(task: TextTask) -> str:
    """sha256 over a task's name, labels, descriptions and its three splits."""
    payload = [task.name, list(task.labels), list(task.descriptions),
               *([list(x) for x in getattr(task, split)] for split in SPLITS)]
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()


def expert_key(recipe: FinetuneRecipe, task: TextTask, base: str, start: str = "base") -> str:
    """16 hex digits naming the expert that ``recipe`` trains on ``task`` from ``start``.

    ``base`` is the backbone's fingerprint (:func:`backbone.base_fingerprint`); ``start``
    is ``"base"`` or the fingerprint of the weights training starts from.
    """
    payload = {"trainer": TRAINER_VERSION, "recipe": recipe.to_dict(), "task": task_fingerprint(task),
               "base": base, "start": start}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def expert_dir(cache_dir: Path, task_name: str, key: str) -> Path:
    return Path(cache_dir) / "text-experts" / f"{task_name}-{key}"


def is_expert(folder: Path) -> bool:
    """Whether ``folder`` is a complete expert (the info file is written last)."""
    folder = Path(folder)
    return all((folder / f).is_file() for f in (WEIGHTS_FILE, SECOND_MOMENTS_FILE, INFO_FILE))


def write_expert(
    folder: Path, state: Mapping[str, torch.Tensor], exp_avg_sq: Mapping[str, torch.Tensor],
    base_folder: Path, info: Mapping, moments_metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write an expert folder atomically; tensors the model does not hold are copied from the base.

    The weights file has exactly the base file's tensor names, dtypes and shapes; a name
    in ``state`` that the base lacks, or a shape that differs, is refused.
    ``moments_metadata`` goes into the second-moments file's header (``adam_step``,
    ``adam_beta2``: what the Fisher method's optional bias correction reads).
    """
    folder = Path(folder)
    base_file = Path(base_folder) / WEIGHTS_FILE
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(base_file), framework="pt") as base:
        names = list(base.keys())
        extra = sorted(set(state) - set(names))
        if extra:
            raise ValueError(f"the fine-tuned state has tensor {extra[0]!r}, which {base_file} lacks")
        for name in names:
            ref = base.get_tensor(name)
            t = state[name].detach().to(ref.dtype).contiguous() if name in state else ref
            if t.shape != ref.shape:
                raise ValueError(f"tensor {name!r} has shape {tuple(t.shape)}, the base's {tuple(ref.shape)}")
            tensors[name] = t

    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        save_file({n: t.detach().contiguous() for n, t in exp_avg_sq.items()}, str(tmp / SECOND_MOMENTS_FILE),
                  metadata=dict(moments_metadata or {}))
        copy_aux_files(Path(base_folder), tmp)
        (tmp / INFO_FILE).write_text(json.dumps(dict(info), indent=2) + "\n")

    return cached_folder(folder, fill, is_expert)  # another writer that finished first wins; same content


def load_second_moments(folder: Path) -> dict[str, torch.Tensor]:
    """AdamW's ``exp_avg_sq`` of an expert, by parameter name."""
    return load_file(str(Path(folder) / SECOND_MOMENTS_FILE))


def expert_info(folder: Path) -> dict:
    return json.loads((Path(folder) / INFO_FILE).read_text())


def train_expert(
    backbone: torch.nn.Module, tokenizer, base_folder: Path, task: TextTask, recipe: FinetuneRecipe,
    *, cache_dir: Path | None = None, start: Mapping[str, torch.Tensor] | None = None, progress: bool = True,
    device: str | torch.device = "cpu",
) -> Path:
    """The cached expert of ``task`` under ``recipe``; fine-tunes and writes it when missing.

    ``backbone`` holds the pre-trained weights and is not modified: the head is computed
    from it and training runs on a copy, started from ``start`` (a state dict; default the
    backbone itself). A linearised recipe is linearised at the backbone's weights.
    Training runs on ``device``, which ``info.json`` records; the cache key does not name it (a GPU
    trains the same recipe, with its own generator's dropout masks).
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else cache_root()
    base_fp = base_fingerprint(base_folder)
    start_id = "base" if start is None else content_hash(open_source(start))
    key = expert_key(recipe, task, base_fp, start_id)
    folder = expert_dir(cache_dir, task.name, key)
    if is_expert(folder):
        return folder
    head = zero_shot_head(backbone, tokenizer, task.descriptions, recipe.max_len)
    model = copy.deepcopy(backbone).to(device)
    if start is not None:
        load_weights(model, start)
    anchor = {n: p.detach() for n, p in backbone.named_parameters()} if recipe.linearized else None
    log.info("fine-tuning %s: %d steps, key %s", task.name, recipe.steps, key)
    result = finetune(model, tokenizer, task.train, head, recipe, anchor=anchor,
                      progress=f"fine-tune {task.name}" if progress else False)
    info = {
        "task": task.name, "key": key, "trainer_version": TRAINER_VERSION, "recipe": recipe.to_dict(),
        "task_fingerprint": task_fingerprint(task), "base_fingerprint": base_fp, "start": start_id,
        "n_train": len(task.train), "losses": result.losses, "seconds": result.seconds,
        "seconds_per_step": result.seconds_per_step, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "device": torch.device(device).type,
    }
    weights = {name: t.detach().cpu() for name, t in model.state_dict().items()}
    write_expert(folder, weights, result.exp_avg_sq, base_folder, info, result.adam_metadata)
    log.info("%s: %.2f s/step, last loss %.3f -> %s", task.name, result.seconds_per_step, result.losses[-1], folder)
    return folder


def expert_folders(
    base_folder: Path, tasks: Iterable[TextTask], recipe: FinetuneRecipe, *, cache_dir: Path | None = None,
) -> dict[str, Path]:
    """Task name → the folder that holds (or will hold) its expert under ``recipe``; trains nothing."""
    cache = Path(cache_dir) if cache_dir is not None else cache_root()
    base_fp = base_fingerprint(base_folder)
    return {task.name: expert_dir(cache, task.name, expert_key(recipe, task, base_fp)) for task in tasks}


def build_experts(
    backbone: torch.nn.Module, tokenizer, base_folder: Path, tasks: Iterable[TextTask], recipe: FinetuneRecipe,
    *, cache_dir: Path | None = None, progress: bool = True, device: str | torch.device = "cpu",
) -> dict[str, Path]:
    """Task name → expert folder for each task (see :func:`train_expert`), fine-tuning only the missing ones.

    Runs sharing the cache split the missing experts: each is claimed with a lock beside
    its folder, a run trains the ones no other run holds and then waits for the others.
    """
    tasks = list(tasks)
    cache = Path(cache_dir) if cache_dir is not None else cache_root()
    folders = expert_folders(base_folder, tasks, recipe, cache_dir=cache)
    missing = [task for task in tasks if not is_expert(folders[task.name])]
    if missing:
        folders[missing[0].name].parent.mkdir(parents=True, exist_ok=True)
    for task in claim_each(missing, lambda task: folders[task.name].with_name(folders[task.name].name + ".lock")):
        train_expert(backbone, tokenizer, base_folder, task, recipe, cache_dir=cache, progress=progress,
                     device=device)
    return {task.name: train_expert(backbone, tokenizer, base_folder, task, recipe, cache_dir=cache,
                                    progress=progress, device=device) for task in tasks}
