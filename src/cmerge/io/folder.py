"""A model folder as transformers reads it: safetensors (shards + index), config and tokenizer files, a card.

:func:`write_model_folder` streams the tensors into ``OUT.partial/`` and renames it to
``OUT`` only when everything is written, so ``OUT`` is either absent or complete. One
export at a time may write ``OUT``: a second is refused with one sentence, and the
``.partial`` folder of a killed export is removed by the next one.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch

from ..fsutil import new_folder
from .sources import is_weight_file
from .writer import Spec, parse_size, write_sharded

DEFAULT_SHARD_SIZE = "5GB"


def copy_aux_files(src: Path | None, dst: Path, skip: Callable[[Path], bool] = lambda p: p.name == "README.md") -> list[str]:
    """Copy config, tokenizer and other non-weight files (and weight-free folders) from a model folder."""
    copied: list[str] = []
    if src is None or not Path(src).is_dir():
        return copied
    for p in sorted(Path(src).iterdir()):
        if p.name.startswith(".") or skip(p):
            continue
        if p.is_file() and not is_weight_file(p):
            shutil.copy2(p, dst / p.name)
            copied.append(p.name)
        elif p.is_dir() and not any(is_weight_file(q) for q in p.rglob("*") if q.is_file()):
            shutil.copytree(p, dst / p.name, dirs_exist_ok=True)
            copied.append(p.name + "/")
    return copied


def write_tensor_folder(out: str | os.PathLike, tensors: Mapping[str, torch.Tensor], filename: str,
                        files: Mapping[str, str]) -> Path:
    """A small folder written whole (e.g. a LoRA adapter): one safetensors file and text files."""
    from safetensors.torch import save_file

    with new_folder(out, _busy(out)) as tmp:
        save_file(dict(tensors), str(tmp / filename), metadata={"format": "pt"})
        for name, text in files.items():
            (tmp / name).write_text(text)
    return Path(out)


def write_model_folder(out: str | os.PathLike, specs: Sequence[Spec], tensors: Iterable[tuple[str, torch.Tensor]], *,
                       shard_size: str | int = DEFAULT_SHARD_SIZE, metadata: Mapping[str, str] | None = None,
                       aux_from: Path | None = None, files: Callable[[], Mapping[str, str]] | None = None,
                       before_commit: Callable[[], None] | None = None) -> Path:
    """Write a model folder at ``out`` from ``tensors`` (in the order of ``specs``, whole or in row blocks).

    ``aux_from``: a model folder whose config/tokenizer files are copied; ``files()``: more
    text files (name → content, e.g. the model card), asked for once the tensors are
    written; ``before_commit()``: a last check (raise to abandon the export).
    """
    max_bytes = parse_size(shard_size)
    with new_folder(out, _busy(out)) as tmp:
        write_sharded(tmp, specs, tensors, max_bytes, metadata, background=True)
        if before_commit is not None:
            before_commit()
        copy_aux_files(aux_from, tmp)
        for name, text in (files() if files is not None else {}).items():
            (tmp / name).write_text(text)
    return Path(out)


def _busy(out: str | os.PathLike) -> str:
    return f"another cmerge export is writing {out} right now; wait for it to finish or choose another folder."
