"""In-memory continual merging, for research loops that never touch disk.

``Merger`` runs exactly the engine and method rules that an on-disk state runs, with the
accumulators kept in a dict, and exports through the same path. ``merge`` folds a list of
models in order and returns the merged state dict.
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from .checks import check_task_vector, global_norm, norm64, precision_dtype
from .engine import (Plan, StepOptions, check_compatible, iter_merged, plan_factored, resolve_device, resolve_extras,
                     run_step)
from .errors import CmergeError
from .export import LoraExport, export_lora, export_merged
from .io import (DEFAULT_SHARD_SIZE, HashingSource, TensorSource, content_digest, content_hash, dtype_name, open_source,
                 parse_dtype)
from .layers import PASSTHROUGH, classify
from .lowrank import LowRank
from .manifest import StepRecord
from .methods import get_method


class DictAccumulators:
    """Accumulators in memory: a reader and a sink (whole tensors or blocks of rows) for the engine."""

    def __init__(self, plan: Plan, dtype: torch.dtype) -> None:
        self.plan, self.dtype = plan, dtype
        self.data: dict[str, dict[str, torch.Tensor]] = {}

    def get(self, acc: str, name: str, rows: slice | None = None) -> torch.Tensor:
        t = self.data[acc][name]
        if isinstance(t, LowRank):
            return t.dense(rows)
        return t if rows is None else t[rows]

    def get_factored(self, acc: str, name: str) -> LowRank:
        return self.data[acc][name]

    def put(self, acc: str, name: str, tensor: torch.Tensor | LowRank, rows: slice | None = None) -> None:
        if rows is None:
            self.data.setdefault(acc, {})[name] = tensor
            return
        if rows.start == 0:
            self.data.setdefault(acc, {})[name] = torch.empty(self.plan.metas[name].shape, dtype=tensor.dtype)
        self.data[acc][name][rows] = tensor


class Merger:
    """A continual merge in memory: ``Merger(base, "opcm", alpha=0.5).add(m1).add(m2).state_dict()``.

    ``base`` and models are state dicts, ``nn.Module``s or paths. Parameters are the
    method's declared ones (see ``cmerge.REGISTRY[name].params``). ``options``: block size
    and read-ahead of the streaming engine (no effect on results).
    """

    def __init__(self, base: Any, method: str = "opcm", *, precision: str = "float32", device: str = "cpu",
                 project: Sequence[str] = (), no_project: Sequence[str] = (), strict_layers: bool = False,
                 progress: bool = False, options: StepOptions | None = None, **params: Any) -> None:
        self.method = get_method(method, **params)
        self.precision = precision
        self.compute_dtype = precision_dtype(precision)
        self.device = device
        self.progress = progress
        self.options = options or StepOptions()
        self.base: TensorSource = open_source(base, description="base model")
        metas = {n: self.base.meta(n) for n in self.base.keys()}
        self.classification = classify(metas, self.base.folder, project, no_project, strict=strict_layers)
        self.classified_by = self.classification.how
        self.plan = Plan(metas, self.classification.kinds)
        self.scalars: dict[str, Any] = self.method.initial_scalars()
        self.steps: list[StepRecord] = []
        self.overrides: list[dict[str, Any]] = []  # {"after_step": t, "tensors": [names]} per override()
        self._acc = DictAccumulators(self.plan, self.compute_dtype)
        self.factored: dict[str, int] = {}  # tensors kept as low-rank factors, with their widths
        self._base_norm: float | None = None

    @property
    def kinds(self) -> Mapping[str, str]:
        return self.plan.kinds

    @property
    def accumulators(self) -> Mapping[str, Mapping[str, Any]]:
        """The method's accumulators after the last step: accumulator → tensor name → tensor (or ``LowRank``
        factors for a factored tensor). For inspection; change the merge only through add() and override()."""
        return self._acc.data

    def _step_options(self, **changes: Any) -> StepOptions:
        return replace(self.options, compute_dtype=self.compute_dtype, acc_dtype=self.compute_dtype,
                       device=self.device, progress=self.progress, **changes)

    @property
    def base_norm(self) -> float:
        """‖θ0‖ over every floating tensor (read once, for the empty-task-vector check)."""
        if self._base_norm is None:
            self._base_norm = global_norm([norm64(self.base.get(n)) for n in self.plan.merged_names()])
        return self._base_norm

    def add(self, model: Any, name: str | None = None, *, extras: Mapping[str, Any] | None = None,
            allow_empty: bool = False) -> StepRecord:
        """Fold one model in; returns its step record (name, sha256, norm, lambda, t, …).

        A zero (or negligible) task vector is refused unless ``allow_empty`` (checks.py).
        """
        opened = open_source(model, description=name or "incoming model", base=self.base)
        deltas = bool(getattr(opened, "deltas", False))
        incoming = opened if deltas else HashingSource(opened)
        check_compatible(self.plan, incoming, incoming.description)
        extra_srcs = resolve_extras(self.method, model, extras)
        t = len(self.steps) + 1
        factored = plan_factored(self.method, self.plan, opened, t, self.factored)
        new = DictAccumulators(self.plan, self.compute_dtype)
        started = time.time()
        out = run_step(self.method, self.scalars, t, self.plan, self.base, incoming, self._acc, new,
                       extras=extra_srcs, factored=factored,
                       options=self._step_options(desc=f"step {t}: {name or 'model'}"))
        check_task_vector(out.tau_norm, self.base_norm, incoming.description, allow_empty)
        self._acc, self.scalars, self.factored = new, out.scalars, factored
        sha = content_digest(opened) if deltas else incoming.digest()
        record = StepRecord(t=t, name=name or f"model-{t}", sha256=sha,
                            seconds=round(time.time() - started, 3), norm=out.tau_norm,
                            summary=self.method.step_summary(out.scalars), protected_rank=out.notes or None)
        self.steps.append(record)
        return record

    def override(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Replace the merged value θ_merged of the named tensors, e.g. after representation alignment.

        ``tensors`` maps names to full tensors of any floating dtype (converted to the compute
        dtype). Afterwards ``state_dict()`` returns them and the next ``add()`` continues from
        them: the method's accumulators are set by ``Method.unmerge``, its other state (e.g.
        fisher_merge's F̄, OPCM's λ) is kept. Everything is checked before anything changes;
        a refusal (CmergeError) leaves the merge as it was. Recorded in ``self.overrides``.
        """
        if not self.steps:
            raise CmergeError("nothing has been merged yet, so there is nothing to override; call add() first.")
        dev = resolve_device(self.device)
        new: dict[str, dict[str, torch.Tensor]] = {}
        for name, x in tensors.items():
            if name not in self.plan.metas:
                raise CmergeError(f"cannot override tensor {name!r}: the base model has no tensor of that name.")
            kept = self.plan.accumulators(self.method, name)
            if self.plan.kinds[name] == PASSTHROUGH or any(name not in self._acc.data.get(a, {}) for a in kept):
                raise CmergeError(f"cannot override tensor {name!r}: it is not merged (a non-floating tensor copied "
                                  f"from the base).")
            if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
                what = dtype_name(x.dtype) if isinstance(x, torch.Tensor) else type(x).__name__
                raise CmergeError(f"cannot override tensor {name!r}: the new value is {what}, not a floating-point "
                                  f"torch tensor.")
            want = tuple(self.plan.metas[name].shape)
            if tuple(x.shape) != want:
                raise CmergeError(f"cannot override tensor {name!r}: the new value has shape {list(x.shape)} but the "
                                  f"merged tensor's is {list(want)}.")
            x = x.detach().to(dev, self.compute_dtype)
            if not bool(torch.isfinite(x).all()):
                raise CmergeError(f"cannot override tensor {name!r}: the new value contains NaN or Inf "
                                  f"(in {dtype_name(self.compute_dtype)}); nothing was changed.")
            base = self.base.get(name).to(dev, self.compute_dtype)
            acc = {a: self._acc.get(a, name).to(dev, self.compute_dtype) for a in kept}
            out = self.method.unmerge(base, x, acc, self.scalars)
            if not all(bool(torch.isfinite(v).all()) for v in out.values()):
                raise CmergeError(f"cannot override tensor {name!r}: method {self.method.name} would store NaN or Inf "
                                  f"for it; nothing was changed.")
            new[name] = {a: out[a].to("cpu", self.compute_dtype) for a in kept}
        if not new:
            return
        for name, accs in new.items():
            for a, v in accs.items():
                self._acc.put(a, name, v)
            self.factored.pop(name, None)  # a corrected tensor is dense from now on
        self.overrides.append({"after_step": len(self.steps), "tensors": sorted(new)})

    def _merged(self, dtype: torch.dtype | None, desc: str = "exporting"):
        if not self.steps:
            raise CmergeError("nothing has been merged yet; call add() first.")
        return iter_merged(self.method, self.scalars, self.plan, self.base, self._acc, dtype=dtype,
                           options=self._step_options(desc=desc))

    def state_dict(self, dtype: str | torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """θ_merged as a state dict (dtype: the compute dtype unless given)."""
        out_dtype = parse_dtype(dtype) if isinstance(dtype, str) else (dtype or self.compute_dtype)
        out: dict[str, torch.Tensor] = {}
        done: dict[str, int] = {}
        for name, t in self._merged(out_dtype):
            shape = self.plan.metas[name].shape
            if tuple(t.shape) == tuple(shape) and name not in done:
                out[name] = t
                continue
            if name not in done:  # the first block of a tensor streamed by rows
                out[name], done[name] = torch.empty(shape, dtype=t.dtype), 0
            out[name][done[name]:done[name] + t.shape[0]] = t
            done[name] += t.shape[0]
        return out

    def info(self) -> dict[str, Any]:
        """What a state's info gives, for the model card and provenance of :meth:`export`."""
        cls = self.classification
        kinds = list(cls.kinds.values())
        return {"method": self.method.name, "params": self.method.p, "precision": self.precision,
                "base": {"path": self.base.description if self.base.folder is None else str(self.base.folder),
                         "sha256": content_hash(self.base), "classified_by": cls.how,
                         "architecture": cls.architecture},
                "tensors": {k: kinds.count(k) for k in sorted(set(kinds))}, "summary": cls.summary(),
                "projected": cls.projected(), "classification": cls.kinds, "routes": cls.routes,
                "scalars": self.scalars, "steps": [s.to_dict() for s in self.steps], "overrides": self.overrides}

    def export(self, out: str | Path, *, dtype: str | None = None, shard_size: str | int = DEFAULT_SHARD_SIZE) -> Path:
        """Write θ_merged as a model folder, exactly as ``cmerge export`` writes a state's."""
        tensors = self._merged(parse_dtype(dtype) if dtype else None)
        return export_merged(out, self.plan, tensors, self.info(), dtype=dtype, shard_size=shard_size,
                             aux_from=self.base.folder)

    def export_lora(self, out: str | Path, *, rank: int | None = None, dtype: str | None = None) -> LoraExport:
        """The merged task vector as one PEFT LoRA adapter, as ``cmerge export --as-lora [RANK]`` writes it."""
        if not self.steps:
            raise CmergeError("nothing has been merged yet; call add() first.")
        return export_lora(out, self.plan, self.method, self.scalars, self._acc, self.factored, self.info(),
                           base_folder=self.base.folder, rank=rank, dtype=dtype)


def merge(base: Any, models: Iterable[Any], method: str = "opcm", *, names: Sequence[str] | None = None,
          **kwargs: Any) -> dict[str, torch.Tensor]:
    """Fold ``models`` into ``base`` in the given order and return the merged state dict."""
    merger = Merger(base, method, **kwargs)
    for i, model in enumerate(models):
        merger.add(model, name=names[i] if names else None)
    return merger.state_dict()
