"""Streams a model through a method, one tensor (or block of rows) at a time.

A step visits the base model's tensor names in sorted order. For each, a background
thread (:class:`ReadAhead`) reads the base tensor, the incoming tensor, the method's
accumulators and extra inputs (sources hash what is read through them, see
``io.HashingSource``); the main thread forms τ = θ_t − θ0 in the compute dtype on the
compute device, calls the method's rule, checks what it would store and hands the new
accumulators to a sink; at the end the method turns the streamed sums into its global
numbers. Per tensor the path reads: engine → io (read + hash) → method → linalg →
engine → state's sink → io writer.

Memory holds a few tensors, never a model. A tensor larger than
``StepOptions.block_elements`` whose rule is element-wise (``Method.elementwise``, the one
switch) goes through in blocks of rows: every source, accumulator reader and sink takes
``rows=``, so memory holds a few blocks of it, never the whole tensor. Exports
(:func:`iter_merged`) stream every merged tensor by rows the same way.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import os
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Generic, Iterable, Iterator, Mapping, Protocol, TypeVar

import torch
from tqdm.auto import tqdm

from .errors import CmergeError
from .io import TensorMeta, TensorSource, dtype_name, open_source, rows_numel
from .io.peft import LoraFactors
from .layers import EMBEDDING_NAME, PASSTHROUGH, is_projected
from .lowrank import LowRank
from .methods.base import Method, TensorStep, sq_norm

# Element-wise rules take tensors larger than this in blocks of rows of about this many
# elements (16 MB of float32): a step then never holds a large tensor whole, and blocks of
# one size are served again from the allocator's free memory instead of fresh pages.
BLOCK_ELEMENTS = 1 << 22
# Read-ahead of at most this many bytes: more is read only when asked for (see ReadAhead).
READ_AHEAD_BYTES = 1 << 26
# After a whole tensor at least this large, freed heap memory is given back (`trim_heap`).
TRIM_ELEMENTS = 1 << 24
# Consecutive same-shape projected weights handed to a method's batched rule at once on a GPU
# (StepOptions.batch left unset); on the CPU the default is 1, the per-tensor path.
CUDA_BATCH = 8


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

    def accumulators(self, method: Method, name: str) -> tuple[str, ...]:
        """The accumulators ``method`` keeps for merged tensor ``name`` (`Method.accumulators_of`)."""
        return method.accumulators_of(is_projected(self.kinds[name]))


@dataclass(frozen=True)
class StepOptions:
    """How a step (or an export) runs; none of it changes a result.

    ``block_elements``: tensors larger than this go through element-wise rules in blocks of
    rows of about this many elements; ``read_ahead_bytes``: how far the reading thread may
    run ahead of the computation.

    ``batch``: up to this many projected weights of one shape, consecutive among the projected
    weights in the plan's order, go through the method's batched rule (``rule_batch``, e.g.
    OPCM's batched projection) at once, while the other tensors go through one by one past
    them; None: `CUDA_BATCH` on a CUDA device, 1 (the per-tensor path) elsewhere. A step then
    holds up to ``batch`` weights' task vectors and accumulators (and the rule's work arrays
    for all of them) instead of one, still never a model and never more as models are added;
    reads still run ahead by at most ``read_ahead_bytes``. Results equal the per-tensor
    path's to rounding (sums and products add in another order), not bit for bit.
    """

    compute_dtype: torch.dtype = torch.float32
    acc_dtype: torch.dtype = torch.float32
    device: str = "cpu"
    progress: bool = False
    desc: str = "merging"
    block_elements: int = BLOCK_ELEMENTS
    read_ahead_bytes: int = READ_AHEAD_BYTES
    batch: int | None = None


def batch_size(options: StepOptions, device: torch.device) -> int:
    """How many same-shape projected weights go through a batched rule at once (see StepOptions.batch)."""
    if options.batch is not None:
        return max(1, int(options.batch))
    return CUDA_BATCH if device.type == "cuda" else 1


class AccumulatorReader(Protocol):
    def get(self, acc: str, name: str, rows: slice | None = None) -> torch.Tensor: ...  # dense, always

    def get_factored(self, acc: str, name: str) -> LowRank: ...  # a tensor kept as factors


class AccumulatorSink(Protocol):
    def put(self, acc: str, name: str, tensor: torch.Tensor | LowRank, rows: slice | None = None) -> None: ...


@dataclass
class StepOutcome:
    scalars: dict[str, Any]
    tau_norm: float
    notes: dict[str, Any] = field(default_factory=dict)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CmergeError(f"--device {device} was asked for, but no CUDA device is available.")
    try:
        return torch.device(device)
    except RuntimeError:
        raise CmergeError(f"unknown device {device!r}; use cpu, cuda or auto.") from None


def model_device(model: torch.nn.Module) -> torch.device:
    """The device ``model``'s parameters are on (the CPU for a model without any)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


