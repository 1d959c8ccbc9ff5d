"""Lazy reading and streaming writing of model tensors.

Sources (read one tensor at a time): a Hugging Face folder (single or sharded safetensors
with ``model.safetensors.index.json``, or ``pytorch_model.bin``, sharded too), a single
``.safetensors`` / ``.pt`` / ``.bin`` file, or, in Python, a state dict or ``nn.Module``.

Writing: :class:`StreamingSafetensorsWriter` writes a safetensors file whose tensors are
all declared up front, so each tensor is written as soon as it is computed and memory
never holds more than one of them (the ``safetensors`` library only writes whole dicts).
:func:`write_sharded` plans shards and an index the way ``transformers`` reads them.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import pickle
import queue
import shutil
import struct
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from safetensors import safe_open

from .errors import CmergeError

_HAS_MAP = hasattr(mmap, "MAP_PRIVATE") and hasattr(mmap, "PROT_WRITE")

SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_INDEX = "pytorch_model.bin.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise CmergeError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}.") from None


@dataclass(frozen=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


class TensorSource:
    """A model whose tensors are read lazily, by name. Subclasses fill ``_meta`` and ``_read``."""

    description: str = "model"
    folder: Path | None = None  # where config / tokenizer files live, if any

    def __init__(self) -> None:
        self._meta: dict[str, TensorMeta] = {}
        self.metadata: dict[str, str] = {}  # file-level metadata (safetensors ``__metadata__``)

    def keys(self) -> list[str]:
        return sorted(self._meta)

    def meta(self, name: str) -> TensorMeta:
        return self._meta[name]

    def get(self, name: str) -> torch.Tensor:
        return self._guarded(name, self._read, name)

    def _read(self, name: str) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # Whether get_rows reads only the rows asked for (else it reads the whole tensor).
    reads_rows: bool = False

    def get_rows(self, name: str, rows: slice) -> torch.Tensor:
        """Rows ``rows`` (a slice of the first dimension, step 1) of a tensor: ``get(name)[rows]``."""
        return self._guarded(name, self._read_rows, name, rows)

    def _read_rows(self, name: str, rows: slice) -> torch.Tensor:
        return self._read(name)[rows]

    def _guarded(self, name: str, read: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
        """``read(*args)`` for tensor ``name``: an unknown name or unreadable data is one CmergeError."""
        if name not in self._meta:
            raise CmergeError(f"{self.description} has no tensor named {name!r}.")
        try:
            return read(*args)
        except CmergeError:
            raise
        except Exception as exc:  # truncated or corrupt data surfaces here
            raise CmergeError(f"could not read tensor {name!r} from {self.description} ({exc}).") from exc

    def __len__(self) -> int:
        return len(self._meta)


class MappingSource(TensorSource):
    """An in-memory state dict (or a module's), read without copies."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], description: str = "state dict") -> None:
        super().__init__()
        self.description = description
        self._tensors = {}
        for name, t in tensors.items():
            if not isinstance(t, torch.Tensor):
                raise CmergeError(f"{description}: entry {name!r} is a {type(t).__name__}, not a tensor.")
            self._tensors[name] = t
            self._meta[name] = TensorMeta(tuple(t.shape), t.dtype)

    def _read(self, name: str) -> torch.Tensor:
        return self._tensors[name].detach()

    reads_rows = True  # a slice of an in-memory tensor is a view


class SafetensorsSource(TensorSource):
    """One or more safetensors files, read one tensor at a time.

    The header is validated with the ``safetensors`` library; :meth:`get` then reads a
    tensor's bytes with ``pread`` into a fresh buffer rather than through a memory map, so
    the process holds only the tensors in use: a mapped file's touched pages would stay
    resident and make peak RSS grow with the model size.

    :meth:`get_mapped` is the streaming engine's faster read: a large tensor gets a
    private, copy-on-write map of just its own pages, unmapped when the last view of the
    tensor is freed, so memory again holds only the tensors in use. It saves the copy of
    every byte and the page faults of a fresh buffer (several times faster than ``pread``
    on page-cached files), but a mapped tensor holds a file descriptor and faults
    (SIGBUS) if the file is truncated while the tensor is alive, so it is meant for
    tensors used for a moment and dropped, not for ones kept.
    """

    MAP_MIN_BYTES = 1 << 20  # smaller tensors are read with pread (a map costs a few syscalls)

    def __init__(self, files: Sequence[Path], description: str, folder: Path | None = None) -> None:
        super().__init__()
        self.description = description
        self.folder = folder
        self._where: dict[str, tuple[Path, int, int]] = {}  # name -> (file, absolute offset, byte count)
        self._fds: dict[Path, int] = {}
        for f in files:
            try:
                h = safe_open(str(f), framework="pt", device="cpu")  # validates header and file size
                self.metadata.update(h.metadata() or {})
                for n in h.keys():
                    sl = h.get_slice(n)
                    dt = _ST_DTYPES.get(sl.get_dtype())
                    if dt is None:
                        raise CmergeError(f"{f}: tensor {n!r} has unsupported dtype {sl.get_dtype()}.")
                    self._meta[n] = TensorMeta(tuple(sl.get_shape()), dt)
                del h
                start, offsets = _data_offsets(f)
            except CmergeError:
                raise
            except Exception as exc:
                raise CmergeError(f"could not read {f}: not a valid safetensors file ({exc}).") from exc
            for n, (begin, end) in offsets.items():
                self._where[n] = (f, start + begin, end - begin)
            self._fds[f] = os.open(str(f), os.O_RDONLY)

    def _read(self, name: str) -> torch.Tensor:
        path, offset, count = self._where[name]
        meta = self._meta[name]
        return self._pread(name, path, offset, count).view(meta.dtype).reshape(meta.shape)

    reads_rows = True

    def _read_rows(self, name: str, rows: slice) -> torch.Tensor:
        """Only the bytes of rows ``rows`` (``pread``, into a fresh buffer)."""
        meta = self._meta[name]
        start, stop, step = rows.indices(meta.shape[0] if meta.shape else 1)
        if step != 1 or not meta.shape:
            return self._read(name)[rows]
        path, offset, count = self._where[name]
        row_bytes = count // meta.shape[0] if meta.shape[0] else 0
        n = max(0, stop - start)
        buf = self._pread(name, path, offset + start * row_bytes, n * row_bytes)
        return buf.view(meta.dtype).reshape(n, *meta.shape[1:])

    def _pread(self, name: str, path: Path, offset: int, count: int) -> torch.Tensor:
        buf = torch.empty(count, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        done = 0
        while done < count:
            n = os.preadv(self._fds[path], [view[done:done + (1 << 30)]], offset + done)
            if n <= 0:
                raise CmergeError(f"{path} ended early while reading tensor {name!r} (truncated file?).")
            done += n
        return buf

    def get_mapped(self, name: str) -> torch.Tensor:
        """Like :meth:`get`, through a private map of the tensor's pages when it is large (see the class)."""
        return self._guarded(name, self._read_mapped, name)

    def _read_mapped(self, name: str) -> torch.Tensor:
        path, offset, count = self._where[name]
        t = None
        if count >= self.MAP_MIN_BYTES and _HAS_MAP:
            t = self._map(name, path, offset, count, self._meta[name])
        return t if t is not None else self._read(name)

    def _map(self, name: str, path: Path, offset: int, count: int, meta: TensorMeta) -> torch.Tensor | None:
        """The tensor's bytes through a private map of its pages; None where that is not possible."""
        itemsize = torch.empty((), dtype=meta.dtype).element_size()
        if offset % itemsize:
            return None  # a misaligned tensor: pread gives an aligned copy
        fd = self._fds[path]
        if os.fstat(fd).st_size < offset + count:  # a map past the end would fault (SIGBUS) on access
            raise CmergeError(f"{path} ended early while reading tensor {name!r} (truncated file?).")
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        try:
            mm = mmap.mmap(fd, offset + count - start, flags=mmap.MAP_PRIVATE,
                           prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
        except (OSError, ValueError):
            return None  # e.g. a file system without mmap
        try:
            mm.madvise(mmap.MADV_WILLNEED, offset - offset % mmap.PAGESIZE - start,
                       offset + count - (offset - offset % mmap.PAGESIZE))
        except (OSError, ValueError, AttributeError):
            pass
        # the tensor keeps ``mm`` alive; the pages are unmapped when its last view is freed
        t = torch.frombuffer(mm, dtype=torch.uint8, count=count, offset=offset - start)
        return t.view(meta.dtype).reshape(meta.shape)

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass


def _data_offsets(path: Path) -> tuple[int, dict[str, tuple[int, int]]]:
    """Where a safetensors file's data starts, and each tensor's [begin, end) byte range in it."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return 8 + n, {k: tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__"}


def read_streamed(source: TensorSource, name: str) -> torch.Tensor:
    """``source.get(name)`` for a tensor that is used once and dropped (mapped where that is faster)."""
    if isinstance(source, SafetensorsSource):
        return source.get_mapped(name)
    return source.get(name)


class TorchFileSource(TensorSource):
    """``.bin`` / ``.pt`` files saved by ``torch.save``; memory-mapped when the format allows."""

    def __init__(self, files: Sequence[Path], description: str, folder: Path | None = None) -> None:
        super().__init__()
        self.description = description
        self.folder = folder
        self._tensors: dict[str, torch.Tensor] = {}
        for f in files:
            obj = _torch_load(f)
            for n, t in obj.items():
                self._tensors[n] = t
                self._meta[n] = TensorMeta(tuple(t.shape), t.dtype)

    def _read(self, name: str) -> torch.Tensor:
        return self._tensors[name]


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    try:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc) and "zipfile" not in str(exc):
                raise
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        # torch's weights-only unpickler fails with long, multi-line advice: keep one sentence
        text = str(exc).strip()
        if "allowed global" in text or "Unsupported global" in text:
            raise CmergeError(f"could not read {path}: it holds Python objects other than tensors, which cmerge does "
                              f"not unpickle; save a plain state dict of tensors (or safetensors).") from exc
        detail = "corrupt, or not written by torch.save" if isinstance(exc, pickle.UnpicklingError) \
            else (text.splitlines() or [type(exc).__name__])[0]
        raise CmergeError(f"could not read {path}: not a readable torch checkpoint ({detail}).") from exc
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CmergeError(f"{path} does not hold a state dict of tensors.")
    return dict(obj)


def open_source(model: object, description: str | None = None) -> TensorSource:
    """Open a model for lazy reading: a path (folder or file), a state dict or an ``nn.Module``."""
    if isinstance(model, TensorSource):
        return model
    if isinstance(model, torch.nn.Module):
        return MappingSource(model.state_dict(), description or f"module {type(model).__name__}")
    if isinstance(model, Mapping):
        return MappingSource(model, description or "state dict")
    if isinstance(model, (str, os.PathLike)):
        return _open_path(Path(model), description)
    raise CmergeError(f"cannot read a model from a {type(model).__name__}; pass a path, a state dict or a module.")


def _open_path(path: Path, description: str | None) -> TensorSource:
    desc = description or str(path)
    if not path.exists():
        raise CmergeError(f"{path} does not exist.")
    if path.is_file():
        if path.suffix == ".safetensors":
            return SafetensorsSource([path], desc)
        if path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
            return TorchFileSource([path], desc)
        raise CmergeError(f"{path}: unknown weight file type {path.suffix!r} (expected .safetensors, .bin or .pt).")
    for index_name, cls in ((SAFETENSORS_INDEX, SafetensorsSource), (TORCH_INDEX, TorchFileSource)):
        index = path / index_name
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except Exception as exc:
                raise CmergeError(f"{index} is not a valid shard index ({exc}).") from exc
            files = [path / f for f in sorted(set(weight_map.values()))]
            missing = [str(f) for f in files if not f.exists()]
            if missing:
                raise CmergeError(f"{index} names shard {missing[0]}, which does not exist.")
            return cls(files, desc, folder=path)
    for name, cls in (("model.safetensors", SafetensorsSource), ("pytorch_model.bin", TorchFileSource)):
        if (path / name).exists():
            return cls([path / name], desc, folder=path)
    found = sorted(p for p in path.iterdir() if p.suffix == ".safetensors")
    if len(found) == 1:
        return SafetensorsSource(found, desc, folder=path)
    raise CmergeError(f"{path} holds no model weights (model.safetensors, a shard index or pytorch_model.bin).")


# ---------------------------------------------------------------- hashing

def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a CPU tensor, without a copy when it is contiguous."""
    t = t.detach().contiguous().reshape(-1)
    if t.device.type != "cpu":
        t = t.cpu()
    return memoryview(t.view(torch.uint8).numpy())


def tensor_digest(name: str, t: torch.Tensor) -> bytes:
    """sha256 over a tensor's name, dtype, shape and bytes."""
    h = digest_start(name, t.dtype, tuple(t.shape))
    h.update(tensor_bytes(t))
    return h.digest()


def digest_start(name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> Any:
    """A sha256 object fed the header of `tensor_digest`; update it with the tensor's bytes
    (e.g. row block by row block, in order) and its digest is `tensor_digest`'s."""
    h = hashlib.sha256()
    h.update(f"{name}|{dtype_name(dtype)}|{tuple(shape)}|".encode())
    return h


def combine_digests(digests: Mapping[str, bytes]) -> str:
    """One content hash for a model from its per-tensor digests (independent of read order)."""
    h = hashlib.sha256()
    for name in sorted(digests):
        h.update(digests[name])
    return h.hexdigest()


def content_hash(source: TensorSource) -> str:
    """The content hash of every tensor of a model (reads each tensor once)."""
    return combine_digests({n: tensor_digest(n, source.get(n)) for n in source.keys()})


# ---------------------------------------------------------------- writing

def _header_bytes(specs: Sequence[tuple[str, torch.dtype, tuple[int, ...]]], metadata: Mapping[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, dtype, shape in specs:
        size = TensorMeta(tuple(shape), dtype).nbytes
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _writeback_starter() -> Callable[[int, int, int], None] | None:
    """Linux ``sync_file_range(fd, offset, n, SYNC_FILE_RANGE_WRITE)``: start writing a range to disk, no wait."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

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
    """Write a safetensors file tensor by tensor, in the declared order.

    The header (names, dtypes, shapes, offsets) is written first from ``specs``; each
    :meth:`write` appends one tensor's bytes, so at most one tensor is held in memory.
    :meth:`close` fsyncs the file; the writeback of each large tensor is started as soon
    as it is written (Linux), so that fsync mostly finds its work done.

    ``background=True``: a thread writes the bytes while the caller computes the next
    tensor; :meth:`write` returns once the tensor is queued (at most one waits), so the
    caller must not modify a tensor after handing it over. Write errors surface at the
    next :meth:`write` or at :meth:`close`.
    """

    def __init__(self, path: Path, specs: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: Mapping[str, str] | None = None, *, background: bool = False) -> None:
        self.path = Path(path)
        self._specs = list(specs)
        self._next = 0
        self._rows = 0  # rows of tensor ``_next`` written so far by write_rows
        self._file = open(self.path, "wb")
        header = _header_bytes(self._specs, metadata or {})
        self._file.write(header)
        self._offset = len(header)
        self._error: BaseException | None = None
        self._discard = False
        self._thread: threading.Thread | None = None
        if background:
            self._queue: queue.Queue = queue.Queue(maxsize=1)
            self._thread = threading.Thread(target=self._drain, name="cmerge-write", daemon=True)
            self._thread.start()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        exp_name, exp_dtype, exp_shape = self._specs[self._next]
        if self._rows or name != exp_name or tensor.dtype != exp_dtype or tuple(tensor.shape) != tuple(exp_shape):
            raise ValueError(f"expected {exp_name} {exp_dtype} {exp_shape}, got {name} {tensor.dtype} {tuple(tensor.shape)}")
        self._put(tensor)
        self._next += 1

    def write_rows(self, name: str, block: torch.Tensor) -> None:
        """Append the next rows of the current tensor; it is complete once all its rows are written."""
        exp_name, exp_dtype, exp_shape = self._specs[self._next]
        shape = tuple(block.shape)
        if (name != exp_name or block.dtype != exp_dtype or not exp_shape or shape[1:] != tuple(exp_shape[1:])
                or self._rows + shape[0] > exp_shape[0]):
            raise ValueError(f"expected rows {self._rows}.. of {exp_name} {exp_dtype} {exp_shape}, "
                             f"got {name} {block.dtype} {shape}")
        self._put(block)
        self._rows += shape[0]
        if self._rows == exp_shape[0]:
            self._rows = 0
            self._next += 1

    def _put(self, tensor: torch.Tensor) -> None:
        if self._thread is None:
            self._write_bytes(tensor)
        else:
            if self._error is not None:
                raise self._error
            self._queue.put(tensor)

    def _write_bytes(self, tensor: torch.Tensor) -> None:
        data = tensor_bytes(tensor)
        self._file.write(data)
        n = data.nbytes
        if _START_WRITEBACK is not None and n >= _WRITEBACK_MIN_BYTES:
            self._file.flush()
            _START_WRITEBACK(self._file.fileno(), self._offset, n)
        self._offset += n

    def _drain(self) -> None:
        while True:
            tensor = self._queue.get()
            if tensor is None:
                return
            if self._error is None and not self._discard:
                try:
                    self._write_bytes(tensor)
                except BaseException as exc:  # handed to the caller by write() or close()
                    self._error = exc
            del tensor

    def _stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def close(self) -> None:
        self._stop()
        if self._error is not None:
            self._file.close()
            raise self._error
        if self._next != len(self._specs):
            self._file.close()
            raise ValueError(f"{self.path}: only {self._next} of {len(self._specs)} tensors were written")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def abort(self) -> None:
        self._discard = True
        self._stop()
        self._file.close()


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


def plan_shards(specs: Sequence[tuple[str, torch.dtype, tuple[int, ...]]], max_bytes: int) -> list[list[tuple]]:
    """Split tensors, in order, into shards of at most ``max_bytes`` (a bigger tensor gets its own)."""
    shards: list[list[tuple]] = [[]]
    size = 0
    for spec in specs:
        n = TensorMeta(tuple(spec[2]), spec[1]).nbytes
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += n
    return shards


def write_sharded(out_dir: Path, specs: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
                  tensors: Iterable[tuple[str, torch.Tensor]], max_shard_bytes: int,
                  metadata: Mapping[str, str] | None = None, *, background: bool = False) -> list[Path]:
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


def is_weight_file(path: Path) -> bool:
    return path.suffix in WEIGHT_SUFFIXES or path.name in (SAFETENSORS_INDEX, TORCH_INDEX)


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
