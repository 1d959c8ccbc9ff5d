"""A grown vocabulary: experts whose embedding-like tensors gained rows (``--vocab union``).

An expert fine-tuned after ``resize_token_embeddings`` has more rows in its token embeddings
(and untied LM head) than the base. A state made with ``vocab="base"`` (the default) refuses
it in one sentence. With ``vocab="union"`` (docs/methods.md, "A grown vocabulary"):

* the rows the base has are merged by the method like every other weight (the expert is read
  through :class:`BaseRowsSource`, which shows it with the base's shapes);
* every row past them is taken as it is from the **first** expert that has it: the union after
  step t holds the rows of all experts so far, rows [V0, V0 + n) of the expert with the most
  new rows at its arrival, later experts adding only the rows past the union's current end.
  Rows are matched by position, so experts must extend the base tokenizer the same way (the
  same added tokens in the same order); the export takes config.json and the tokenizer from the
  expert that last extended the union.

The extra rows live in each generation of the state (``vocab_rows.safetensors``, one tensor per
grown weight, in the expert's dtype) and are appended to the merged rows at export.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file, save_file

from .engine import Plan
from .errors import CmergeError
from .io import TensorMeta, TensorSource

MODES = ("base", "union")
ROWS_FILE = "vocab_rows.safetensors"
#: Tensors with one row per token: token embeddings and LM heads (not position embeddings).
VOCAB_NAME = re.compile(r"(embed_tokens|word_embeddings|wte|tok_embeddings|shared\.weight|lm_head|embed_out)", re.I)


def grown_rows(plan: Plan, source: TensorSource) -> dict[str, int]:
    """Token embeddings and LM heads of ``source`` with more rows than the base's (same columns): name → its rows."""
    out = {}
    for name in plan.names:
        if name not in source.keys():
            continue
        m, b = source.meta(name), plan.metas[name]
        if (len(m.shape) == 2 == len(b.shape) and m.shape[1] == b.shape[1] and m.shape[0] > b.shape[0]
                and VOCAB_NAME.search(name)):
            out[name] = int(m.shape[0])
    return out


class BaseRowsSource(TensorSource):
    """``inner`` with the base's shapes: each grown tensor cut to the base's rows (the part the method merges)."""

    def __init__(self, inner: TensorSource, plan: Plan, grown: Mapping[str, int]) -> None:
        super().__init__()
        self.inner, self.grown = inner, dict(grown)
        self.description, self.folder, self.metadata, self.files = (inner.description, inner.folder,
                                                                    inner.metadata, inner.files)
        self._base_rows = {n: int(plan.metas[n].shape[0]) for n in self.grown}
        for n in inner.keys():
            m = inner.meta(n)
            self._meta[n] = TensorMeta((self._base_rows[n], *m.shape[1:]), m.dtype) if n in self.grown else m

    def _read(self, name: str, rows: slice | None) -> torch.Tensor:
        if name in self.grown and rows is None:
            rows = slice(0, self._base_rows[name])
        return self.inner.get(name, rows)


def extended_rows(previous: Mapping[str, torch.Tensor], incoming: TensorSource, plan: Plan,
                  grown: Mapping[str, int]) -> tuple[dict[str, torch.Tensor], bool]:
    """The union's extra rows after ``incoming``, and whether it added any.

    Rows already in the union stay (they came from an earlier expert); the expert's rows past
    the union's end are appended. A new row that is not finite is refused in one sentence.
    """
    rows = dict(previous)
    added = False
    for name, n_rows in grown.items():
        start = int(plan.metas[name].shape[0]) + (rows[name].shape[0] if name in rows else 0)
        if n_rows <= start:
            continue
        new = incoming.get(name, slice(start, n_rows)).contiguous()
        if not bool(torch.isfinite(new).all()):
            raise CmergeError(f"{incoming.description}: the new vocabulary rows of {name!r} contain NaN or Inf.")
        rows[name] = torch.cat([rows[name].to(new.dtype), new]) if name in rows else new
        added = True
    return rows, added


def save_rows(folder: Path, rows: Mapping[str, torch.Tensor]) -> None:
    if rows:
        save_file({n: t.contiguous() for n, t in rows.items()}, str(Path(folder) / ROWS_FILE))


def load_rows(folder: Path | None, expected: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """The extra rows a generation holds, checked against the manifest's counts (one sentence if damaged)."""
    if not expected:
        return {}
    path = Path(folder) / ROWS_FILE if folder is not None else None
    try:
        rows = load_file(str(path))
    except Exception as exc:
        raise CmergeError(f"{path} (the grown vocabulary's rows) is missing or damaged ({exc}).") from None
    if {n: t.shape[0] for n, t in rows.items()} != dict(expected):
        raise CmergeError(f"{path} does not hold the vocabulary rows the manifest lists; the state is damaged.")
    return rows
