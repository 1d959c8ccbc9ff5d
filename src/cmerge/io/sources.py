"""Tensor sources: models whose tensors are read lazily, one at a time, by name (and rows).

A source is a Hugging Face folder (single or sharded safetensors with
``model.safetensors.index.json``, or ``pytorch_model.bin``, sharded too), a single
``.safetensors`` / ``.pt`` / ``.bin`` file, or, in Python, a state dict or ``nn.Module``.
Every source reads a tensor whole or only a block of its rows (``get(name, rows)``), and
turns unreadable data into one :class:`CmergeError` sentence.

Read policy (chosen when the source is opened): by default a safetensors tensor is read
with ``pread`` into a fresh buffer, so the process holds only the tensors in use (a mapped
file's touched pages would stay resident and make peak RSS grow with the model size).
``mapped=True`` gives each large tensor a private, copy-on-write map of just its own pages,
unmapped when the last view of the tensor is freed: it saves the copy of every byte and
the page faults of a fresh buffer (several times faster than ``pread`` on page-cached
files), but a mapped tensor holds a file descriptor and faults (SIGBUS) if the file is
truncated while the tensor is alive, so it is for callers that use each tensor for a
moment and drop it (a merge step, an export), not for ones that keep tensors.
"""
from __future__ import annotations

import json
import mmap
import os
import pickle
import struct
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from safetensors import safe_open

from ..errors import CmergeError
from .tensors import ST_DTYPES, TensorMeta

SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_INDEX = "pytorch_model.bin.index.json"
#: file suffixes of model weights in any format cmerge knows of (copied never as "aux" files)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")

_HAS_MAP = hasattr(mmap, "MAP_PRIVATE") and hasattr(mmap, "PROT_WRITE")


class TensorSource:
    """A model whose tensors are read lazily, by name. Subclasses fill ``_meta`` and ``_read``."""

    description: str = "model"
    folder: Path | None = None  # where config / tokenizer files live, if any

    def __init__(self) -> None:
        self._meta: dict[str, TensorMeta] = {}
        self.metadata: dict[str, str] = {}  # file-level metadata (safetensors ``__metadata__``)
        self.files: list[Path] = []         # the weight files read (none for in-memory models)

    def keys(self) -> list[str]:
        return sorted(self._meta)

    def meta(self, name: str) -> TensorMeta:
        return self._meta[name]

    def get(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """Tensor ``name``, or only rows ``rows`` of it (a slice of the first dimension, step 1).

        An unknown name or unreadable data is one CmergeError.
        """
        if name not in self._meta:
            raise CmergeError(f"{self.description} has no tensor named {name!r}.")
        try:
            return self._read(name, rows)
        except CmergeError:
            raise
        except Exception as exc:  # truncated or corrupt data surfaces here
            raise CmergeError(f"could not read tensor {name!r} from {self.description} ({exc}).") from exc

    def _read(self, name: str, rows: slice | None) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self._meta)


