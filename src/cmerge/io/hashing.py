"""Content hashes of models: sha256 per tensor (name, dtype, shape, bytes), combined per model.

A model's hash does not depend on its file layout (sharding, order of tensors) and is the
same whether a tensor is read whole or in blocks of rows, in order (:class:`HashingSource`).
"""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Mapping

import torch

from .sources import TensorSource
from .tensors import dtype_name


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a CPU tensor, without a copy when it is contiguous."""
    t = t.detach().contiguous().reshape(-1)
    if t.device.type != "cpu":
        t = t.cpu()
    return memoryview(t.view(torch.uint8).numpy())


def digest_start(name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> Any:
    """A sha256 object fed the header of `tensor_digest`; update it with the tensor's bytes
    (e.g. row block by row block, in order) and its digest is `tensor_digest`'s."""
    h = hashlib.sha256()
    h.update(f"{name}|{dtype_name(dtype)}|{tuple(shape)}|".encode())
    return h


def tensor_digest(name: str, t: torch.Tensor) -> bytes:
    """sha256 over a tensor's name, dtype, shape and bytes."""
    h = digest_start(name, t.dtype, tuple(t.shape))
    h.update(tensor_bytes(t))
    return h.digest()


def combine_digests(digests: Mapping[str, bytes]) -> str:
    """One content hash for a model from its per-tensor digests (independent of read order)."""
    h = hashlib.sha256()
    for name in sorted(digests):
        h.update(digests[name])
    return h.hexdigest()


def content_hash(source: TensorSource, *, threads: int | None = None) -> str:
    """The content hash of every tensor of a model, each tensor read once.

    Tensors are read and hashed on ``threads`` threads (default: up to 4, one per core):
    reading and sha256 release the GIL, so a model is hashed at close to the disk's or the
    hash's speed, whichever is slower.
    """
    names = source.keys()
    workers = threads or min(4, os.cpu_count() or 1)
    if workers <= 1 or len(names) <= 1:
        return combine_digests({n: tensor_digest(n, source.get(n)) for n in names})
    with ThreadPoolExecutor(workers, thread_name_prefix="cmerge-hash") as pool:
        return combine_digests(dict(zip(names, pool.map(lambda n: tensor_digest(n, source.get(n)), names))))


def content_digest(source: TensorSource) -> str:
    """A source's identity for the step log and the duplicate check: its own digest where it defines one
    (a LoRA adapter: its tensors and the config that shapes ΔW), else `content_hash`."""
    own = getattr(source, "content_digest", None)
    return own() if callable(own) else content_hash(source)


class HashingSource(TensorSource):
    """A source that hashes what is read through it: each tensor once, whole or in row blocks in order.

    :meth:`digest` is then `content_hash` of the wrapped source, provided every tensor was
    read completely. Reading a tensor (or rows of it) again, e.g. a rule asking for the base
    a second time, does not hash it twice.
    """

    def __init__(self, inner: TensorSource) -> None:
        super().__init__()
        self.inner = inner
        self.description, self.folder, self.metadata = inner.description, inner.folder, inner.metadata
        self._meta = {n: inner.meta(n) for n in inner.keys()}
        self._done: dict[str, bytes] = {}
        self._open: dict[str, tuple[Any, int]] = {}  # name -> (sha256 so far, next row)

    def _read(self, name: str, rows: slice | None) -> torch.Tensor:
        t = self.inner.get(name, rows)
        if name in self._done:
            return t
        if rows is None:
            self._done[name] = tensor_digest(name, t)
            self._open.pop(name, None)
            return t
        h, next_row = self._open.get(name, (None, 0))
        if rows.start == next_row:
            if h is None:
                meta = self._meta[name]
                h = digest_start(name, meta.dtype, meta.shape)
            h.update(tensor_bytes(t))
            if rows.stop >= self._meta[name].shape[0]:
                self._done[name] = h.digest()
                self._open.pop(name, None)
            else:
                self._open[name] = (h, rows.stop)
        return t

    def digest(self) -> str:
        missing = [n for n in self.keys() if n not in self._done]
        if missing:
            raise RuntimeError(f"tensor {missing[0]!r} of {self.description} was not read completely")
        return combine_digests(self._done)
