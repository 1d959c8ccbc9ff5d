"""The on-disk merge state: a typed manifest plus accumulator generations.

Layout of a state folder::

    manifest.json            format, method + parameters, base (path, sha256, tensors, kinds),
                             scalars (λ_t, …), the step log, the current generation (manifest.py)
    gen-000003/accumulators.safetensors   the method's per-tensor accumulators after step 3,
                             one tensor "<accumulator>/<tensor name>" per accumulator and tensor
    gen-000003/vocab_rows.safetensors     with --vocab union: a grown vocabulary's rows past the base's
    .lock                    held by a running `add` (exclusive) or `export` (shared)

A step writes ``gen-00000t.partial/``, renames it to ``gen-00000t/`` and then switches the
manifest by an atomic rename, so a kill at any instant leaves the last good state readable;
leftovers of an interrupted step are removed by the next ``add``, which redoes the step.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from .engine import (AccumulatorReader, Plan, StepOptions, check_compatible, iter_merged, plan_factored,
                     resolve_extras, run_step)
from .errors import CmergeError
from .export import LoraExport, export_lora, export_merged
from .fsutil import check_new_folder, fsync_dir, is_temporary, locked, new_folder
from .io.hub import download, looks_like_hub_id
from .io import (DEFAULT_SHARD_SIZE, HashingSource, SafetensorsSource, StreamingSafetensorsWriter, TensorSource,
                 base_matches, combine_digests, content_digest, content_hash, describe, dtype_name, open_source,
                 parse_dtype, tensor_digest)
from .layers import Classification, classify
from .lowrank import LowRank
from .manifest import MANIFEST, BaseRecord, Manifest, StepRecord, TensorRecord, file_fingerprints
from .methods import Method, get_method
from .vocab import MODES as VOCAB_MODES, BaseRowsSource, extended_rows, grown_rows, load_rows, save_rows
from .checks import check_task_vector, global_norm, norm64, precision_dtype

LOCK = ".lock"
STATE_FOLDER = "folder for the merge state"
ACCUMULATORS = "accumulators.safetensors"


def accumulator_key(acc: str, name: str, factor: str | None = None) -> str:
    """The accumulator file's name of accumulator ``acc`` of tensor ``name`` (``factor`` L or R if factored)."""
    return f"{acc}/{name}" if factor is None else f"{acc}/{name}@{factor}"


def accumulator_specs(plan: Plan, method: Method, dtype: torch.dtype, factored: Mapping[str, int] | None = None
                      ) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """The accumulator tensors a step writes: every merged tensor's accumulators, side by side; a factored
    tensor's as its two factors L (m × w) and R (n × w)."""
    factored = factored or {}
    specs = []
    for n in plan.merged_names():
        for a in plan.accumulators(method, n):
            if n in factored:
                m, k = plan.metas[n].shape
                specs += [(accumulator_key(a, n, "L"), dtype, (m, factored[n])),
                          (accumulator_key(a, n, "R"), dtype, (k, factored[n]))]
            else:
                specs.append((accumulator_key(a, n), dtype, plan.metas[n].shape))
    return specs


def _gen_dir(t: int) -> str:
    return f"gen-{t:06d}"


class DiskAccumulators:
    """Reads the accumulators of one generation, one tensor (or block of rows) at a time."""

    def __init__(self, path: Path, method: str, factored: Mapping[str, int] | None = None) -> None:
        # mapped: a step and an export use each accumulator tensor once and drop it
        self._src = SafetensorsSource([path], f"the merge state's accumulators {path}", mapped=True)
        self.factored = dict(factored or {})
        written_by = self._src.metadata.get("method")
        if written_by != method:
            raise CmergeError(f"the merge state's accumulators {path} were written by method {written_by!r} but its "
                              f"manifest names method {method!r}; the state is inconsistent.")

    def get(self, acc: str, name: str, rows: slice | None = None) -> torch.Tensor:
        if name in self.factored:
            return self.get_factored(acc, name).dense(rows)
        return self._src.get(accumulator_key(acc, name), rows)

    def get_factored(self, acc: str, name: str) -> LowRank:
        return LowRank(self._src.get(accumulator_key(acc, name, "L")), self._src.get(accumulator_key(acc, name, "R")))


