"""Streams a model through a method, one tensor at a time.

A step reads, for each tensor name in sorted order, the base tensor, the method's
accumulators and the incoming tensor; applies the method's rule in the compute dtype on
the chosen device; hands the new accumulators to a sink; and adds up the global sums.
A background thread reads (and hashes) the next tensors while the current one is
computed, so memory holds a few tensors, never a model. Where the sources, the state and
the method's rule allow it (``Method.elementwise``), a large tensor goes through in blocks
of rows (`row_blocks`), so memory holds a few blocks of it, never the whole tensor.
"""
from __future__ import annotations

import ctypes
import functools
import math
import os
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol

import torch
from tqdm.auto import tqdm

from .checkpoint import (TensorMeta, TensorSource, combine_digests, digest_start, dtype_name, open_source,
                         read_streamed, tensor_bytes, tensor_digest)
from .errors import CmergeError
from .layers import PASSTHROUGH, is_projected
from .methods.base import Method, TensorStep, sq_norm


@dataclass(frozen=True)
class Plan:
    """The base model's tensors: names (sorted), shapes/dtypes, and kinds (layers.py)."""

    metas: Mapping[str, TensorMeta]
    kinds: Mapping[str, str]

    @property
    def names(self) -> list[str]:
        return sorted(self.metas)

    def merged_names(self) -> list[str]:
        return [n for n in self.names if self.kinds[n] != PASSTHROUGH]


class AccumulatorReader(Protocol):
    def get(self, acc: str, name: str) -> torch.Tensor: ...

    # optional: get_rows(acc, name, rows) -> the rows of one accumulator tensor


class AccumulatorSink(Protocol):
    def put(self, acc: str, name: str, tensor: torch.Tensor) -> None: ...

    # optional: put_rows(acc, name, block) -> the next rows of one accumulator tensor. A
    # reader with get_rows and a sink with put_rows let element-wise rules see row blocks.


def accumulator_key(acc: str, name: str) -> str:
    return f"{acc}/{name}"


def accumulator_specs(plan: Plan, method: Method, dtype: torch.dtype) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """The accumulator tensors a step writes, in the order it writes them."""
    return [(accumulator_key(a, n), dtype, plan.metas[n].shape) for n in plan.merged_names() for a in method.accumulators]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CmergeError(f"--device {device} was asked for, but no CUDA device is available.")
    try:
        return torch.device(device)
    except RuntimeError:
        raise CmergeError(f"unknown device {device!r}; use cpu, cuda or auto.") from None


def check_compatible(plan: Plan, source: TensorSource, what: str) -> None:
    """Names, shapes and floating dtypes of ``source`` must match the base's; one sentence if not."""
    have, want = set(source.keys()), set(plan.metas)
    missing, extra = sorted(want - have), sorted(have - want)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CmergeError(f"{what} is missing tensor {missing[0]!r}{more} that the base model has.")
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise CmergeError(f"{what} has tensor {extra[0]!r}{more} that the base model does not have.")
    for name in plan.names:
        m, b = source.meta(name), plan.metas[name]
        if m.shape != b.shape:
            raise CmergeError(f"{what}: tensor {name!r} has shape {list(m.shape)} but the base's is {list(b.shape)}.")
        if b.dtype.is_floating_point and not m.dtype.is_floating_point:
            raise CmergeError(f"{what}: tensor {name!r} has non-floating dtype {dtype_name(m.dtype)}; "
                              f"the base's is {dtype_name(b.dtype)}.")
        if not b.dtype.is_floating_point and m.dtype.is_floating_point:
            raise CmergeError(f"{what}: tensor {name!r} is floating but the base's is {dtype_name(b.dtype)}.")


# Read-ahead of at most this many bytes: more is read only when asked for (see _prefetch).
READ_AHEAD_BYTES = 1 << 26
# After a whole tensor at least this large, freed heap memory is given back (`trim_heap`).
TRIM_ELEMENTS = 1 << 24


