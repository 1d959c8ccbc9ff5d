"""The on-disk merge state: a JSON manifest plus accumulator generations.

Layout of a state folder::

    manifest.json            format, method + parameters, base (path, sha256, tensors, kinds),
                             scalars (λ_t, …), the step log, the current generation
    gen-000003/accumulators.safetensors   the method's per-tensor accumulators after step 3
    .lock                    held (flock) by a running `add`

A step writes ``gen-00000t.partial/``, renames it to ``gen-00000t/`` and then switches the
manifest by an atomic rename, so a kill at any instant leaves the last good state readable;
leftovers of an interrupted step are removed by the next ``add``, which redoes the step.
"""
from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from . import __version__
from .checkpoint import (SafetensorsSource, StreamingSafetensorsWriter, TensorMeta, TensorSource, combine_digests,
                         copy_aux_files, dtype_name, open_source, parse_dtype, parse_size, tensor_digest, write_sharded)
from .engine import (Plan, accumulator_key, accumulator_specs, check_compatible, iter_merged, resolve_extras,
                     run_step)
from .errors import CmergeError
from .layers import BY_ARCHITECTURE, BY_NAME, PASSTHROUGH, Classification, classify
from .methods import REGISTRY, get_method
from .model_card import model_card

FORMAT = "cmerge-state"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LOCK = ".lock"
DEFAULT_SHARD_SIZE = "5GB"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _fsync_dir(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _gen_dir(t: int) -> str:
    return f"gen-{t:06d}"


class _DiskAccumulators:
    """Reads the accumulators of one generation, one tensor at a time."""

    def __init__(self, path: Path, method: str) -> None:
        self._src = SafetensorsSource([path], f"the merge state's accumulators {path}")
        written_by = self._src.metadata.get("method")
        if written_by != method:
            raise CmergeError(f"the merge state's accumulators {path} were written by method {written_by!r} but its "
                              f"manifest names method {method!r}; the state is inconsistent.")

    def get(self, acc: str, name: str) -> torch.Tensor:
        # mapped: a step and an export use each accumulator tensor once and drop it
        return self._src.get_mapped(accumulator_key(acc, name))

    def get_rows(self, acc: str, name: str, rows: slice) -> torch.Tensor:
        return self._src.get_rows(accumulator_key(acc, name), rows)


class _WriterSink:
    def __init__(self, writer: StreamingSafetensorsWriter) -> None:
        self.writer = writer

    def put(self, acc: str, name: str, tensor: torch.Tensor) -> None:
        self.writer.write(accumulator_key(acc, name), tensor)

    def put_rows(self, acc: str, name: str, block: torch.Tensor) -> None:
        self.writer.write_rows(accumulator_key(acc, name), block)


def _plan_from_manifest(m: Mapping[str, Any]) -> Plan:
    tensors = m["base"]["tensors"]
    metas = {n: TensorMeta(tuple(v["shape"]), parse_dtype_any(v["dtype"])) for n, v in tensors.items()}
    return Plan(metas, {n: v["kind"] for n, v in tensors.items()})


def parse_dtype_any(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise CmergeError(f"the manifest names an unknown dtype {name!r}.")
    return dt


def init_state(path: str | os.PathLike, base: str | os.PathLike, method: str = "opcm", *,
               precision: str = "float32", project: Sequence[str] = (), no_project: Sequence[str] = (),
               strict_layers: bool = False, progress: bool = False, **params: Any) -> "State":
    """Create a merge state at ``path`` for ``base`` and a registered method (nothing merged yet)."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise CmergeError(f"{path} already exists and is not empty; choose a new folder for the merge state.")
    if not isinstance(base, (str, os.PathLike)):
        raise CmergeError("an on-disk merge state needs the base model as a path; use cmerge.Merger for in-memory models.")
    m = get_method(method, **params)
    if precision not in ("float32", "float64"):
        raise CmergeError(f"precision must be float32 or float64, got {precision!r}.")
    base_path = Path(base).resolve()
    src = open_source(base_path)
    metas = {n: src.meta(n) for n in src.keys()}
    cls = classify(metas, src.folder, project, no_project, strict=strict_layers)
    digests = {}
    for n in tqdm(src.keys(), desc="reading base", unit="tensor", disable=not progress, leave=False):
        t = src.get(n)
        if t.dtype.is_floating_point and not bool(torch.isfinite(t).all()):
            raise CmergeError(f"the base model's tensor {n!r} contains NaN or Inf.")
        digests[n] = tensor_digest(n, t)
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "cmerge_version": __version__,
        "created": _now(), "method": m.name, "params": m.p, "precision": precision,
        "base": {"path": str(base_path), "sha256": combine_digests(digests), "classified_by": cls.how,
                 "architecture": cls.architecture,
                 "tensors": {n: {"shape": list(metas[n].shape), "dtype": dtype_name(metas[n].dtype),
                                 "kind": cls.kinds[n], "route": cls.routes[n]} for n in sorted(metas)}},
        "scalars": m.initial_scalars(), "generation": None, "steps": [],
    }
    path.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(path / MANIFEST, manifest)
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
        self.manifest = self._load()

    # ------------------------------------------------------------ reading
    def _load(self) -> dict[str, Any]:
        mpath = self.path / MANIFEST
        if not mpath.exists():
            raise CmergeError(f"{self.path} is not a cmerge merge state (no {MANIFEST}); create one with `cmerge init`.")
        try:
            m = json.loads(mpath.read_text())
        except Exception as exc:
            raise CmergeError(f"{mpath} is not readable JSON ({exc}).") from exc
        if m.get("format") != FORMAT:
            raise CmergeError(f"{mpath} is not a cmerge merge state manifest.")
        if int(m.get("format_version", -1)) > FORMAT_VERSION:
            raise CmergeError(f"{self.path} was written by a newer cmerge (state format {m.get('format_version')}); "
                              f"upgrade cmerge to read it.")
        if m.get("method") not in REGISTRY:
            raise CmergeError(f"{self.path} was written by method {m.get('method')!r}, which this cmerge does not know.")
        return m

    @property
    def method(self):
        return get_method(self.manifest["method"], **self.manifest["params"])

    @property
    def plan(self) -> Plan:
        return _plan_from_manifest(self.manifest)

    @property
    def steps(self) -> list[dict[str, Any]]:
        return self.manifest["steps"]

    @property
    def compute_dtype(self) -> torch.dtype:
        return parse_dtype(self.manifest["precision"])

    @property
    def classification(self) -> Classification:
        """Which tensors are projected and by which route (recorded at `init`)."""
        b = self.manifest["base"]
        default_route = BY_ARCHITECTURE if b["classified_by"].startswith("architecture") else BY_NAME
        tensors = b["tensors"]
        return Classification({n: v["kind"] for n, v in tensors.items()},
                              {n: v.get("route", default_route) for n, v in tensors.items()},
                              b["classified_by"], architecture=b.get("architecture"))

    def info(self) -> dict[str, Any]:
        """method, params, base, steps (name, sha256, norm, lambda, …), scalars and the tensor classification."""
        m = self.manifest
        cls = self.classification
        kinds = list(cls.kinds.values())
        return {
            "state": str(self.path), "format_version": m["format_version"], "method": m["method"],
            "params": m["params"], "precision": m["precision"],
            "base": {"path": m["base"]["path"], "sha256": m["base"]["sha256"], "classified_by": cls.how,
                     "architecture": cls.architecture},
            "tensors": {k: kinds.count(k) for k in sorted(set(kinds))},
            "summary": cls.summary(),
            "projected": cls.projected(),
            "classification": cls.kinds, "routes": cls.routes,
            "scalars": m["scalars"], "generation": m["generation"], "steps": m["steps"],
        }

    def _base_source(self) -> TensorSource:
        bpath = Path(self.manifest["base"]["path"])
        if not bpath.exists():
            raise CmergeError(f"the base model {bpath} recorded in the merge state no longer exists.")
        src = open_source(bpath, description=f"base {bpath}")
        check_compatible(self.plan, src, f"the base model {bpath}")
        return src

    def _accumulators(self) -> _DiskAccumulators | None:
        gen = self.manifest["generation"]
        return None if gen is None else _DiskAccumulators(self.path / gen / "accumulators.safetensors",
                                                          self.manifest["method"])

    # ------------------------------------------------------------ writing
    @contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(str(self.path / LOCK), os.O_CREAT | os.O_RDWR, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise CmergeError(f"another cmerge process is adding to {self.path}; wait for it to finish.") from None
            yield
        finally:
            os.close(fd)

    def _remove_stale(self) -> None:
        keep = self.manifest["generation"]
        for p in self.path.iterdir():
            if p.is_dir() and p.name.startswith("gen-") and p.name != keep:
                shutil.rmtree(p, ignore_errors=True)
        tmp = self.path / (MANIFEST + ".tmp")
        if tmp.exists():
            tmp.unlink()

    def add(self, model: Any, name: str | None = None, *, force: bool = False, device: str = "cpu",
            progress: bool = False, extras: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Fold one model into the state (one atomic step) and return its step-log entry."""
        with self._locked():
            self.manifest = self._load()
            self._remove_stale()
            method, plan = self.method, self.plan
            incoming = open_source(model)
            check_compatible(plan, incoming, incoming.description)
            extra_srcs = resolve_extras(method, model, extras)
            base = self._base_source()
            t = len(self.steps) + 1
            final = self.path / _gen_dir(t)
            partial = self.path / (_gen_dir(t) + ".partial")
            partial.mkdir()
            acc_dtype = self.compute_dtype
            writer = StreamingSafetensorsWriter(partial / "accumulators.safetensors",
                                                accumulator_specs(plan, method, acc_dtype),
                                                {"cmerge_step": str(t), "method": method.name}, background=True)
            started = time.time()
            try:
                out = run_step(method, self.manifest["scalars"], t, plan, base, incoming, self._accumulators(),
                               _WriterSink(writer), extras=extra_srcs, compute_dtype=self.compute_dtype,
                               acc_dtype=acc_dtype, device=device, progress=progress,
                               desc=f"step {t}: {name or incoming.description}", map_reads=True)
                if out.base_sha256 != self.manifest["base"]["sha256"]:
                    raise CmergeError(f"the base model {self.manifest['base']['path']} changed since `cmerge init` "
                                      f"(content hash differs); restore it or start a new state.")
                for s in self.steps:
                    if s["sha256"] == out.incoming_sha256 and not force:
                        raise CmergeError(f"this model was already merged as step {s['t']} ({s['name']}); "
                                          f"pass --force to add it again.")
                writer.close()
            except BaseException:
                writer.abort()
                shutil.rmtree(partial, ignore_errors=True)
                raise
            os.replace(partial, final)
            _fsync_dir(self.path)
            entry = {
                "t": t, "name": name or _default_name(model, t), "source": _describe_source(model),
                "sha256": out.incoming_sha256, "time": _now(), "seconds": round(time.time() - started, 3),
                "norm": out.tau_norm, "lambda": None, **method.step_summary(out.scalars),
                "protected_rank": out.notes or None,
            }
            if extra_srcs:
                entry["extras"] = {k: src.description for k, src in extra_srcs.items()}
            old = self.manifest["generation"]
            new_manifest = dict(self.manifest, scalars=out.scalars, generation=final.name,
                                steps=self.steps + [entry], updated=_now())
            _write_json_atomic(self.path / MANIFEST, new_manifest)
            self.manifest = new_manifest
            if old is not None:
                shutil.rmtree(self.path / old, ignore_errors=True)
            return entry

    def export(self, out: str | os.PathLike, *, dtype: str | None = None, shard_size: str | int = DEFAULT_SHARD_SIZE,
               device: str = "cpu", progress: bool = False) -> Path:
        """Write θ_merged as a model folder: safetensors (sharded + index if large), config/tokenizer, model card."""
        out = Path(out)
        if not self.steps:
            raise CmergeError(f"nothing has been merged into {self.path} yet; run `cmerge add` first.")
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise CmergeError(f"{out} already exists and is not empty; choose a new output folder.")
        out_dtype = parse_dtype(dtype) if dtype else None
        max_bytes = parse_size(shard_size)
        method, plan, base = self.method, self.plan, self._base_source()
        specs = [(n, out_dtype if (out_dtype and plan.kinds[n] != PASSTHROUGH) else plan.metas[n].dtype,
                  plan.metas[n].shape) for n in plan.names]
        tmp = out.with_name(out.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        digests: dict[str, bytes] = {}
        try:
            tensors = iter_merged(method, self.manifest["scalars"], plan, base, self._accumulators(),
                                  dtype=out_dtype, compute_dtype=self.compute_dtype, device=device,
                                  digests=digests, progress=progress, map_reads=True, by_rows=True)
            want = {n: d for n, d, _ in specs}
            write_sharded(tmp, specs, ((n, t if t.dtype == want[n] else t.to(want[n])) for n, t in tensors),
                          max_bytes, {"cmerge_method": method.name}, background=True)
            if combine_digests(digests) != self.manifest["base"]["sha256"]:
                raise CmergeError(f"the base model {self.manifest['base']['path']} changed since `cmerge init` "
                                  f"(content hash differs); restore it or start a new state.")
            copy_aux_files(base.folder, tmp)
            (tmp / "README.md").write_text(model_card(self.info(), dtype or "as base"))
            (tmp / "cmerge_merge.json").write_text(json.dumps(_provenance(self.info()), indent=2) + "\n")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
        return out


def _provenance(info: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in info.items() if k not in ("classification", "routes")}


def _default_name(model: Any, t: int) -> str:
    if isinstance(model, (str, os.PathLike)):
        p = Path(model)
        return p.stem if p.is_file() else p.name
    return f"model-{t}"


def _describe_source(model: Any) -> str:
    if isinstance(model, (str, os.PathLike)):
        return str(Path(model).resolve())
    return f"<in-memory {type(model).__name__}>"