class AccumulatorFile:
    """The sink of a step: a new generation's accumulator file, written as the step streams."""

    def __init__(self, path: Path, plan: Plan, method: Method, dtype: torch.dtype, t: int,
                 factored: Mapping[str, int] | None = None) -> None:
        self.writer = StreamingSafetensorsWriter(path, accumulator_specs(plan, method, dtype, factored),
                                                 {"cmerge_step": str(t), "method": method.name},
                                                 background=True, any_order=True)

    def put(self, acc: str, name: str, tensor: torch.Tensor | LowRank, rows: slice | None = None) -> None:
        if isinstance(tensor, LowRank):
            self.writer.write(accumulator_key(acc, name, "L"), tensor.left.contiguous())
            self.writer.write(accumulator_key(acc, name, "R"), tensor.right.contiguous())
        elif rows is None:
            self.writer.write(accumulator_key(acc, name), tensor)
        else:
            self.writer.write_rows(accumulator_key(acc, name), tensor)


def init_state(path: str | os.PathLike, base: str | os.PathLike, method: str = "opcm", *,
               precision: str = "float32", project: Sequence[str] = (), no_project: Sequence[str] = (),
               strict_layers: bool = False, progress: bool = False, vocab: str = "base", **params: Any) -> "State":
    """Create a merge state at ``path`` for ``base`` and a registered method (nothing merged yet).

    ``vocab``: "base" refuses experts whose vocabulary grew; "union" keeps their new rows (vocab.py).

    The state is written in ``PATH.partial/`` and renamed into place: a killed `init` leaves
    no state (and the next `init` removes its leftovers), never half of one.
    """
    path = Path(path)
    check_new_folder(path, STATE_FOLDER)
    if not isinstance(base, (str, os.PathLike)):
        raise CmergeError("an on-disk merge state needs the base model as a path; use cmerge.Merger for in-memory models.")
    m = get_method(method, **params)
    compute = precision_dtype(precision)
    if vocab not in VOCAB_MODES:
        raise CmergeError(f"vocab must be one of {', '.join(VOCAB_MODES)}, got {vocab!r}.")
    if vocab == "union" and m.space == "lora":
        raise CmergeError(f"method {m.name} merges LoRA factors, which cannot grow a vocabulary; use --vocab base.")
    if looks_like_hub_id(str(base)):  # a hub id: the local snapshot of its weights, config and tokenizer
        base = download(str(base))
    base_path = Path(base).resolve()
    src = open_source(base_path)
    metas = {n: src.meta(n) for n in src.keys()}
    cls = classify(metas, src.folder, project, no_project, strict=strict_layers)
    digests, norms = {}, []
    for n in tqdm(src.keys(), desc="reading base", unit="tensor", disable=not progress, leave=False):
        t = src.get(n)
        if t.dtype.is_floating_point:
            if not bool(torch.isfinite(t).all()):
                raise CmergeError(f"the base model's tensor {n!r} contains NaN or Inf.")
            if not bool(torch.isfinite(t.to(compute)).all()):
                raise CmergeError(f"the base model's tensor {n!r} has values too large for {precision}, the merge "
                                  f"state's precision (|x| up to {float(t.abs().max()):.3g}).")
            norms.append(norm64(t))
        digests[n] = tensor_digest(n, t)
    base_record = BaseRecord(
        path=str(base_path), sha256=combine_digests(digests), classified_by=cls.how, architecture=cls.architecture,
        norm=global_norm(norms), files=file_fingerprints(src.files),
        tensors={n: TensorRecord(list(metas[n].shape), dtype_name(metas[n].dtype), cls.kinds[n], cls.routes[n])
                 for n in sorted(metas)})
    manifest = Manifest(method=m.name, params=m.p, precision=precision, base=base_record, scalars=m.initial_scalars(),
                        vocab=vocab)
    with new_folder(path, f"another cmerge init is creating {path}; wait for it.", STATE_FOLDER) as tmp:
        (tmp / LOCK).touch()  # part of the state from the start: a refused first `add` then changes no file
        manifest.save(tmp)
    return State(path)


