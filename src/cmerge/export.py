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
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch

from .engine import Plan
from .errors import CmergeError
from .fsutil import check_new_folder
from .io import DEFAULT_SHARD_SIZE, parse_dtype, write_model_folder, write_tensor_folder
from .layers import LINEAR_T, PASSTHROUGH, checkpoint_keys, embedding_weights, is_projected
from .lowrank import LowRank, factored_svd, truncate
from .methods import Method
from .model_card import lora_card, model_card


def provenance(info: Mapping[str, Any]) -> dict[str, Any]:
    """``cmerge_merge.json``: a state's info without the per-tensor tables (the projected names stay)."""
    return {k: v for k, v in info.items() if k not in ("classification", "routes")}


def retyped_config(folder: Path | None, dtype: str | None, vocab_size: int | None = None) -> str | None:
    """The base's config.json with its weight dtype (``dtype``, or 4.x's ``torch_dtype``) set to the export's,
    so that ``from_pretrained(dtype="auto")`` loads what was written, and with ``vocab_size`` (a grown
    vocabulary) if given; None if there is nothing to change."""
    if folder is None or (dtype is None and vocab_size is None) or not (Path(folder) / "config.json").is_file():
        return None
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    if dtype is not None:
        for k in [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]:
            config[k] = dtype
    if vocab_size is not None:
        for holder in (config, config.get("text_config")):  # multimodal configs keep it under text_config
            if isinstance(holder, dict) and "vocab_size" in holder:
                holder["vocab_size"] = vocab_size
    return json.dumps(config, indent=2) + "\n"