class MappingSource(TensorSource):
    """An in-memory state dict (or a module's), read without copies (a row block is a view)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], description: str = "state dict") -> None:
        super().__init__()
        self.description = description
        self._tensors = {}
        for name, t in tensors.items():
            if not isinstance(t, torch.Tensor):
                raise CmergeError(f"{description}: entry {name!r} is a {type(t).__name__}, not a tensor.")
            self._tensors[name] = t
            self._meta[name] = TensorMeta(tuple(t.shape), t.dtype)

    def _read(self, name: str, rows: slice | None) -> torch.Tensor:
        t = self._tensors[name].detach()
        return t if rows is None else t[rows]


class SafetensorsSource(TensorSource):
    """One or more safetensors files, read one tensor (or block of rows) at a time; see the module doc.

    The header is validated by the ``safetensors`` library; the bytes are then read with
    ``pread`` (or mapped, for ``mapped=True`` sources and tensors of at least
    ``MAP_MIN_BYTES``).
    """

    MAP_MIN_BYTES = 1 << 20  # smaller tensors are read with pread (a map costs a few syscalls)

    def __init__(self, files: Sequence[Path], description: str, folder: Path | None = None, *,
                 mapped: bool = False, weight_map: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self.description = description
        self.folder = folder
        self.mapped = mapped
        self._where: dict[str, tuple[Path, int, int]] = {}  # name -> (file, absolute offset, byte count)
        self._fds: dict[Path, int] = {}
        for f in files:
            try:
                h = safe_open(str(f), framework="pt", device="cpu")  # validates header and file size
                self.metadata.update(h.metadata() or {})
                for n in h.keys():
                    sl = h.get_slice(n)
                    dt = ST_DTYPES.get(sl.get_dtype())
                    if dt is None:
                        raise CmergeError(f"{f}: tensor {n!r} has unsupported dtype {sl.get_dtype()}.")
                    _add_name(self._meta, n, TensorMeta(tuple(sl.get_shape()), dt), f)
                del h
                start, offsets = data_offsets(f)
            except CmergeError:
                raise
            except Exception as exc:
                raise CmergeError(f"could not read {f}: not a valid safetensors file ({_safetensors_reason(exc)}).") from exc
            for n, (begin, end) in offsets.items():
                self._where[n] = (f, start + begin, end - begin)
            self._fds[f] = os.open(str(f), os.O_RDONLY)
        self.files = list(files)
        _check_index(weight_map, {n: w[0] for n, w in self._where.items()}, folder)

    def _read(self, name: str, rows: slice | None) -> torch.Tensor:
        path, offset, count = self._where[name]
        meta = self._meta[name]
        if rows is not None and meta.shape:
            start, stop, step = rows.indices(meta.shape[0])
            if step != 1:
                raise ValueError(f"rows must be a slice with step 1, got {rows}")
            row_bytes = count // meta.shape[0] if meta.shape[0] else 0
            n = max(0, stop - start)
            buf = self._pread(name, path, offset + start * row_bytes, n * row_bytes)
            return buf.view(meta.dtype).reshape(n, *meta.shape[1:])
        if self.mapped and count >= self.MAP_MIN_BYTES and _HAS_MAP:
            t = self._map(name, path, offset, count, meta)
            if t is not None:
                return t
        t = self._pread(name, path, offset, count).view(meta.dtype).reshape(meta.shape)
        return t if rows is None else t[rows]

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

    def _map(self, name: str, path: Path, offset: int, count: int, meta: TensorMeta) -> torch.Tensor | None:
        """The tensor's bytes through a private map of its pages; None where that is not possible."""
        if offset % meta.dtype.itemsize:
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


def _add_name(metas: dict[str, TensorMeta], name: str, meta: TensorMeta, path: Path) -> None:
    if name in metas:
        raise CmergeError(f"{path}: tensor {name!r} is stored twice (in two files of one model); remove one copy.")
    metas[name] = meta


def _check_index(weight_map: Mapping[str, str] | None, where: Mapping[str, Path], folder: Path | None) -> None:
    """Every tensor lies in the shard the index names for it, and the index names every tensor."""
    if weight_map is None:
        return
    for name, shard in weight_map.items():
        if name not in where:
            raise CmergeError(f"the shard index of {folder} puts tensor {name!r} in {shard}, which does not hold it.")
        if where[name].name != Path(shard).name:
            raise CmergeError(f"the shard index of {folder} puts tensor {name!r} in {shard}, but it is in "
                              f"{where[name].name}.")
    unlisted = sorted(set(where) - set(weight_map))
    if unlisted:
        raise CmergeError(f"the shard index of {folder} does not list tensor {unlisted[0]!r} of {where[unlisted[0]].name}.")


def data_offsets(path: Path) -> tuple[int, dict[str, tuple[int, int]]]:
    """Where a safetensors file's data starts, and each tensor's [begin, end) byte range in it."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return 8 + n, {k: tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__"}


class TorchFileSource(TensorSource):
    """``.bin`` / ``.pt`` files saved by ``torch.save`` (tensors only); memory-mapped when the format allows."""

    def __init__(self, files: Sequence[Path], description: str, folder: Path | None = None, *,
                 weight_map: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self.description = description
        self.folder = folder
        self._tensors: dict[str, torch.Tensor] = {}
        where: dict[str, Path] = {}
        for f in files:
            for n, t in torch_load(f).items():
                _add_name(self._meta, n, TensorMeta(tuple(t.shape), t.dtype), f)
                self._tensors[n], where[n] = t, f
        self.files = list(files)
        _check_index(weight_map, where, folder)

    def _read(self, name: str, rows: slice | None) -> torch.Tensor:
        t = self._tensors[name]
        return t if rows is None else t[rows]


def torch_load(path: Path) -> dict[str, torch.Tensor]:
    """A state dict of tensors from a ``torch.save`` file, with ``weights_only=True``; one sentence if not."""
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
            else _first_line(exc)
        raise CmergeError(f"could not read {path}: not a readable torch checkpoint ({detail}).") from exc
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CmergeError(f"{path} does not hold a state dict of tensors.")
    return dict(obj)


def _safetensors_reason(exc: BaseException) -> str:
    """The safetensors library's own reason, without its prefix and its list of every dtype it knows."""
    text = _first_line(exc).removeprefix("Error while deserializing header: ")
    return text.split(", expected one of")[0]