def classify_model(model: str | os.PathLike, project: Sequence[str] = (), no_project: Sequence[str] = (), *,
                   strict: bool = False) -> Classification:
    """How ``cmerge init`` would classify the tensors of ``model`` as a base (reads no tensor data)."""
    src = open_source(Path(model))
    return classify({n: src.meta(n) for n in src.keys()}, src.folder, project, no_project, strict=strict)


def open_state(path: str | os.PathLike) -> "State":
    """Open an existing merge state (checks its format, version and method)."""
    return State(Path(path))


class State:
    """A merge state on disk. Changes only through :meth:`add`, each step atomic."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.manifest = Manifest.load(self.path)
        self.manifest.base.plan()  # every dtype the base record names is one torch knows (`info` reads no torch)

    # ------------------------------------------------------------ reading
    @property
    def method(self) -> Method:
        return get_method(self.manifest.method, **self.manifest.params)

    @property
    def plan(self) -> Plan:
        return self.manifest.plan

    @property
    def steps(self) -> list[StepRecord]:
        return self.manifest.steps

    @property
    def compute_dtype(self) -> torch.dtype:
        return parse_dtype(self.manifest.precision)

    @property
    def classification(self) -> Classification:
        """Which tensors are projected and by which route (recorded at `init`)."""
        return self.manifest.base.classification()

    def info(self) -> dict[str, Any]:
        """method, params, base, steps (name, sha256, norm, lambda, …), scalars and the tensor classification."""
        return self.manifest.info(self.path)

    def _base_source(self) -> TensorSource:
        bpath = Path(self.manifest.base.path)
        if not bpath.exists():
            raise CmergeError(f"the base model {bpath} recorded in the merge state no longer exists.")
        src = open_source(bpath, description=f"base {bpath}", mapped=True)
        check_compatible(self.plan, src, f"the base model {bpath}")
        return src

    def _changed_base(self) -> CmergeError:
        return CmergeError(f"the base model {self.manifest.base.path} changed since `cmerge init` (content hash "
                           f"differs); restore it or start a new state.")

    def _check_base_unchanged(self, base: TensorSource) -> None:
        """Before a step's compute: a base whose files changed size or time is hashed now, and refused if it
        changed; an untouched one is hashed while the step streams (and checked at its end)."""
        recorded = self.manifest.base.files
        if recorded is not None and file_fingerprints(base.files) == recorded:
            return
        if content_hash(base) != self.manifest.base.sha256:
            raise self._changed_base()

    def accumulators(self) -> AccumulatorReader | None:
        """A reader of the current generation's accumulators (None before the first step)."""
        gen = self.manifest.generation
        return None if gen is None else DiskAccumulators(self.path / gen / ACCUMULATORS, self.manifest.method,
                                                         self.manifest.factored)

    # ------------------------------------------------------------ writing
    def _lock(self, exclusive: bool) -> Any:
        """An `add` holds the state's lock alone; exports share it with each other, never with an add."""
        busy = (f"another cmerge process is using {self.path} (an add or an export); wait for it to finish."
                if exclusive else f"another cmerge process is adding to {self.path}; export once it has finished.")
        return locked(self.path / LOCK, busy, exclusive=exclusive)

    def _remove_stale(self) -> None:
        keep = self.manifest.generation
        for p in self.path.iterdir():
            if p.is_dir() and p.name.startswith("gen-") and p.name != keep:
                shutil.rmtree(p, ignore_errors=True)
            elif is_temporary(p, MANIFEST):
                p.unlink()

    def add(self, model: Any, name: str | None = None, *, force: bool = False, allow_empty: bool = False,
            device: str = "cpu", progress: bool = False, extras: Mapping[str, Any] | None = None,
            options: StepOptions | None = None) -> StepRecord:
        """Fold one model into the state (one atomic step) and return its step record.

        Refused with one sentence, the state unchanged: a model already merged (unless
        ``force``), a base that changed, a task vector that is zero or negligible (unless
        ``allow_empty``), and every bad input the engine refuses. ``options``: block size
        and read-ahead of the streaming (no effect on the result).
        """
        with self._lock(exclusive=True):
            self.manifest = Manifest.load(self.path)
            self._remove_stale()
            method, plan = self.method, self.plan
            base = self._base_source()
            incoming = open_source(model, mapped=True, base=base)
            grown = grown_rows(plan, incoming) if self.manifest.vocab == "union" else {}
            if grown and getattr(incoming, "deltas", False):
                raise CmergeError(f"{incoming.description} is a LoRA adapter with more vocabulary rows than the base; "
                                  f"merge the model it was merged into instead.")
            step_source = BaseRowsSource(incoming, plan, grown) if grown else incoming
            check_compatible(plan, step_source, incoming.description)
            extra_srcs = resolve_extras(method, model, extras)
            sha = content_digest(incoming)  # before any compute: a duplicate is refused at once
            for s in self.steps:
                if s.sha256 == sha and not force:
                    raise CmergeError(f"this model was already merged as step {s.t} ({s.name}); pass --force to add it "
                                      f"again.")
            made_for = self._check_adapter_base(incoming, force)
            self._check_base_unchanged(base)
            t = len(self.steps) + 1
            factored = plan_factored(method, plan, step_source, t, self.manifest.factored)
            final, partial = self.path / _gen_dir(t), self.path / (_gen_dir(t) + ".partial")
            partial.mkdir()
            sink = AccumulatorFile(partial / ACCUMULATORS, plan, method, self.compute_dtype, t, factored)
            deltas = bool(getattr(incoming, "deltas", False))
            step_base = base if deltas else HashingSource(base)  # a delta source reads the base only where needed
            opt = replace(options or StepOptions(), compute_dtype=self.compute_dtype, acc_dtype=self.compute_dtype,
                          device=device, progress=progress, desc=f"step {t}: {name or incoming.description}")
            started = time.time()
            try:
                out = run_step(method, self.manifest.scalars, t, plan, step_base, step_source, self.accumulators(),
                               sink, extras=extra_srcs, factored=factored, options=opt)
                if not deltas and step_base.digest() != self.manifest.base.sha256:
                    raise self._changed_base()
                check_task_vector(out.tau_norm, self.manifest.base.norm, incoming.description, allow_empty)
                sink.writer.close()
                rows, added = extended_rows(self.vocab_rows(), incoming, plan, grown)
                save_rows(partial, rows)
            except BaseException:
                sink.writer.abort()
                shutil.rmtree(partial, ignore_errors=True)
                raise
            os.replace(partial, final)
            fsync_dir(self.path)
            inputs = {k: src.description for k, src in extra_srcs.items()}
            if made_for is not None:
                inputs["adapter_base"] = made_for
            record = StepRecord(t=t, name=name or _default_name(model, t), source=describe(model), sha256=sha,
                                seconds=round(time.time() - started, 3), norm=out.tau_norm,
                                summary=method.step_summary(out.scalars), protected_rank=out.notes or None,
                                extras=inputs or None)
            old = self.manifest.generation
            vocab_from = str(incoming.folder) if added and incoming.folder is not None else None
            new_manifest = self.manifest.with_step(record, out.scalars, final.name, factored,
                                                   {n: r.shape[0] for n, r in rows.items()}, vocab_from)
            new_manifest.save(self.path)
            self.manifest = new_manifest
            if old is not None:
                shutil.rmtree(self.path / old, ignore_errors=True)
            return record

    def _check_adapter_base(self, incoming: TensorSource, force: bool) -> str | None:
        """An adapter made for another base model is refused unless ``force`` (its shapes may fit by chance).

        Returns the base id the adapter names (recorded in the step log), if it is an adapter.
        """
        adapter = getattr(incoming, "adapter", None)
        if adapter is None:
            return None
        made_for = adapter.base_id
        if made_for is None or force or base_matches(made_for, Path(self.manifest.base.path)):
            return made_for or ""
        raise CmergeError(f"{incoming.description} was made for base model {made_for!r}, not for "
                          f"{self.manifest.base.path}; pass --force if it fits this base anyway.")

    def export(self, out: str | os.PathLike, *, dtype: str | None = None, shard_size: str | int = DEFAULT_SHARD_SIZE,
               device: str = "cpu", progress: bool = False, provenance: Mapping[str, Any] | None = None,
               options: StepOptions | None = None) -> Path:
        """Write θ_merged as a model folder: safetensors (sharded + index if large), config/tokenizer, model card.

        ``provenance``: what ``cmerge_merge.json`` records instead of the state's own path and
        step log (``cmerge merge`` passes its inputs).
        """
        with self._lock(exclusive=False):
            self._load_for_export()
            base = HashingSource(self._base_source())
            opt = replace(options or StepOptions(), compute_dtype=self.compute_dtype, device=device, progress=progress,
                          desc="exporting")
            tensors = iter_merged(self.method, self.manifest.scalars, self.plan, base, self.accumulators(),
                                  dtype=parse_dtype(dtype) if dtype else None, options=opt)

            def base_unchanged() -> None:
                if base.digest() != self.manifest.base.sha256:
                    raise self._changed_base()

            info = self.info()
            rows = self.vocab_rows()
            grown_from = Path(self.manifest.vocab_from) if rows and self.manifest.vocab_from else None
            aux = grown_from if grown_from is not None and grown_from.is_dir() else base.folder  # vocab_size set anyway
            return export_merged(out, self.plan, tensors, info, dtype=dtype, shard_size=shard_size,
                                 aux_from=aux, before_commit=base_unchanged, provenance_record=provenance,
                                 extra_rows=rows)

    def export_lora(self, out: str | os.PathLike, *, rank: int | None = None, dtype: str | None = None) -> LoraExport:
        """Write the merged task vector as one PEFT LoRA adapter for the same base (export.export_lora):
        exact without ``rank``, else each module's best rank-``rank`` approximation, its error recorded."""
        with self._lock(exclusive=False):
            self._load_for_export()
            if self.manifest.vocab_rows:
                raise CmergeError("this merge grew the vocabulary, and a LoRA adapter cannot carry new embedding "
                                  "rows; export the full model instead.")
            return export_lora(out, self.plan, self.method, self.manifest.scalars, self.accumulators(),
                               self.manifest.factored, self.info(), base_folder=self._base_source().folder,
                               rank=rank, dtype=dtype)

    def vocab_rows(self) -> dict[str, torch.Tensor]:
        """The grown vocabulary's rows past the base's, per tensor, after the last step (vocab.py); {} if none."""
        gen = self.path / self.manifest.generation if self.manifest.generation else None
        return load_rows(gen, self.manifest.vocab_rows)

    def _load_for_export(self) -> None:
        self.manifest = Manifest.load(self.path)
        if not self.steps:
            raise CmergeError(f"nothing has been merged into {self.path} yet; run `cmerge add` first.")


def _default_name(model: Any, t: int) -> str:
    if isinstance(model, (str, os.PathLike)):
        p = Path(model)
        return p.stem if p.is_file() else p.name
    return f"model-{t}"

