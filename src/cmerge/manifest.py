"""The merge state's manifest, typed: what was merged, how, and where the accumulators are.

``manifest.json`` holds the format and versions, the method and its parameters, the
compute precision, the base model (:class:`BaseRecord`: path, content hash, norm, file
fingerprints, every tensor's shape, dtype and classification), the method's global
scalars (λ_t, …), the current accumulator generation and the step log (one
:class:`StepRecord` per merged model; the in-memory ``Merger`` keeps the same records).
:meth:`Manifest.load` does every check once; :meth:`Manifest.save` replaces the file
atomically.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from . import __version__
from .errors import CmergeError
from .fsutil import atomic_write_json
from .layers import BY_ARCHITECTURE, BY_NAME, Classification
from .methods import REGISTRY

if TYPE_CHECKING:
    from .engine import Plan

FORMAT = "cmerge-state"
FORMAT_VERSION = 2       # the newest this cmerge reads; a state is written with the lowest that holds it
BASE_FORMAT_VERSION = 1  # every state without a grown vocabulary
VOCAB_FORMAT_VERSION = 2  # a state made with --vocab union
MANIFEST = "manifest.json"


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class TensorRecord:
    shape: list[int]
    dtype: str
    kind: str
    route: str | None = None  # how the kind was decided (layers.py); None in states written before routes


@dataclass
class BaseRecord:
    path: str
    sha256: str
    classified_by: str
    tensors: dict[str, TensorRecord]
    architecture: str | None = None
    norm: float | None = None                     # ‖θ0‖ over every floating tensor (None: older states)
    files: dict[str, list[int]] | None = None     # weight file → [size, mtime_ns] at init, a cheap change check

    def plan(self) -> Plan:
        """The engine's plan (imports torch: every dtype named must be one torch knows)."""
        from .engine import Plan
        from .io import TensorMeta, torch_dtype

        return Plan({n: TensorMeta(tuple(r.shape), torch_dtype(r.dtype)) for n, r in self.tensors.items()},
                    {n: r.kind for n, r in self.tensors.items()})

    def classification(self) -> Classification:
        default = BY_ARCHITECTURE if self.classified_by.startswith("architecture") else BY_NAME
        return Classification({n: r.kind for n, r in self.tensors.items()},
                              {n: r.route or default for n, r in self.tensors.items()},
                              self.classified_by, architecture=self.architecture)


@dataclass
class StepRecord(Mapping):
    """One merged model in the step log; also a read-only mapping of its JSON form (``record["lambda"]``)."""

    t: int
    name: str
    sha256: str
    norm: float
    seconds: float
    time: str = field(default_factory=now)
    source: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)  # the method's step_summary (λ_t, …)
    protected_rank: dict[str, list[int]] | None = None
    extras: dict[str, str] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {"t": self.t, "name": self.name, "source": self.source, "sha256": self.sha256, "time": self.time,
               "seconds": self.seconds, "norm": self.norm, "lambda": None, **self.summary,
               "protected_rank": self.protected_rank}
        if self.source is None:
            del out["source"]
        if self.extras:
            out["extras"] = self.extras
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "StepRecord":
        known = {f.name for f in fields(cls)} - {"summary"}
        summary = {k: v for k, v in d.items() if k not in known}
        if summary.get("lambda") is None:
            summary.pop("lambda", None)
        return cls(**{k: d[k] for k in known if k in d}, summary=summary)

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())


