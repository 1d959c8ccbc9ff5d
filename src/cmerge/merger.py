"""In-memory continual merging, for research loops that never touch disk.

``Merger`` runs exactly the engine and method rules that an on-disk state runs, with the
accumulators kept in a dict. ``merge`` folds a list of models in order and returns the
merged state dict.
"""
from __future__ import annotations

import datetime as _dt
import time
from typing import Any, Iterable, Mapping, Sequence

import torch

from .checkpoint import TensorSource, dtype_name, open_source, parse_dtype
from .engine import Plan, check_compatible, iter_merged, resolve_device, resolve_extras, run_step
from .errors import CmergeError
from .layers import PASSTHROUGH, classify
from .methods import get_method


class _DictAccumulators:
    def __init__(self) -> None:
        self.data: dict[str, dict[str, torch.Tensor]] = {}

    def get(self, acc: str, name: str) -> torch.Tensor:
        return self.data[acc][name]

    def put(self, acc: str, name: str, tensor: torch.Tensor) -> None:
        self.data.setdefault(acc, {})[name] = tensor


class Merger:
    """A continual merge in memory: ``Merger(base, "opcm", alpha=0.5).add(m1).add(m2).state_dict()``.

    ``base`` and models are state dicts, ``nn.Module``s or paths. Parameters are the
    method's declared ones (see ``cmerge.REGISTRY[name].params``).
    """

    def __init__(self, base: Any, method: str = "opcm", *, precision: str = "float32", device: str = "cpu",
                 project: Sequence[str] = (), no_project: Sequence[str] = (), strict_layers: bool = False,
                 progress: bool = False, **params: Any) -> None:
        self.method = get_method(method, **params)
        self.compute_dtype = parse_dtype(precision)
        if self.compute_dtype not in (torch.float32, torch.float64):
            raise CmergeError(f"precision must be float32 or float64, got {precision!r}.")
        self.device = device
        self.progress = progress
        self.base: TensorSource = open_source(base, description="base model")
        metas = {n: self.base.meta(n) for n in self.base.keys()}
        self.classification = classify(metas, self.base.folder, project, no_project, strict=strict_layers)
        self.classified_by = self.classification.how
        self.plan = Plan(metas, self.classification.kinds)
        self.scalars: dict[str, Any] = self.method.initial_scalars()
        self.steps: list[dict[str, Any]] = []
        self.overrides: list[dict[str, Any]] = []  # {"after_step": t, "tensors": [names]} per override()
        self._acc = _DictAccumulators()

    @property
    def kinds(self) -> Mapping[str, str]:
        return self.plan.kinds

    def add(self, model: Any, name: str | None = None, *, extras: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Fold one model in; returns its step entry (name, sha256, norm, lambda, t, …)."""
        incoming = open_source(model, description=name or "incoming model")
        check_compatible(self.plan, incoming, incoming.description)
        extra_srcs = resolve_extras(self.method, model, extras)
        t = len(self.steps) + 1
        new = _DictAccumulators()
        started = time.time()
        out = run_step(self.method, self.scalars, t, self.plan, self.base, incoming, self._acc, new,
                       extras=extra_srcs, compute_dtype=self.compute_dtype, acc_dtype=self.compute_dtype,
                       device=self.device, hash_base=False, progress=self.progress,
                       desc=f"step {t}: {name or 'model'}")
        self._acc, self.scalars = new, out.scalars
        entry = {"t": t, "name": name or f"model-{t}", "sha256": out.incoming_sha256,
                 "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                 "seconds": round(time.time() - started, 3), "norm": out.tau_norm, "lambda": None,
                 **self.method.step_summary(out.scalars), "protected_rank": out.notes or None}
        self.steps.append(entry)
        return entry

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
            if self.plan.kinds[name] == PASSTHROUGH or any(name not in self._acc.data.get(a, {})
                                                          for a in self.method.accumulators):
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
            acc = {a: self._acc.get(a, name).to(dev, self.compute_dtype) for a in self.method.accumulators}
            out = self.method.unmerge(base, x, acc, self.scalars)
            if not all(bool(torch.isfinite(v).all()) for v in out.values()):
                raise CmergeError(f"cannot override tensor {name!r}: method {self.method.name} would store NaN or Inf "
                                  f"for it; nothing was changed.")
            new[name] = {a: out[a].to("cpu", self.compute_dtype) for a in self.method.accumulators}
        if not new:
            return
        for name, accs in new.items():
            for a, v in accs.items():
                self._acc.put(a, name, v)
        self.overrides.append({"after_step": len(self.steps), "tensors": sorted(new)})

    def state_dict(self, dtype: str | torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """θ_merged as a state dict (dtype: the compute dtype unless given)."""
        if not self.steps:
            raise CmergeError("nothing has been merged yet; call add() first.")
        out_dtype = parse_dtype(dtype) if isinstance(dtype, str) else (dtype or self.compute_dtype)
        return dict(iter_merged(self.method, self.scalars, self.plan, self.base, self._acc, dtype=out_dtype,
                                compute_dtype=self.compute_dtype, device=self.device))


def merge(base: Any, models: Iterable[Any], method: str = "opcm", *, names: Sequence[str] | None = None,
          **kwargs: Any) -> dict[str, torch.Tensor]:
    """Fold ``models`` into ``base`` in the given order and return the merged state dict."""
    merger = Merger(base, method, **kwargs)
    for i, model in enumerate(models):
        merger.add(model, name=names[i] if names else None)
    return merger.state_dict()
