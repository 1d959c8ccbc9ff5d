"""Streams a model through a method, one tensor at a time.

A step reads, for each tensor name in sorted order, the base tensor, the method's
accumulators and the incoming tensor; applies the method's rule in the compute dtype on
the chosen device; hands the new accumulators to a sink; and adds up the global sums.
A background thread reads (and hashes) the next tensors while the current one is
computed, so memory holds a few tensors, never a model.
"""
from __future__ import annotations

import math
import queue
import threading
from dataclasses import dataclass, field
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol

import torch
from tqdm.auto import tqdm

from .checkpoint import (TensorMeta, TensorSource, combine_digests, dtype_name, open_source, read_streamed,
                         tensor_digest)
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


class AccumulatorSink(Protocol):
    def put(self, acc: str, name: str, tensor: torch.Tensor) -> None: ...


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


def _prefetch(produce: Callable[[str], Any], names: list[str], depth: int = 2) -> Iterator[tuple[str, Any]]:
    """Yield (name, produce(name)) computed ``depth`` items ahead in a background thread."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def worker() -> None:
        try:
            for n in names:
                if stop.is_set():
                    return
                q.put((n, produce(n)))
            q.put(done)
        except BaseException as exc:  # handed to the consumer
            q.put(exc)

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
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
    """

    convert: tuple[torch.device, torch.dtype] | None = None  # (device, dtype), set by run_step

    @property  # type: ignore[override]
    def base(self) -> torch.Tensor:
        d = self.__dict__
        if "_base_c" not in d:
            raw = d["_base_raw"]
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
    base_digests: dict[str, bytes] = {}
    inc_digests: dict[str, bytes] = {}

    def read(name: str):
        b = get(base, name)
        x = get(incoming, name)
        if hash_base:
            base_digests[name] = tensor_digest(name, b)
        inc_digests[name] = tensor_digest(name, x)
        if plan.kinds[name] == PASSTHROUGH:
            return None
        # NaN / Inf in x: checked on the main thread from ‖τ‖², which is computed anyway
        accs = {a: acc.get(a, name) for a in method.accumulators} if (acc is not None and t > 1) else {}
        ext = {k: src.get(name) for k, src in extras.items()}
        for k, v in ext.items():
            if v.dtype.is_floating_point and not bool(torch.isfinite(v).all()):
                raise CmergeError(f"{extras[k].description}: tensor {name!r} contains NaN or Inf; nothing was changed.")
        return b, x, accs, ext

    sums: dict[str, float] = {"tau_sq": 0.0}
    notes: dict[str, Any] = {}
    bar = tqdm(total=len(plan.metas), desc=desc, unit="tensor", disable=not progress, leave=False)
    try:
        for name, item in _prefetch(read, plan.names):
            bar.update(1)
            if item is None:
                continue
            b, x, accs, ext = item
            tau = _task_vector(x, b, dev, compute_dtype)
            tau_sq = sq_norm(tau)
            # ‖τ‖² (float64) is finite whenever τ is, so only a non-finite one needs the full check
            if not math.isfinite(tau_sq) and not bool(torch.isfinite(x).all()):
                raise CmergeError(f"{incoming.description}: tensor {name!r} contains NaN or Inf; nothing was changed.")
            step = _LazyBaseStep(name=name, t=t, base=b, tau=tau,
                                 acc={k: v.to(dev, compute_dtype) for k, v in accs.items()}, scalars=scalars,
                                 projected=is_projected(plan.kinds[name]),
                                 extra={k: v.to(dev, compute_dtype) for k, v in ext.items()},
                                 extra_meta={k: src.metadata for k, src in extras.items()})
            step.convert = (dev, compute_dtype)
            update = method.rule(step)
            sums["tau_sq"] += tau_sq
            for k, v in update.sums.items():
                sums[k] = sums.get(k, 0.0) + v
            if update.note is not None:
                notes[name] = update.note
            for a in method.accumulators:
                sink.put(a, name, update.acc[a].to("cpu", acc_dtype))
            del tau, step, update  # freed before the next tensor arrives, not after
    finally:
        bar.close()
    new_scalars = method.finalize(scalars, sums, t)
    return StepOutcome(new_scalars, sums["tau_sq"] ** 0.5, combine_digests(inc_digests),
                       combine_digests(base_digests) if hash_base else None, notes)


def _plain_get(source: TensorSource, name: str) -> torch.Tensor:
    return source.get(name)


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
                desc: str = "exporting", map_reads: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, θ_merged tensor) in sorted order, cast to ``dtype`` (default: the base's).

    ``map_reads``: read the base's merged tensors through short-lived maps (see run_step);
    passthrough tensors, yielded as read, are always read plainly.
    """
    dev = resolve_device(device)
    get = read_streamed if map_reads else _plain_get

    def read(name: str):
        b = base.get(name) if plan.kinds[name] == PASSTHROUGH else get(base, name)
        if digests is not None:
            digests[name] = tensor_digest(name, b)
        if plan.kinds[name] == PASSTHROUGH:
            return b, None
        return b, {a: acc.get(a, name) for a in method.accumulators}

    bar = tqdm(total=len(plan.metas), desc=desc, unit="tensor", disable=not progress, leave=False)
    try:
        for name, (b, accs) in _prefetch(read, plan.names):
            bar.update(1)
            if accs is None:
                yield name, b
                continue
            merged = method.merged(b.to(dev, compute_dtype), {k: v.to(dev, compute_dtype) for k, v in accs.items()},
                                   scalars)
            yield name, merged.to("cpu", dtype or plan.metas[name].dtype)
    finally:
        bar.close()