def trim_heap() -> None:
    """Hand the C heap's free pages back to the system (glibc's ``malloc_trim``; elsewhere a no-op).

    A rule on a large tensor frees many temporaries of 32 MB and less, which glibc keeps
    in its heap rather than unmapping; on the 536 M-parameter benchmark model they held
    ~100-200 MB of peak RSS until the end of the step. One call costs a few milliseconds.
    """
    fn = _malloc_trim()
    if fn is not None:
        fn(0)


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def _prefetch(produce: Callable[[Any], Any], names: list[Any], depth: int = 2,
              size: Callable[[Any], int] | None = None) -> Iterator[tuple[Any, Any]]:
    """Yield (item, produce(item)) for each item of ``names``, ``depth`` ahead in a background thread.

    ``size(item)``: the bytes ``produce`` will hold; the thread then stays at most
    `READ_AHEAD_BYTES` ahead, and an item larger than that alone is read only once the
    consumer asks for it (when it is done with the previous one), so the two never
    coexist: the reading of a large tensor is not overlapped with computing, but its
    bytes are not held twice.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    room = threading.Condition()
    ahead = [0]  # bytes produced (or being produced) and not yet taken by the consumer
    asked = [False]  # the consumer is waiting for the next item
    done = object()

    def may_read(nbytes: int) -> bool:
        if stop.is_set():
            return True
        if nbytes > READ_AHEAD_BYTES:
            return ahead[0] == 0 and asked[0]
        return ahead[0] + nbytes <= READ_AHEAD_BYTES or ahead[0] == 0

    def worker() -> None:
        try:
            for n in names:
                nbytes = size(n) if size is not None else 0
                with room:
                    room.wait_for(lambda: may_read(nbytes))
                    ahead[0] += nbytes
                if stop.is_set():
                    return
                q.put((n, produce(n), nbytes))
            q.put(done)
        except BaseException as exc:  # handed to the consumer
            q.put(exc)

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    try:
        while True:
            with room:
                asked[0] = True
                room.notify()
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            n, value, nbytes = item
            del item
            with room:
                ahead[0] -= nbytes
                asked[0] = False
                room.notify()
            yield n, value
            del value
    finally:
        stop.set()
        with room:
            room.notify()
        while thread.is_alive():  # unblock a worker waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                pass
            thread.join(timeout=0.05)


def _task_vector(x: torch.Tensor, b: torch.Tensor, dev: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """τ = x − b in ``dtype`` on ``dev``, bit for bit ``x.to(dev, dtype) - b.to(dev, dtype)``.

    A base stored in a float narrower than ``dtype`` (float16, bfloat16 for float32) is
    subtracted as it is: widening it is exact, so the difference is the same, without a
    ``dtype`` copy of the base. A wider one is rounded to ``dtype`` first, as before. The
    subtraction is in place when ``to`` made a new tensor (never in the caller's ``x``).
    """
    bc = b.to(dev) if torch.promote_types(b.dtype, dtype) == dtype else b.to(dev, dtype)
    xc = x.to(dev, dtype)
    if xc is x or xc.data_ptr() == x.data_ptr():
        return xc - bc
    return xc.sub_(bc)


class _LazyBaseStep(TensorStep):
    """A TensorStep whose ``base`` is converted to the compute dtype and device on first use.

    τ is computed from the stored base directly (``_task_vector``), and no rule of cmerge's
    reads ``base``: for a float16 / bfloat16 model, converting it anyway was a float32 copy
    of every weight. A rule that reads it gets exactly ``base.to(device, compute dtype)``.
    Given ``base=None`` and a ``reload``, the base tensor is not even held: it is read
    again on first use.
    """

    convert: tuple[torch.device, torch.dtype] | None = None  # (device, dtype), set by run_step
    reload: Callable[[], torch.Tensor] | None = None  # reads the base tensor again, set by run_step

    @property  # type: ignore[override]
    def base(self) -> torch.Tensor:
        d = self.__dict__
        if "_base_c" not in d:
            raw = d["_base_raw"]
            if raw is None and self.reload is not None:
                raw = self.reload()
            d["_base_c"] = raw if self.convert is None else raw.to(*self.convert)
        return d["_base_c"]

    @base.setter
    def base(self, value: torch.Tensor) -> None:
        self.__dict__["_base_raw"] = value
        self.__dict__.pop("_base_c", None)


@dataclass
class StepOutcome:
    scalars: dict[str, Any]
    tau_norm: float
    incoming_sha256: str
    base_sha256: str | None
    notes: dict[str, Any] = field(default_factory=dict)


def run_step(method: Method, scalars: Mapping[str, Any], t: int, plan: Plan, base: TensorSource,
             incoming: TensorSource, acc: AccumulatorReader | None, sink: AccumulatorSink, *,
             extras: Mapping[str, TensorSource] | None = None, compute_dtype: torch.dtype = torch.float32,
             acc_dtype: torch.dtype = torch.float32, device: str = "cpu", hash_base: bool = True,
             progress: bool = False, desc: str = "merging", map_reads: bool = False) -> StepOutcome:
    """Fold one model into the accumulators (step ``t``, 1-based). Writes only to ``sink``.

    ``map_reads``: read safetensors files through short-lived maps (``read_streamed``),
    for callers that keep none of the tensors they are given.
    """
    dev = resolve_device(device)
    get = read_streamed if map_reads else _plain_get
    extras = dict(extras or {})
    for key, src in extras.items():
        check_extra(plan, src, key)
    base_digests = _Digests(base)
    inc_digests = _Digests(incoming)
    first = t == 1 or acc is None
    # one accumulator only: a file holds each tensor's accumulators side by side, so the rows of
    # two accumulators of one tensor cannot both be streamed in order
    by_rows = (len(method.accumulators) == 1 and hasattr(sink, "put_rows") and base.reads_rows and incoming.reads_rows
               and all(src.reads_rows for src in extras.values()) and (first or hasattr(acc, "get_rows")))

    def blocks(name: str) -> list[slice] | None:
        kind = plan.kinds[name]
        if not by_rows or kind == PASSTHROUGH or not method.elementwise(is_projected(kind)):
            return None
        return row_blocks(plan.metas[name].shape)

    units = _units(plan.names, blocks)

    def unit_bytes(unit: Unit) -> int:
        per_element = 2 * plan.metas[unit[0]].dtype.itemsize
        if not first:
            per_element += len(method.accumulators) * acc_dtype.itemsize
        return _elements(plan, unit) * per_element  # base and incoming (alike), the accumulators

    def read(unit: Unit):
        name, rows, last = unit
        b, x = _read_part(base, name, rows, get), _read_part(incoming, name, rows, get)
        if hash_base:
            base_digests.add(name, rows, last, b)
        inc_digests.add(name, rows, last, x)
        if plan.kinds[name] == PASSTHROUGH:
            return None
        # NaN / Inf in x: checked on the main thread from ‖τ‖², which is computed anyway
        if first:
            accs = {}
        else:
            accs = {a: _read_acc_part(acc, a, name, rows) for a in method.accumulators}
        ext = {k: _read_part(src, name, rows) for k, src in extras.items()}
        for k, v in ext.items():
            if v.dtype.is_floating_point and not bool(torch.isfinite(v).all()):
                raise CmergeError(f"{extras[k].description}: tensor {name!r} contains NaN or Inf; nothing was changed.")
        return b, x, accs, ext

    sums: dict[str, float] = {"tau_sq": 0.0}
    notes: dict[str, Any] = {}
    bar = tqdm(total=len(plan.metas), desc=desc, unit="tensor", disable=not progress, leave=False)
    try:
        for (name, rows, last), item in _prefetch(read, units, size=unit_bytes):
            if last:
                bar.update(1)
            if item is None:
                continue
            b, x, accs, ext = item
            del item
            tau = _task_vector(x, b, dev, compute_dtype)
            tau_sq = sq_norm(tau)
            # ‖τ‖² (float64) is finite whenever τ is, so only a non-finite one needs the full check
            if not math.isfinite(tau_sq) and not bool(torch.isfinite(x).all()):
                raise CmergeError(f"{incoming.description}: tensor {name!r} contains NaN or Inf; nothing was changed.")
            del x, b  # mapped reads are unmapped here, not after the rule
            step = _LazyBaseStep(name=name, t=t, base=None, tau=tau,  # type: ignore[arg-type]
                                 acc={k: v.to(dev, compute_dtype) for k, v in accs.items()}, scalars=scalars,
                                 projected=is_projected(plan.kinds[name]),
                                 extra={k: v.to(dev, compute_dtype) for k, v in ext.items()},
                                 extra_meta={k: src.metadata for k, src in extras.items()}, tau_owned=True)
            step.convert = (dev, compute_dtype)
            step.reload = functools.partial(_read_part, base, name, rows)
            update = method.rule(step)
            sums["tau_sq"] += tau_sq
            for k, v in update.sums.items():
                sums[k] = sums.get(k, 0.0) + v
            if update.note is not None:
                notes[name] = update.note
            for a in method.accumulators:
                new = update.acc[a].to("cpu", acc_dtype)
                if rows is None:
                    sink.put(a, name, new)
                else:
                    sink.put_rows(a, name, new)  # type: ignore[attr-defined]
            del tau, step, update, accs, ext  # freed before the next tensor arrives, not after
            if rows is None and _elements(plan, (name, rows, last)) >= TRIM_ELEMENTS:
                trim_heap()
    finally:
        bar.close()
    new_scalars = method.finalize(scalars, sums, t)
    return StepOutcome(new_scalars, sums["tau_sq"] ** 0.5, combine_digests(inc_digests.out),
                       combine_digests(base_digests.out) if hash_base else None, notes)


# Element-wise rules take tensors larger than this in blocks of rows of about this many
# elements (16 MB of float32): a step then never holds a large tensor whole, and blocks of
# one size are served again from the allocator's free memory instead of fresh pages.
BLOCK_ELEMENTS = 1 << 22


def row_blocks(shape: tuple[int, ...], block: int | None = None) -> list[slice] | None:
    """Slices of the first dimension with about ``block`` elements each; None if one block holds it all."""
    block = BLOCK_ELEMENTS if block is None else block
    if len(shape) < 1 or math.prod(shape) <= block:
        return None
    step = max(1, block // max(1, math.prod(shape[1:])))
    return [slice(i, min(i + step, shape[0])) for i in range(0, shape[0], step)]


Unit = tuple[str, "slice | None", bool]  # (tensor name, its rows or None for all of it, last unit of it)


def _units(names: list[str], blocks: Callable[[str], list[slice] | None]) -> list[Unit]:
    """The work of a pass in order: each tensor whole, or its row blocks one after another."""
    out: list[Unit] = []
    for n in names:
        bl = blocks(n)
        if bl is None:
            out.append((n, None, True))
        else:
            out.extend((n, rows, i == len(bl) - 1) for i, rows in enumerate(bl))
    return out


def _elements(plan: Plan, unit: Unit) -> int:
    name, rows, _ = unit
    shape = plan.metas[name].shape
    n = math.prod(shape)
    return n if rows is None else n // shape[0] * (rows.stop - rows.start)


class _Digests:
    """`tensor_digest` of each tensor read from ``src``, whole or in row blocks given in order."""

    def __init__(self, src: TensorSource, into: dict[str, bytes] | None = None) -> None:
        self.src = src
        self.out: dict[str, bytes] = {} if into is None else into
        self._open: dict[str, Any] = {}

    def add(self, name: str, rows: slice | None, last: bool, tensor: torch.Tensor) -> None:
        if rows is None:
            self.out[name] = tensor_digest(name, tensor)
            return
        if rows.start == 0:
            meta = self.src.meta(name)
            self._open[name] = digest_start(name, meta.dtype, meta.shape)
        self._open[name].update(tensor_bytes(tensor))
        if last:
            self.out[name] = self._open.pop(name).digest()


def _plain_get(source: TensorSource, name: str) -> torch.Tensor:
    return source.get(name)


def _read_part(source: TensorSource, name: str, rows: slice | None,
               get: Callable[[TensorSource, str], torch.Tensor] = _plain_get) -> torch.Tensor:
    """A unit's tensor: ``get(source, name)``, or only rows ``rows`` of it (`TensorSource.get_rows`)."""
    return get(source, name) if rows is None else source.get_rows(name, rows)


def _read_acc_part(acc: AccumulatorReader, which: str, name: str, rows: slice | None) -> torch.Tensor:
    """A unit's accumulator tensor, whole or only rows ``rows`` of it (the reader's ``get_rows``)."""
    return acc.get(which, name) if rows is None else acc.get_rows(which, name, rows)  # type: ignore[attr-defined]


def resolve_extras(method: Method, model: Any, given: Mapping[str, Any] | None) -> dict[str, TensorSource]:
    """Open the method's extra per-tensor inputs: given ones, else the default file beside a model folder."""
    given = dict(given or {})
    unknown = sorted(set(given) - set(method.extra_inputs))
    if unknown:
        raise CmergeError(f"method {method.name!r} takes no --{unknown[0]} input.")
    out: dict[str, TensorSource] = {}
    for key, filename in method.extra_inputs.items():
        value = given.get(key)
        if value is None and isinstance(model, (str, os.PathLike)) and Path(model).is_dir() \
                and (Path(model) / filename).exists():
            value = Path(model) / filename
        if value is None:
            raise CmergeError(f"method {method.name!r} needs the model's {key} values (--{key} FILE, or "
                              f"{filename} beside the model); none was found.")
        out[key] = open_source(value, description=f"{key} file {value}" if not isinstance(value, Mapping) else key)
    return out


def check_extra(plan: Plan, source: TensorSource, key: str) -> None:
    """Extra per-tensor inputs (e.g. second moments) must cover every merged tensor with its shape."""
    for name in plan.merged_names():
        if name not in source.keys():
            raise CmergeError(f"{source.description} ({key}) has no tensor {name!r}.")
        if source.meta(name).shape != plan.metas[name].shape:
            raise CmergeError(f"{source.description} ({key}): tensor {name!r} has shape "
                              f"{list(source.meta(name).shape)} but the base's is {list(plan.metas[name].shape)}.")


def iter_merged(method: Method, scalars: Mapping[str, Any], plan: Plan, base: TensorSource,
                acc: AccumulatorReader, *, dtype: torch.dtype | None = None,
                compute_dtype: torch.dtype = torch.float32, device: str = "cpu",
                digests: dict[str, bytes] | None = None, progress: bool = False,
                desc: str = "exporting", map_reads: bool = False,
                by_rows: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, θ_merged tensor) in sorted order, cast to ``dtype`` (default: the base's).

    ``map_reads``: read the base's merged tensors through short-lived maps (see run_step);
    passthrough tensors, yielded as read, are always read plainly.
    ``by_rows``: yield large merged tensors as consecutive row blocks, (name, block) each
    (`row_blocks`), where the base and the accumulators can be read by rows and the
    method's ``merged`` is element-wise; a block has fewer rows than its tensor.
    """
    dev = resolve_device(device)
    get = read_streamed if map_reads else _plain_get
    by_rows = by_rows and method.merged_by_rows and base.reads_rows and hasattr(acc, "get_rows")
    hashes = _Digests(base, digests) if digests is not None else None

    def blocks(name: str) -> list[slice] | None:
        return row_blocks(plan.metas[name].shape) if by_rows and plan.kinds[name] != PASSTHROUGH else None

    def read(unit: Unit):
        name, rows, last = unit
        b = base.get(name) if plan.kinds[name] == PASSTHROUGH else _read_part(base, name, rows, get)
        if hashes is not None:
            hashes.add(name, rows, last, b)
        if plan.kinds[name] == PASSTHROUGH:
            return b, None
        return b, {a: _read_acc_part(acc, a, name, rows) for a in method.accumulators}

    def unit_bytes(unit: Unit) -> int:
        per_element = plan.metas[unit[0]].dtype.itemsize + len(method.accumulators) * compute_dtype.itemsize
        return _elements(plan, unit) * per_element

    bar = tqdm(total=len(plan.metas), desc=desc, unit="tensor", disable=not progress, leave=False)
    try:
        for (name, _, last), (b, accs) in _prefetch(read, _units(plan.names, blocks), size=unit_bytes):
            if last:
                bar.update(1)
            if accs is None:
                yield name, b
                continue
            merged = method.merged(b.to(dev, compute_dtype), {k: v.to(dev, compute_dtype) for k, v in accs.items()},
                                   scalars)
            del b, accs
            yield name, merged.to("cpu", dtype or plan.metas[name].dtype)
    finally:
        bar.close()