@dataclass
class Manifest:
    method: str
    params: dict[str, Any]
    precision: str
    base: BaseRecord
    scalars: dict[str, Any]
    generation: str | None = None
    steps: list[StepRecord] = field(default_factory=list)
    factored: dict[str, int] = field(default_factory=dict)  # tensors the generation keeps as factors: width
    vocab: str = "base"        # "union": a grown vocabulary's new rows are kept (vocab.py)
    vocab_rows: dict[str, int] = field(default_factory=dict)  # grown tensors: rows past the base's
    vocab_from: str | None = None  # the folder whose config and tokenizer describe the grown vocabulary
    created: str = field(default_factory=now)
    updated: str | None = None
    format: str = FORMAT
    format_version: int = BASE_FORMAT_VERSION
    cmerge_version: str = __version__

    @property
    def plan(self) -> Plan:
        return self.base.plan()

    def info(self, folder: Path) -> dict[str, Any]:
        """What `cmerge info` shows of the state in ``folder``: method, params, base, steps (name, sha256, norm,
        lambda, …), scalars and the tensor classification. Reads only the manifest (no torch)."""
        cls = self.base.classification()
        kinds = list(cls.kinds.values())
        return {
            "state": str(folder), "format_version": self.format_version, "method": self.method,
            "params": self.params, "precision": self.precision,
            "base": {"path": self.base.path, "sha256": self.base.sha256, "classified_by": cls.how,
                     "architecture": cls.architecture},
            "tensors": {k: kinds.count(k) for k in sorted(set(kinds))},
            "summary": cls.summary(), "projected": cls.projected(),
            "classification": cls.kinds, "routes": cls.routes,
            "scalars": self.scalars, "generation": self.generation, "factored": self.factored,
            **({"vocab": {"mode": self.vocab, "new_rows": self.vocab_rows, "tokenizer_from": self.vocab_from}}
               if self.vocab != "base" else {}),
            "steps": [s.to_dict() for s in self.steps],
        }

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["base"] = asdict(self.base)
        d["steps"] = [s.to_dict() for s in self.steps]
        if d["updated"] is None:
            del d["updated"]
        if self.vocab == "base":  # written only when used: older readers then refuse the state (format_version)
            for k in ("vocab", "vocab_rows", "vocab_from"):
                del d[k]
        else:
            d["format_version"] = max(self.format_version, VOCAB_FORMAT_VERSION)
        return d

    def save(self, folder: Path) -> None:
        atomic_write_json(Path(folder) / MANIFEST, self.to_dict())

    def with_step(self, record: StepRecord, scalars: Mapping[str, Any], generation: str,
                  factored: Mapping[str, int], vocab_rows: Mapping[str, int] | None = None,
                  vocab_from: str | None = None) -> "Manifest":
        return replace(self, steps=[*self.steps, record], scalars=dict(scalars), generation=generation,
                       factored=dict(factored), updated=now(),
                       vocab_rows=dict(self.vocab_rows if vocab_rows is None else vocab_rows),
                       vocab_from=vocab_from or self.vocab_from)

    @classmethod
    def load(cls, folder: Path) -> "Manifest":
        """Read and check ``folder/manifest.json``: one sentence for anything that is not a state we can use."""
        folder = Path(folder)
        mpath = folder / MANIFEST
        if not mpath.exists():
            raise CmergeError(f"{folder} is not a cmerge merge state (no {MANIFEST}); create one with `cmerge init`.")
        try:
            d = json.loads(mpath.read_text())
        except Exception as exc:
            raise CmergeError(f"{mpath} is not readable JSON ({exc}).") from exc
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise CmergeError(f"{mpath} is not a cmerge merge state manifest.")
        try:
            version = int(d.get("format_version", -1))
        except (TypeError, ValueError):
            version = -1
        if version > FORMAT_VERSION:
            raise CmergeError(f"{folder} was written by a newer cmerge (state format {d.get('format_version')}); "
                              f"upgrade cmerge to read it.")
        if d.get("method") not in REGISTRY:
            raise CmergeError(f"{folder} was written by method {d.get('method')!r}, which this cmerge does not know.")
        try:
            b = dict(d["base"])
            b["tensors"] = {n: TensorRecord(**r) for n, r in b["tensors"].items()}
            base = BaseRecord(**b)
            steps = [StepRecord.from_dict(s) for s in d["steps"]]
            m = cls(method=d["method"], params=dict(d["params"]), precision=d["precision"], base=base,
                    scalars=dict(d["scalars"]), generation=d["generation"], steps=steps,
                    factored={str(k): int(v) for k, v in (d.get("factored") or {}).items()}, created=d["created"],
                    vocab=str(d.get("vocab", "base")),
                    vocab_rows={str(k): int(v) for k, v in (d.get("vocab_rows") or {}).items()},
                    vocab_from=d.get("vocab_from"),
                    updated=d.get("updated"), format=d["format"], format_version=version,
                    cmerge_version=d.get("cmerge_version", "?"))
            if m.vocab not in ("base", "union") or (m.vocab_rows and m.vocab != "union"):
                raise ValueError(f"vocab {m.vocab!r} with grown rows {sorted(m.vocab_rows)}")
        except CmergeError:
            raise
        except Exception as exc:
            raise CmergeError(f"{mpath} is damaged or incomplete ({type(exc).__name__}: {exc}).") from exc
        if m.generation is not None and not (folder / m.generation).is_dir():
            raise CmergeError(f"{mpath} names generation {m.generation}, which is missing; the state is damaged.")
        return m


def check_finite_scalars(scalars: Mapping[str, Any], what: str) -> None:
    """Refuse a step whose global numbers (λ_t, norms) are not finite."""
    for k, v in scalars.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise CmergeError(f"{what} would make {k} = {v} (the task vector's values are too large for the "
                              f"state's precision); nothing was changed.")


def file_fingerprints(files: list[Path]) -> dict[str, list[int]]:
    """Size and modification time of each weight file: unchanged means (almost surely) unchanged content."""
    out = {}
    for f in files:
        st = os.stat(f)
        out[str(f)] = [st.st_size, st.st_mtime_ns]
    return out