def _first_line(exc: BaseException) -> str:
    return ((str(exc).strip().splitlines() or [type(exc).__name__])[0]).rstrip(".")


def open_source(model: object, description: str | None = None, *, mapped: bool = False,
                base: TensorSource | None = None) -> TensorSource:
    """Open a model for lazy reading: a path (folder or file), a state dict, an ``nn.Module`` or a source.

    ``mapped``: the read policy of safetensors files (see the module docstring). A PEFT
    adapter folder opens as the task vectors it stands for on ``base`` (io/peft.py).
    """
    if isinstance(model, TensorSource):
        return model
    if isinstance(model, torch.nn.Module):
        return MappingSource(model.state_dict(), description or f"module {type(model).__name__}")
    if isinstance(model, Mapping):
        return MappingSource(model, description or "state dict")
    if isinstance(model, (str, os.PathLike)):
        from .hub import download, looks_like_hub_id
        from .peft import LoraSource, is_adapter

        path = Path(model)
        if looks_like_hub_id(str(model)):
            path = download(str(model))
        if is_adapter(path):
            if base is None:
                raise CmergeError(f"{path} is a LoRA adapter; it can only be read against its base model (merge it "
                                  f"into a state or a Merger made for that base).")
            return LoraSource(path, base)
        return _open_path(path, description or str(model), mapped)
    raise CmergeError(f"cannot read a model from a {type(model).__name__}; pass a path, a state dict or a module.")


def _open_path(path: Path, desc: str, mapped: bool) -> TensorSource:
    try:
        exists, is_file = path.exists(), path.is_file()
    except OSError as exc:  # e.g. a symbolic link loop
        raise CmergeError(f"cannot open {path} ({_first_line(exc)}).") from None
    if not exists:
        if path.is_symlink():
            raise CmergeError(f"{path} is a symbolic link that leads nowhere (a loop of symbolic links, or a "
                              f"missing target).")
        raise CmergeError(f"{path} does not exist.")
    safetensors: Callable[..., TensorSource] = lambda files, folder=None, weight_map=None: SafetensorsSource(
        files, desc, folder, mapped=mapped, weight_map=weight_map)
    torch_files: Callable[..., TensorSource] = lambda files, folder=None, weight_map=None: TorchFileSource(
        files, desc, folder, weight_map=weight_map)
    if is_file:
        if path.suffix == ".safetensors":
            return safetensors([path])
        if path.suffix in TORCH_SUFFIXES:
            return torch_files([path])
        raise CmergeError(f"{path}: unknown weight file type {path.suffix!r} (expected .safetensors, .bin or .pt).")
    for index_name, open_files in ((SAFETENSORS_INDEX, safetensors), (TORCH_INDEX, torch_files)):
        index = path / index_name
        if index.exists():
            files, weight_map = _shards(index)
            return open_files(files, folder=path, weight_map=weight_map)
    for name, open_files in (("model.safetensors", safetensors), ("pytorch_model.bin", torch_files)):
        if (path / name).exists():
            return open_files([path / name], folder=path)
    found = sorted(p for p in path.iterdir() if p.suffix == ".safetensors")
    if len(found) == 1:
        return safetensors(found, folder=path)
    raise CmergeError(f"{path} holds no model weights (model.safetensors, a shard index or pytorch_model.bin).")


def _shards(index: Path) -> tuple[list[Path], dict[str, str]]:
    """The shard files a shard index names (each must exist) and its tensor → shard map."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError("weight_map is not an object of file names")
    except Exception as exc:
        raise CmergeError(f"{index} is not a valid shard index ({_first_line(exc)}).") from exc
    files = [index.parent / f for f in sorted(set(weight_map.values()))]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise CmergeError(f"{index} names shard {missing[0]}, which does not exist.")
    return files, weight_map


def is_weight_file(path: Path) -> bool:
    return path.suffix in WEIGHT_SUFFIXES or path.name in (SAFETENSORS_INDEX, TORCH_INDEX)


def describe(model: Any) -> str:
    """A path's absolute form, or a word for an in-memory model (for step logs)."""
    if isinstance(model, (str, os.PathLike)):
        return str(Path(model).resolve())
    return f"<in-memory {type(model).__name__}>"