@contextlib.contextmanager
def seeded_on(device: torch.device, seed: int) -> Iterator[None]:
    """Seed the CPU's generator and, on a GPU, ``device``'s own; restore both on exit.

    ``fork_rng(devices=[])`` would restore only the CPU's, and leave the GPU's generator seeded."""
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield


def device_fields(device: torch.device) -> dict[str, str]:
    """What a result computed on ``device`` records: nothing on the CPU, ``{"device": device_name(device)}``
    elsewhere."""
    return {} if device.type == "cpu" else {"device": device_name(device)}


def device_name(device: torch.device) -> str:
    """``cuda (NVIDIA H100 80GB HBM3)`` for a GPU, the device's type otherwise: what a result computed there records."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


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
        if m.shape != b.shape and len(m.shape) == 2 == len(b.shape) and m.shape[1] == b.shape[1] \
                and m.shape[0] > b.shape[0] and EMBEDDING_NAME.search(name):
            raise CmergeError(f"{what} has {m.shape[0]} rows in {name!r} where the base has {b.shape[0]}: its "
                              f"vocabulary grew (resize_token_embeddings); a merge state made with --vocab union takes "
                              f"the new rows from the expert that added them (docs/methods.md), any other merge "
                              f"needs an expert of the base's vocabulary.")
        if m.shape != b.shape:
            raise CmergeError(f"{what}: tensor {name!r} has shape {list(m.shape)} but the base's is {list(b.shape)}.")
        if b.dtype.is_floating_point and not m.dtype.is_floating_point:
            raise CmergeError(f"{what}: tensor {name!r} has non-floating dtype {dtype_name(m.dtype)}; "
                              f"the base's is {dtype_name(b.dtype)}.")
        if not b.dtype.is_floating_point and m.dtype.is_floating_point:
            raise CmergeError(f"{what}: tensor {name!r} is floating but the base's is {dtype_name(b.dtype)}.")


def plan_factored(method: Method, plan: Plan, incoming: TensorSource, t: int,
                  previous: Mapping[str, int]) -> dict[str, int]:
    """The tensors whose accumulators stay (or start) factored after step t, with their widths.

    A 2-D tensor is factored when the method keeps factors, the incoming task vector is low
    rank there without the base (a LoRA adapter: its rank; untouched: 0), and the tensor was
    factored before (or this is the first step). Its width is the previous width plus the
    incoming rank: task arithmetic, averaging and OPCM's projection all stay in the span of
    the stacked factors. A dense input on a tensor turns it dense for good.
    """
    width_of = getattr(incoming, "low_rank_width", None)
    if method.space == "lora":
        if width_of is None or not hasattr(incoming, "lora_factors"):
            raise CmergeError(f"method {method.name} merges the factors of LoRA adapters, and {incoming.description} "
                              f"is not a LoRA adapter.")
        incoming.check_factors_only(method.name)  # type: ignore[attr-defined]
    if not method.factored or width_of is None:
        return {}
    out = {}
    for name in plan.merged_names():
        if len(plan.metas[name].shape) != 2:
            continue
        w = width_of(name)
        if w is None or (t > 1 and name not in previous):
            continue
        out[name] = method.factor_width(previous.get(name) if t > 1 else None, w)
    return out


def resolve_extras(method: Method, model: Any, given: Mapping[str, Any] | None) -> dict[str, TensorSource]:
    """Open the method's extra per-tensor inputs: given ones, else the default file beside a model folder."""
    given = {k: v for k, v in (given or {}).items() if v is not None}
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


# ---------------------------------------------------------------- memory

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


T = TypeVar("T")
V = TypeVar("V")