def with_extra_rows(tensors: Iterable[tuple[str, torch.Tensor]], plan: Plan, rows: Mapping[str, torch.Tensor],
                    dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
    """``tensors`` (whole or in row blocks) with each grown tensor's extra rows as one more block after its
    last one, cast like the merged rows (``dtype``, else the base's)."""
    done: dict[str, int] = {}
    for name, t in tensors:
        yield name, t
        if name in rows:
            done[name] = done.get(name, 0) + t.shape[0]
            if done[name] == plan.metas[name].shape[0]:
                yield name, rows[name].to(dtype or plan.metas[name].dtype)


def export_merged(out: str | os.PathLike, plan: Plan, tensors: Iterable[tuple[str, torch.Tensor]],
                  info: Mapping[str, Any], *, dtype: str | None = None, shard_size: str | int = DEFAULT_SHARD_SIZE,
                  aux_from: Path | None = None, before_commit: Callable[[], None] | None = None,
                  provenance_record: Mapping[str, Any] | None = None,
                  extra_rows: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write the merged ``tensors`` (sorted names, whole or in row blocks, as ``iter_merged`` yields them).

    ``info``: what the model card and ``cmerge_merge.json`` describe (``State.info()`` or the
    Merger's equivalent); ``provenance_record`` replaces the latter's content if given;
    ``extra_rows``: a grown vocabulary's rows, appended to their tensors (vocab.py), and
    config.json's ``vocab_size`` set to match.
    """
    out_dtype = parse_dtype(dtype) if dtype else None
    rows = dict(extra_rows or {})

    def shape(n: str) -> tuple[int, ...]:
        s = tuple(plan.metas[n].shape)
        return (s[0] + rows[n].shape[0], *s[1:]) if n in rows else s

    specs = [(n, out_dtype if (out_dtype and plan.kinds[n] != PASSTHROUGH) else plan.metas[n].dtype,
              shape(n)) for n in plan.names]
    if rows:
        tensors = with_extra_rows(tensors, plan, rows, out_dtype if out_dtype else None)
    vocab_size = max(shape(n)[0] for n in rows) if rows else None

    def files() -> dict[str, str]:
        record = dict(provenance_record) if provenance_record is not None else provenance(info)
        out = {"README.md": model_card(info, dtype or "as base"),
               "cmerge_merge.json": json.dumps(record, indent=2) + "\n"}
        config = retyped_config(aux_from, dtype, vocab_size)
        if config is not None:
            out["config.json"] = config
        return out

    return write_model_folder(out, specs, tensors, shard_size=shard_size, metadata={"cmerge_method": info["method"]},
                              aux_from=aux_from, files=files, before_commit=before_commit)


# ---------------------------------------------------------------- the merge as one LoRA adapter

@dataclass
class LoraExport:
    """What ``--as-lora`` wrote: per module its rank and the relative error of the truncation (0: exact)."""

    path: Path
    ranks: dict[str, int]
    errors: dict[str, float]

    def summary(self) -> str:
        worst = max(self.errors.values(), default=0.0)
        exact = all(e == 0.0 for e in self.errors.values())
        what = "exact" if exact else f"largest relative error {worst:.3g} (per tensor in its README.md)"
        return (f"wrote a LoRA adapter of {len(self.ranks)} modules, rank up to {max(self.ranks.values(), default=0)}, "
                f"to {self.path}: {what}")


def export_lora(out: str | os.PathLike, plan: Plan, method: Method, scalars: Mapping[str, Any],
                acc: Any, factored: Mapping[str, int], info: Mapping[str, Any], *, base_folder: Path | None,
                rank: int | None = None, dtype: str | None = None) -> LoraExport:
    """The merged task vector as a PEFT LoRA adapter for the same base (``cmerge export --as-lora [RANK]``).

    Each merged linear weight or embedding table whose task vector is nonzero becomes one LoRA
    module, ΔW = B A with scaling 1 (rank_pattern / alpha_pattern give every module its own
    rank): exact at its numerical rank (factored tensors through their factors, dense ones
    through an SVD), or its best rank-``rank`` approximation with the relative Frobenius error
    recorded. A change that no LoRA module can hold (a norm, a bias) is refused.
    """
    out = Path(out)
    check_new_folder(out)
    names = plan.merged_names()
    embeddings = embedding_weights(names, base_folder)
    to_param = {key: param for param, key in checkpoint_keys(names, base_folder).items()}
    out_dtype = parse_dtype(dtype) if dtype else torch.float32
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    errors: dict[str, float] = {}
    layouts = set()
    for name in names:
        kind = plan.kinds[name]
        delta = method.merged_delta({a: (acc.get_factored(a, name) if name in factored else acc.get(a, name))
                                     for a in plan.accumulators(method, name)}, scalars, name=name)
        lr = delta if isinstance(delta, LowRank) else None
        if lr is None and not bool(torch.any(delta)):
            continue  # unchanged by the merge
        if lr is not None and lr.width == 0:
            continue
        is_embedding = name in embeddings
        if plan.metas[name].shape.__len__() != 2 or not (is_projected(kind) or is_embedding):
            raise CmergeError(f"--as-lora cannot express the merged change of tensor {name!r} (not a linear or "
                              f"embedding weight); export the full model instead.")
        if lr is None:
            lr = _dense_factors(delta)
        lr, err = truncate(lr, rank) if rank is not None else (_exact(lr), 0.0)
        if lr.width == 0:
            continue
        module = to_param.get(name, name).removesuffix(".weight")
        transposed = is_embedding or kind == LINEAR_T
        if not is_embedding:
            layouts.add(kind)
        b, a = (lr.right, lr.left.mT) if transposed else (lr.left, lr.right.mT)
        prefix = f"base_model.model.{module}"
        if is_embedding:
            tensors[f"{prefix}.lora_embedding_A"], tensors[f"{prefix}.lora_embedding_B"] = a, b
        else:
            tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"] = a, b
        ranks[module], errors[name] = lr.width, err
    if len(layouts) > 1:
        raise CmergeError("--as-lora cannot write one adapter for both nn.Linear and Conv1D weights (PEFT's "
                          "fan_in_fan_out is one setting per adapter); export the full model instead.")
    if not ranks:
        raise CmergeError("the merged model equals the base model: there is no change to write as a LoRA adapter.")
    top = max(ranks.values())
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": info["base"]["path"],
        "r": top, "lora_alpha": top, "target_modules": sorted(ranks),
        "rank_pattern": {re.escape(m): r for m, r in ranks.items() if r != top},
        "alpha_pattern": {re.escape(m): r for m, r in ranks.items() if r != top},
        "fan_in_fan_out": LINEAR_T in layouts, "bias": "none", "use_rslora": False, "use_dora": False,
        "lora_dropout": 0.0, "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
    }
    files = {"adapter_config.json": json.dumps(config, indent=2) + "\n",
             "README.md": lora_card(info, ranks, errors, rank)}
    write_tensor_folder(out, {k: v.to(out_dtype).contiguous() for k, v in sorted(tensors.items())},
                        "adapter_model.safetensors", files)
    return LoraExport(out, ranks, errors)


def _dense_factors(delta: torch.Tensor) -> LowRank:
    """A dense task vector as factors of its thin SVD (float64)."""
    u, s, vh = torch.linalg.svd(delta.to(torch.float64), full_matrices=False)
    return LowRank(u * s, vh.mT)


def _exact(lr: LowRank) -> LowRank:
    """The same matrix as factors of its numerical rank (no zero columns)."""
    u, s, v = factored_svd(lr)
    return LowRank(u * s, v)
