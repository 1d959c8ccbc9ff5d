"""The adapter cache: every LoRA the LLM suite trains, once, as a PEFT folder.

An adapter is a folder that peft loads as it is::

    <cache>/llm-adapters/<name>-<key>/
        adapter_config.json, adapter_model.safetensors   written by peft's save_pretrained
        exp_avg_sq.safetensors   AdamW's raw second moments, under the adapter's tensor names
        info.json                recipe, key inputs, losses, time (written last)

``key`` hashes everything that determines the tensors: the recipe, the fingerprints of
the training prompts (every token and label, :meth:`tasks.Prompts.fingerprint`), the
backbone's weights file, the number of steps, the start (``"init"`` or an id naming the
adapter training continued from and how it was turned into a start) and
:data:`TRAINER_VERSION`. Chains of adapters (SeqLoRA, SLAO) therefore share their
common beginnings: task 1 of every order is the task's individual expert. A folder is
written beside its final name and renamed into place, and one lock per key makes
concurrent runs wait for each other instead of training twice.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
from safetensors.torch import load_file, save_file

from cmerge.fsutil import cached_folder
from cmerge.suites.backbone import base_fingerprint
from cmerge.suites.llm.lora import LoraTrainer
from cmerge.suites.llm.tasks import Prompts
from cmerge.suites.text_data import cache_root

log = logging.getLogger(__name__)

TRAINER_VERSION = 1
FOLDER = "llm-adapters"
ADAPTER_FILE = "adapter_model.safetensors"
SECOND_MOMENTS_FILE = "exp_avg_sq.safetensors"
INFO_FILE = "info.json"


@dataclass(frozen=True)
class Adapter:
    """A cached adapter: its folder, key and tensors (peft names)."""

    name: str
    key: str
    folder: Path
    state: dict[str, torch.Tensor]


def is_adapter(folder: Path) -> bool:
    return all((Path(folder) / f).is_file() for f in (ADAPTER_FILE, SECOND_MOMENTS_FILE, INFO_FILE))


def load_second_moments(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / SECOND_MOMENTS_FILE))


class AdapterStore:
    """Trains adapters with ``trainer`` on request, or returns them from the cache."""

    def __init__(self, trainer: LoraTrainer, backbone: Path, cache_dir: Path | None = None) -> None:
        self.trainer = trainer
        self.base = base_fingerprint(backbone)
        self.root = (Path(cache_dir) if cache_dir is not None else cache_root()) / FOLDER

    def key(self, prompts: Sequence[Prompts], steps: int, start: str) -> str:
        payload = {"trainer": TRAINER_VERSION, "recipe": self.trainer.recipe.to_dict(), "base": self.base,
                   "prompts": [p.fingerprint() for p in prompts], "steps": steps, "start": start}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def get(self, name: str, prompts: Sequence[Prompts], *, steps: int | None = None,
            start: Mapping[str, torch.Tensor] | None = None, start_id: str = "init",
            progress: bool = True) -> Adapter:
        """The adapter ``name`` trained on ``prompts`` from ``start`` (named ``start_id``), training it if missing."""
        if (start is None) != (start_id == "init"):
            raise ValueError("give a start state together with its start_id, or neither")
        steps = steps or self.trainer.recipe.steps
        key = self.key(prompts, steps, start_id)
        folder = self.root / f"{name}-{key}"
        cached_folder(folder, lambda tmp: self._train(tmp, name, key, prompts, steps, start, start_id, progress),
                      is_adapter)
        return Adapter(name, key, folder, load_file(str(folder / ADAPTER_FILE)))

    def _train(self, tmp: Path, name: str, key: str, prompts: Sequence[Prompts], steps: int,
               start: Mapping[str, torch.Tensor] | None, start_id: str, progress: bool) -> None:
        log.info("training LoRA %s: %d steps, key %s", name, steps, key)
        result = self.trainer.train(prompts, steps=steps, start=start,
                                    progress=f"LoRA {name}" if progress else False)
        info = {"name": name, "key": key, "trainer_version": TRAINER_VERSION,
                "recipe": self.trainer.recipe.to_dict(), "steps": steps, "start": start_id,
                "tasks": [p.task for p in prompts], "prompts": [p.fingerprint() for p in prompts],
                "base_fingerprint": self.base, "losses": result.losses, "seconds": result.seconds,
                "seconds_per_step": result.seconds_per_step, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self.trainer.model.save_pretrained(tmp)
        saved = set(load_file(str(tmp / ADAPTER_FILE)))
        if saved != set(result.exp_avg_sq):
            raise RuntimeError(f"peft saved tensors {sorted(saved)[:2]}..., not the trained ones")
        save_file({n: t.contiguous() for n, t in result.exp_avg_sq.items()}, str(tmp / SECOND_MOMENTS_FILE),
                  metadata=result.adam_metadata)
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        log.info("%s: %.2f s/step, last loss %.3f", name, result.seconds_per_step, result.losses[-1])