class ReadAhead(Generic[T, V]):
    """Iterate ``(item, produce(item))`` over ``items``, ``produce`` running ahead in a background thread.

    ``size(item)``: the bytes ``produce`` will hold; the thread then stays at most
    ``budget`` bytes ahead, and an item larger than that alone is read only once the
    consumer asks for it (when it is done with the previous one), so the two never
    coexist: the reading of a large tensor is not overlapped with computing, but its bytes
    are not held twice. An exception in ``produce`` is raised by the iteration, at its item.
    """

    _DONE = object()

    def __init__(self, produce: Callable[[T], V], items: Iterable[T], *, size: Callable[[T], int] | None = None,
                 budget: int = READ_AHEAD_BYTES, depth: int = 2) -> None:
        self.produce, self.items, self.size, self.budget = produce, list(items), size, budget
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.room = threading.Condition()
        self.ahead = 0        # bytes produced (or being produced) and not yet taken by the consumer
        self.asked = False    # the consumer is waiting for the next item

    def _may_read(self, nbytes: int) -> bool:
        if self.stop.is_set():
            return True
        if nbytes > self.budget:
            return self.ahead == 0 and self.asked
        return self.ahead + nbytes <= self.budget or self.ahead == 0

    def _work(self) -> None:
        try:
            for item in self.items:
                nbytes = self.size(item) if self.size is not None else 0
                with self.room:
                    self.room.wait_for(lambda: self._may_read(nbytes))
                    self.ahead += nbytes
                if self.stop.is_set():
                    return
                self.queue.put((item, self.produce(item), nbytes))
            self.queue.put(self._DONE)
        except BaseException as exc:  # handed to the consumer
            self.queue.put(exc)

    def __iter__(self) -> Iterator[tuple[T, V]]:
        thread = threading.Thread(target=self._work, name="cmerge-read", daemon=True)
        thread.start()
        try:
            while True:
                with self.room:
                    self.asked = True
                    self.room.notify()
                got = self.queue.get()
                if got is self._DONE:
                    return
                if isinstance(got, BaseException):
                    raise got
                item, value, nbytes = got
                del got
                with self.room:
                    self.ahead -= nbytes
                    self.asked = False
                    self.room.notify()
                yield item, value
                del value
        finally:
            self.stop.set()
            with self.room:
                self.room.notify()
            while thread.is_alive():  # unblock a worker waiting on a full queue
                try:
                    self.queue.get_nowait()
                except queue.Empty:
                    pass
                thread.join(timeout=0.05)


# ---------------------------------------------------------------- units of work

