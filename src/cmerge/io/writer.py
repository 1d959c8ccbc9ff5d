"""Streaming safetensors writing: each tensor (or block of its rows) is written as soon as it exists.

The ``safetensors`` library only writes whole dicts; :class:`StreamingSafetensorsWriter`
declares every tensor up front (names, dtypes, shapes, hence offsets), so a tensor is
written the moment it is computed and memory never holds more than the tensor in hand.
:func:`write_sharded` plans shards and an index the way ``transformers`` reads them.
"""
from __future__ import annotations

import ctypes
import json
import os
import queue
import sys
import threading
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import torch

from ..errors import CmergeError
from .hashing import tensor_bytes
from .sources import SAFETENSORS_INDEX
from .tensors import ST_NAMES, TensorMeta

Spec = tuple[str, torch.dtype, tuple[int, ...]]  # (name, dtype, shape)


def _header_bytes(specs: Sequence[Spec], metadata: Mapping[str, str]) -> tuple[bytes, list[int]]:
    """The file's header and each tensor's data offset relative to the data start."""
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset, offsets = 0, []
    for name, dtype, shape in specs:
        size = TensorMeta(tuple(shape), dtype).nbytes
        header[name] = {"dtype": ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offsets.append(offset)
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw, offsets


def _writeback_starter() -> Callable[[int, int, int], None] | None:
    """Linux ``sync_file_range(fd, offset, n, SYNC_FILE_RANGE_WRITE)``: start writing a range to disk, no wait."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int

    def start(fd: int, offset: int, count: int) -> None:
        fn(fd, offset, count, 2)  # SYNC_FILE_RANGE_WRITE; only a head start for the final fsync, so errors are ignored

    return start


_START_WRITEBACK = _writeback_starter()
_WRITEBACK_MIN_BYTES = 8 << 20


class StreamingSafetensorsWriter:
    """Write a safetensors file tensor by tensor (or block of rows by block of rows).

    The header is written first from ``specs``. By default tensors come in the declared
    order, each whole (:meth:`write`) or as consecutive blocks of its rows
    (:meth:`write_rows`). ``any_order=True`` lets the tensors come in any order and
    interleaved, block by block (each tensor's rows still in order): a merge state writes
    a tensor's several accumulators (M and F) side by side that way. :meth:`close` checks
    that every tensor is complete and fsyncs; the writeback of each large write is started
    as soon as it is issued (Linux), so that fsync mostly finds its work done.

    ``background=True``: a thread writes the bytes while the caller computes the next
    tensor; :meth:`write` returns once the tensor is queued (at most one waits), so the
    caller must not modify a tensor after handing it over. Write errors surface at the
    next :meth:`write` or at :meth:`close`.
    """

    def __init__(self, path: Path, specs: Sequence[Spec], metadata: Mapping[str, str] | None = None, *,
                 background: bool = False, any_order: bool = False) -> None:
        self.path = Path(path)
        self._specs = list(specs)
        self._index = {s[0]: i for i, s in enumerate(self._specs)}
        self._any_order = any_order
        self._next = 0                       # declared order: the tensor being written
        self._rows: dict[int, int] = {}      # tensor index -> rows written so far (tensors begun, not complete)
        self._complete: set[int] = set()
        header, offsets = _header_bytes(self._specs, metadata or {})
        self._starts = [len(header) + o for o in offsets]
        self._fd = os.open(str(self.path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._pwrite(header, 0)
        self._error: BaseException | None = None
        self._discard = False
        self._thread: threading.Thread | None = None
        if background:
            self._queue: queue.Queue = queue.Queue(maxsize=1)
            self._thread = threading.Thread(target=self._drain, name="cmerge-write", daemon=True)
            self._thread.start()

    @property
    def running(self) -> bool:
        """Whether a background writing thread is alive."""
        return self._thread is not None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        i = self._current(name)
        _, dtype, shape = self._specs[i]
        if i in self._rows or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"expected {name} {dtype} {shape}, got {name} {tensor.dtype} {tuple(tensor.shape)}")
        self._put(tensor, self._starts[i])
        self._finish(i)

    def write_rows(self, name: str, block: torch.Tensor) -> None:
        """Append the next rows of a tensor; it is complete once all its rows are written."""
        i = self._current(name)
        _, dtype, shape = self._specs[i]
        done = self._rows.get(i, 0)
        got = tuple(block.shape)
        if block.dtype != dtype or not shape or got[1:] != tuple(shape[1:]) or done + got[0] > shape[0]:
            raise ValueError(f"expected rows {done}.. of {name} {dtype} {shape}, got {name} {block.dtype} {got}")
        row_bytes = TensorMeta(tuple(shape[1:]), dtype).nbytes
        self._put(block, self._starts[i] + done * row_bytes)
        if done + got[0] == shape[0]:
            self._rows.pop(i, None)
            self._finish(i)
        else:
            self._rows[i] = done + got[0]

    def _current(self, name: str) -> int:
        """The index of tensor ``name`` if it may be written now; ValueError if not."""
        i = self._index.get(name)
        if i is None or i in self._complete:
            raise ValueError(f"{name!r} is not a tensor of {self.path} still to be written")
        if not self._any_order and i != self._next:
            raise ValueError(f"expected {self._specs[self._next][0]} next, got {name}")
        return i

    def _finish(self, i: int) -> None:
        self._complete.add(i)
        while self._next in self._complete:
            self._next += 1

    def _put(self, tensor: torch.Tensor, offset: int) -> None:
        if self._thread is None:
            self._write_bytes(tensor, offset)
        else:
            if self._error is not None:
                raise self._error
            self._queue.put((tensor, offset))

    def _write_bytes(self, tensor: torch.Tensor, offset: int) -> None:
        data = tensor_bytes(tensor)
        self._pwrite(data, offset)
        if _START_WRITEBACK is not None and data.nbytes >= _WRITEBACK_MIN_BYTES:
            _START_WRITEBACK(self._fd, offset, data.nbytes)

    def _pwrite(self, data: bytes | memoryview, offset: int) -> None:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += os.pwrite(self._fd, view[done:done + (1 << 30)], offset + done)

    def _drain(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is None and not self._discard:
                try:
                    self._write_bytes(*item)
                except BaseException as exc:  # handed to the caller by write() or close()
                    self._error = exc
            del item

    def _stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def _close_fd(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def close(self) -> None:
        self._stop()
        if self._error is not None:
            self._close_fd()
            raise self._error
        if len(self._complete) != len(self._specs):
            self._close_fd()
            raise ValueError(f"{self.path}: only {len(self._complete)} of {len(self._specs)} tensors were written")
        os.fsync(self._fd)
        self._close_fd()

    def abort(self) -> None:
        self._discard = True
        self._stop()
        self._close_fd()


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB' or a plain byte count."""
    if isinstance(text, int):
        return text
    s = text.strip().upper().replace(" ", "")
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9,
             "TB": 10**12, "B": 1}
    for unit, mult in units.items():
        if s.endswith(unit):
            num = s[: -len(unit)]
            break
    else:
        num, mult = s, 1
    try:
        value = float(num)
    except ValueError:
        raise CmergeError(f"cannot read the size {text!r}; write e.g. 5GB or 500MB.") from None
    if value <= 0:
        raise CmergeError(f"the size {text!r} must be positive.")
    return int(value * mult)


def plan_shards(specs: Sequence[Spec], max_bytes: int) -> list[list[Spec]]:
    """Split tensors, in order, into shards of at most ``max_bytes`` (a bigger tensor gets its own)."""
    shards: list[list[Spec]] = [[]]
    size = 0
    for spec in specs:
        n = TensorMeta(tuple(spec[2]), spec[1]).nbytes
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += n
    return shards


def write_sharded(out_dir: Path, specs: Sequence[Spec], tensors: Iterable[tuple[str, torch.Tensor]],
                  max_shard_bytes: int, metadata: Mapping[str, str] | None = None, *,
                  background: bool = False) -> list[Path]:
    """Stream ``tensors`` (in the order of ``specs``) into ``model.safetensors`` or shards + index.

    A tensor may come whole or as consecutive blocks of its rows (name, block), in order.
    ``background``: write each shard from a thread (see StreamingSafetensorsWriter).
    """
    out_dir = Path(out_dir)
    shards = plan_shards(specs, max_shard_bytes)
    meta = {"format": "pt", **(metadata or {})}
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    it: Iterator[tuple[str, torch.Tensor]] = iter(tensors)
    for fname, shard in zip(names, shards):
        writer = StreamingSafetensorsWriter(out_dir / fname, shard, meta, background=background)
        try:
            for _, _, shape in shard:
                name, t = next(it)
                if tuple(t.shape) == tuple(shape):
                    writer.write(name, t)
                    continue
                rows = 0  # a tensor given in blocks of rows, one after another
                while True:
                    writer.write_rows(name, t)
                    rows += t.shape[0]
                    if rows >= shape[0]:
                        break
                    name, t = next(it)
            writer.close()
        except BaseException:
            writer.abort()
            raise
    if len(shards) > 1:
        weight_map = {spec[0]: fname for fname, shard in zip(names, shards) for spec in shard}
        total = sum(TensorMeta(tuple(s[2]), s[1]).nbytes for s in specs)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return [out_dir / n for n in names]
