"""Writing a merged model: the one export path of the on-disk state and the in-memory Merger.

The merged tensors stream from ``engine.iter_merged`` into a model folder
(``io.write_model_folder``: shards + index, config and tokenizer files of the base, all
written to ``OUT.partial`` and renamed into place), with a model card (``README.md``) and
``cmerge_merge.json``, the provenance: method, parameters, base and every merged input
with its content hash, and the projected tensors.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

from .engine import Plan
from .io import DEFAULT_SHARD_SIZE, parse_dtype, write_model_folder
from .layers import PASSTHROUGH
from .model_card import model_card


def provenance(info: Mapping[str, Any]) -> dict[str, Any]:
    """``cmerge_merge.json``: a state's info without the per-tensor tables (the projected names stay)."""
    return {k: v for k, v in info.items() if k not in ("classification", "routes")}


def export_merged(out: str | os.PathLike, plan: Plan, tensors: Iterable[tuple[str, torch.Tensor]],
                  info: Mapping[str, Any], *, dtype: str | None = None, shard_size: str | int = DEFAULT_SHARD_SIZE,
                  aux_from: Path | None = None, before_commit: Callable[[], None] | None = None,
                  provenance_record: Mapping[str, Any] | None = None) -> Path:
    """Write the merged ``tensors`` (sorted names, whole or in row blocks, as ``iter_merged`` yields them).

    ``info``: what the model card and ``cmerge_merge.json`` describe (``State.info()`` or the
    Merger's equivalent); ``provenance_record`` replaces the latter's content if given.
    """
    out_dtype = parse_dtype(dtype) if dtype else None
    specs = [(n, out_dtype if (out_dtype and plan.kinds[n] != PASSTHROUGH) else plan.metas[n].dtype,
              plan.metas[n].shape) for n in plan.names]

    def files() -> dict[str, str]:
        record = dict(provenance_record) if provenance_record is not None else provenance(info)
        return {"README.md": model_card(info, dtype or "as base"),
                "cmerge_merge.json": json.dumps(record, indent=2) + "\n"}

    return write_model_folder(out, specs, tensors, shard_size=shard_size, metadata={"cmerge_method": info["method"]},
                              aux_from=aux_from, files=files, before_commit=before_commit)