def row_blocks(shape: tuple[int, ...], block: int = BLOCK_ELEMENTS) -> list[slice] | None:
    """Slices of the first dimension with about ``block`` elements each; None if one block holds it all."""
    if len(shape) < 1 or math.prod(shape) <= block:
        return None
    step = max(1, block // max(1, math.prod(shape[1:])))
    return [slice(i, min(i + step, shape[0])) for i in range(0, shape[0], step)]


@dataclass(frozen=True)
class Unit:
    """One tensor, whole (``rows`` None) or one block of its rows; ``last``: its last unit."""

    name: str
    rows: slice | None = None
    last: bool = True


def units(plan: Plan, streamed: Callable[[str], bool], block: int) -> list[Unit]:
    """The work of a pass in order: each tensor whole, or, where ``streamed(name)``, its row blocks."""
    out: list[Unit] = []
    for n in plan.names:
        blocks = row_blocks(plan.metas[n].shape, block) if streamed(n) else None
        if blocks is None:
            out.append(Unit(n))
        else:
            out.extend(Unit(n, rows, i == len(blocks) - 1) for i, rows in enumerate(blocks))
    return out


def all_finite(t: torch.Tensor) -> bool:
    """Whether every value of ``t`` is finite: one float64 sum (finite for any finite float32 tensor), and
    the exact element check only if that sum is not finite."""
    if t.numel() == 0 or not t.dtype.is_floating_point:
        return True
    if math.isfinite(float(torch.sum(t, dtype=torch.float64))):
        return True
    return bool(torch.isfinite(t).all())


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


def _refuse_bad_task_vector(name: str, x: torch.Tensor, tau: torch.Tensor, incoming: TensorSource,
                            dtype: torch.dtype) -> None:
    """One sentence for a τ whose squared norm is not finite: a non-finite input, or values too large."""
    if not bool(torch.isfinite(x).all()):
        raise CmergeError(f"{incoming.description}: tensor {name!r} contains NaN or Inf; nothing was changed.")
    big = float(x.abs().max().double())
    if not bool(torch.isfinite(tau).all()):
        raise CmergeError(f"{incoming.description}: tensor {name!r} has values too large for {dtype_name(dtype)}, the "
                          f"merge state's precision (|x| up to {big:.3g}); nothing was changed.")
    raise CmergeError(f"{incoming.description}: tensor {name!r} has values so large (|x| up to {big:.3g}) that its "
                      f"task vector's norm overflows {dtype_name(dtype)}; nothing was changed.")


# ---------------------------------------------------------------- a step

def run_step(method: Method, scalars: Mapping[str, Any], t: int, plan: Plan, base: TensorSource,
             incoming: TensorSource, acc: AccumulatorReader | None, sink: AccumulatorSink, *,
             extras: Mapping[str, TensorSource] | None = None, factored: Mapping[str, int] | None = None,
             options: StepOptions = StepOptions()) -> StepOutcome:
    """Fold one model into the accumulators (step ``t``, 1-based). Writes only to ``sink``.

    ``incoming`` is a model (τ = θ_t − θ0 is formed here) or a source of task vectors
    (``incoming.deltas``, e.g. a LoRA adapter: τ comes from ``incoming.delta``). ``factored``:
    the tensors whose new accumulators the method keeps as low-rank factors (``LowRank``,
    lowrank.py), with their declared widths; their τ and old accumulators reach the rule as
    factors too. Every other tensor is dense, materialised where it came as factors.

    Refuses (CmergeError, before anything reaches the sink's destination) an input with
    NaN/Inf, a task vector that does not fit the compute dtype, and a step that would store
    a non-finite accumulator or global number.
    """
    opt = options
    dev = resolve_device(opt.device)
    extras = dict(extras or {})
    factored = dict(factored or {})
    deltas = bool(getattr(incoming, "deltas", False))
    lora_space = method.space == "lora"
    for key, src in extras.items():
        check_extra(plan, src, key)
    first = t == 1 or acc is None

    def streamed(name: str) -> bool:
        kind = plan.kinds[name]
        return kind != PASSTHROUGH and name not in factored and method.elementwise(is_projected(kind))

    def unit_bytes(u: Unit) -> int:
        per_element = 2 * plan.metas[u.name].dtype.itemsize  # base and incoming (alike)
        if not first:
            per_element += len(plan.accumulators(method, u.name)) * opt.acc_dtype.itemsize
        return rows_numel(plan.metas[u.name], u.rows) * per_element

    def read(u: Unit):
        if deltas:  # the task vector itself; the base is read only if a rule asks for it
            if plan.kinds[u.name] == PASSTHROUGH:
                return None
            if lora_space and u.name in factored:
                b, x = None, incoming.lora_factors(u.name, opt.compute_dtype)  # type: ignore[attr-defined]
            else:
                b, x = None, incoming.delta(u.name, u.rows, opt.compute_dtype)  # type: ignore[attr-defined]
        else:
            b, x = base.get(u.name, u.rows), incoming.get(u.name, u.rows)  # read (and hashed) even if passed through
            if plan.kinds[u.name] == PASSTHROUGH:
                return None
        # NaN / Inf in x: checked on the main thread from ‖τ‖², which is computed anyway
        if first:
            accs = {}
        elif u.name in factored:
            accs = {a: acc.get_factored(a, u.name)  # type: ignore[union-attr]
                    for a in plan.accumulators(method, u.name)}
        else:
            accs = {a: acc.get(a, u.name, u.rows)  # type: ignore[union-attr]
                    for a in plan.accumulators(method, u.name)}
        ext = {k: src.get(u.name, u.rows) for k, src in extras.items()}
        for k, v in ext.items():
            if v.dtype.is_floating_point and not all_finite(v):
                raise CmergeError(f"{extras[k].description}: tensor {u.name!r} contains NaN or Inf; nothing was changed.")
        return b, x, accs, ext

    sums: dict[str, float] = {"tau_sq": 0.0}
    notes: dict[str, Any] = {}
    batch = batch_size(opt, dev)
    rule_batch = getattr(method, "rule_batch", None) if batch > 1 else None
    group: list[tuple[Unit, float, TensorStep]] = []  # consecutive same-shape projected weights, for rule_batch

    def batched(u: Unit, step: TensorStep) -> bool:
        return (rule_batch is not None and u.rows is None and step.projected and not first and not lora_space
                and u.name not in factored and isinstance(step.tau, torch.Tensor) and step.tau.ndim == 2)

    def store(u: Unit, tau_sq: float, update: Any) -> None:
        sums["tau_sq"] += tau_sq
        for k, v in update.sums.items():
            sums[k] = sums.get(k, 0.0) + v
        if update.note is not None:
            notes[u.name] = update.note
        for a in plan.accumulators(method, u.name):
            new = _stored(update.acc[a], factored.get(u.name), opt.acc_dtype)
            if not (new.isfinite() if isinstance(new, LowRank) else all_finite(new)):
                raise CmergeError(f"merging {incoming.description} would store NaN or Inf in tensor {u.name!r} "
                                  f"({method.name}'s {a}, {dtype_name(opt.acc_dtype)}); nothing was changed.")
            sink.put(a, u.name, new, u.rows)

    def flush() -> None:
        steps = [st for _, _, st in group]
        updates = rule_batch(steps) if len(steps) > 1 else [method.rule(steps[0])]  # type: ignore[misc]
        del steps
        for (u, tau_sq, _), update in zip(group, updates):
            store(u, tau_sq, update)
        big = any(plan.metas[u.name].numel >= TRIM_ELEMENTS for u, _, _ in group)
        group.clear()
        del updates
        if big:
            trim_heap()

    bar = tqdm(total=len(plan.metas), desc=opt.desc, unit="tensor", disable=not opt.progress, leave=False)
    try:
        for u, item in ReadAhead(read, units(plan, streamed, opt.block_elements), size=unit_bytes,
                                 budget=opt.read_ahead_bytes):
            if u.last:
                bar.update(1)
            if item is None:
                continue
            b, x, accs, ext = item
            del item
            if lora_space and u.name in factored:  # A and B as trained; ‖τ‖ is still that of ΔW = s·B A
                tau = x if x is not None else LoraFactors.zeros(plan.metas[u.name].shape, opt.compute_dtype)
                tau_sq = tau.stored().scaled(tau.scale).sq_norm()
            elif deltas:
                tau, tau_sq = _given_task_vector(x, plan.metas[u.name], u, u.name in factored, dev, opt.compute_dtype)
                if not math.isfinite(tau_sq):
                    raise CmergeError(f"{incoming.description}: the task vector of tensor {u.name!r} is not finite in "
                                      f"{dtype_name(opt.compute_dtype)}; nothing was changed.")
            else:
                tau = _task_vector(x, b, dev, opt.compute_dtype)
                tau_sq = sq_norm(tau)
                # ‖τ‖² (float64) is finite whenever τ is (up to float64 overflow), so only then is a check needed
                if not math.isfinite(tau_sq):
                    _refuse_bad_task_vector(u.name, x, tau, incoming, opt.compute_dtype)
            del x, b  # mapped reads are unmapped here, not after the rule
            step = TensorStep(u.name, t, tau, {k: _on(v, dev, opt.compute_dtype) for k, v in accs.items()}, scalars,
                              is_projected(plan.kinds[u.name]),
                              load_base=functools.partial(_base_again, base, u, dev, opt.compute_dtype),
                              extra={k: v.to(dev, opt.compute_dtype) for k, v in ext.items()},
                              extra_meta={k: src.metadata for k, src in extras.items()}, tau_owned=True)
            if batched(u, step):  # held until the group is full or a projected weight of another shape comes
                if group and (group[0][2].tau.shape != step.tau.shape or len(group) >= batch):
                    flush()
                group.append((u, tau_sq, step))
                del tau, step, accs, ext
                continue
            update = method.rule(step)  # anything else goes through at once, past a pending group
            store(u, tau_sq, update)
            del tau, step, update, accs, ext  # freed before the next tensor arrives, not after
            if u.rows is None and plan.metas[u.name].numel >= TRIM_ELEMENTS:
                trim_heap()
        if group:
            flush()
    finally:
        bar.close()
    if batch > 1:  # a group's notes came after the tensors that went past it: back in the plan's order
        notes = {n: notes[n] for n in plan.names if n in notes}
    what = f"merging {incoming.description}"
    for k, v in sums.items():
        if not math.isfinite(v):
            raise CmergeError(f"{what} would make a norm overflow ({k} = {v}); nothing was changed.")
    new_scalars = method.finalize(scalars, sums, t)
    for k, v in new_scalars.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise CmergeError(f"{what} would make {k} = {v}; nothing was changed.")
    return StepOutcome(new_scalars, sums["tau_sq"] ** 0.5, notes)


def _on(v: torch.Tensor | LowRank, dev: torch.device, dtype: torch.dtype) -> torch.Tensor | LowRank:
    return v.to(dev, dtype)


def _given_task_vector(x: torch.Tensor | LowRank | None, meta: TensorMeta, u: Unit, factored: bool,
                       dev: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor | LowRank, float]:
    """A task vector given by a delta source, as the rule takes it: factors for a factored tensor,
    dense otherwise (None, τ = 0, becomes zeros); and ‖τ‖²."""
    if factored:
        if x is None:
            x = LowRank.zeros(meta.shape[0], meta.shape[1], dtype, dev)
        elif not isinstance(x, LowRank):
            raise AssertionError(f"tensor {u.name!r} was planned as factored but its task vector is dense")
        x = x.to(dev, dtype)
        return x, x.sq_norm()
    if x is None:
        shape = meta.shape if u.rows is None else (u.rows.stop - u.rows.start, *meta.shape[1:])
        x = torch.zeros(shape, dtype=dtype, device=dev)
    elif isinstance(x, LowRank):
        x = x.to(dev, dtype).dense()
    else:
        x = x.to(dev, dtype)
    return x, sq_norm(x)


def _stored(value: torch.Tensor | LowRank, width: int | None, dtype: torch.dtype) -> torch.Tensor | LowRank:
    """An accumulator as the sink stores it: dense on the CPU in ``dtype``, or factors padded to ``width``."""
    if width is None:
        if isinstance(value, LowRank):
            value = value.dense()
        return value.to("cpu", dtype)
    if not isinstance(value, LowRank):
        raise AssertionError("a rule returned a dense accumulator for a factored tensor")
    return value.padded(width).to("cpu", dtype)


def _base_again(base: TensorSource, u: Unit, dev: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The base tensor (or rows) of a unit, read again for a rule that asks for it (see TensorStep.base)."""
    return base.get(u.name, u.rows).to(dev, dtype)


# ---------------------------------------------------------------- the merged model

def iter_merged(method: Method, scalars: Mapping[str, Any], plan: Plan, base: TensorSource,
                acc: AccumulatorReader, *, dtype: torch.dtype | None = None,
                options: StepOptions = StepOptions(desc="exporting")) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, θ_merged tensor) in sorted order, cast to ``dtype`` (default: the base's).

    Merged tensors larger than ``options.block_elements`` come as consecutive row blocks,
    (name, block) each (`Method.merged` is element-wise); passthrough tensors come whole,
    as read. A merged value that the output dtype cannot hold (overflow to ±Inf) is refused.
    """
    opt = options
    dev = resolve_device(opt.device)

    def streamed(name: str) -> bool:
        return plan.kinds[name] != PASSTHROUGH

    def read(u: Unit):
        b = base.get(u.name, u.rows)
        if plan.kinds[u.name] == PASSTHROUGH:
            return b, None
        return b, {a: acc.get(a, u.name, u.rows) for a in plan.accumulators(method, u.name)}

    def unit_bytes(u: Unit) -> int:
        per_element = (plan.metas[u.name].dtype.itemsize
                       + len(plan.accumulators(method, u.name)) * opt.compute_dtype.itemsize)
        return rows_numel(plan.metas[u.name], u.rows) * per_element

    bar = tqdm(total=len(plan.metas), desc=opt.desc, unit="tensor", disable=not opt.progress, leave=False)
    try:
        for u, (b, accs) in ReadAhead(read, units(plan, streamed, opt.block_elements), size=unit_bytes,
                                      budget=opt.read_ahead_bytes):
            if u.last:
                bar.update(1)
            if accs is None:
                yield u.name, b
                continue
            merged = method.merged(b.to(dev, opt.compute_dtype),
                                   {k: v.to(dev, opt.compute_dtype) for k, v in accs.items()}, scalars, name=u.name)
            del b, accs
            out_dtype = dtype or plan.metas[u.name].dtype
            out = merged.to("cpu", out_dtype)
            if not all_finite(out):
                raise CmergeError(f"the merged tensor {u.name!r} has values that {dtype_name(out_dtype)} cannot hold "
                                  f"(|x| up to {float(merged.abs().max()):.3g}); export it in a wider dtype "
                                  f"(--dtype float32).")
            yield u.name, out
    finally:
        bar.close()
