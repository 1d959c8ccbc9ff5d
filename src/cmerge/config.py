"""A merge described by a YAML file, as mergekit users write them.

::

    method: opcm
    params: {alpha: 0.5}
    base: models/base
    models:
      - models/sun397                     # a path, or:
      - {path: models/cars, name: cars, fisher: models/cars/exp_avg_sq.safetensors}
    dtype: bfloat16                       # export dtype (default: the base's)
    shard_size: 5GB
    device: cpu
    precision: float32
    project: ["attn\\.qkv\\.weight$"]      # also: no_project, strict_layers, allow_empty, output

``cmerge merge --config FILE`` and ``cmerge init STATE --config FILE`` read it; flags given
on the command line override the file's values (a method parameter flag overrides that
one parameter). Relative paths are relative to the file's folder. An unknown key, a
value of the wrong type or a parameter the method does not declare is refused with one
sentence naming it.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from .errors import CmergeError
from .methods import get_method_class


@dataclass(frozen=True)
class ModelEntry:
    """One model to merge: its path, an optional name for the step log, and per-model extra inputs."""

    path: str
    name: str | None = None
    extras: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class MergeConfig:
    method: str = "opcm"
    params: dict[str, Any] = field(default_factory=dict)
    base: str | None = None
    models: tuple[ModelEntry, ...] = ()
    dtype: str | None = None
    shard_size: str = "5GB"
    device: str = "cpu"
    precision: str = "float32"
    project: tuple[str, ...] = ()
    no_project: tuple[str, ...] = ()
    strict_layers: bool = False
    allow_empty: bool = False
    output: str | None = None
    vocab: str = "base"

    def with_flags(self, **flags: Any) -> "MergeConfig":
        """This config with every flag that was given (not None, not empty) put in its place."""
        given = {k: v for k, v in flags.items() if v is not None and v != () and v is not False}
        params = {**self.params, **given.pop("params", {})}
        return replace(self, params=params, **given)

    def method_params(self) -> dict[str, Any]:
        """The parameters, parsed and checked by the method's own declaration."""
        return get_method_class(self.method).parse_params(self.params)


_STR_KEYS = ("method", "base", "dtype", "device", "precision", "output", "vocab")
_CHOICES = {"dtype": ("float32", "float16", "bfloat16", "float64"), "precision": ("float32", "float64"),
            "vocab": ("base", "union")}


def _where(path: Path, key: str) -> str:
    return f"{path}: {key}"


def load_config(path: str | Path) -> MergeConfig:
    """Read and check a merge config file (see the module docstring)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise CmergeError(f"cannot read the config file {path} ({exc.strerror or exc}).") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise CmergeError(f"{path} is not valid YAML{where}.") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise CmergeError(f"{path} must be a mapping of keys (method, params, base, models, ...), not a "
                          f"{type(raw).__name__}.")
    known = {f.name for f in fields(MergeConfig)}
    unknown = sorted(str(k) for k in raw if k not in known)
    if unknown:
        raise CmergeError(f"{path}: unknown key {unknown[0]!r}; the keys are {', '.join(sorted(known))}.")
    folder = path.parent
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if value is None:
            continue
        if key in _STR_KEYS or key == "shard_size":
            if not isinstance(value, str) and not (key == "shard_size" and isinstance(value, int)):
                raise CmergeError(f"{_where(path, key)} must be a string, got {type(value).__name__} {value!r}.")
            if key in _CHOICES and value not in _CHOICES[key]:
                raise CmergeError(f"{_where(path, key)} must be one of {', '.join(_CHOICES[key])}, got {value!r}.")
            values[key] = _relative(folder, value) if key in ("base", "output") else value
        elif key in ("strict_layers", "allow_empty"):
            if not isinstance(value, bool):
                raise CmergeError(f"{_where(path, key)} must be true or false, got {value!r}.")
            values[key] = value
        elif key in ("project", "no_project"):
            items = [value] if isinstance(value, str) else value
            if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
                raise CmergeError(f"{_where(path, key)} must be a regular expression or a list of them.")
            values[key] = tuple(items)
        elif key == "params":
            if not isinstance(value, dict):
                raise CmergeError(f"{_where(path, key)} must be a mapping of parameter names to values.")
            values[key] = {str(k): v for k, v in value.items()}
        elif key == "models":
            if not isinstance(value, list):
                raise CmergeError(f"{_where(path, key)} must be a list of model paths or of mappings with a path.")
            values[key] = tuple(_model_entry(path, folder, i, v) for i, v in enumerate(value))
    config = MergeConfig(**values)
    try:
        config.method_params()
    except CmergeError as exc:
        raise CmergeError(f"{path}: {str(exc)[0].lower()}{str(exc)[1:]}") from None
    return config


def _relative(folder: Path, value: str) -> str:
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else folder / p)


def _model_entry(path: Path, folder: Path, i: int, value: Any) -> ModelEntry:
    where = _where(path, f"models[{i}]")
    if isinstance(value, str):
        return ModelEntry(_relative(folder, value))
    if not isinstance(value, dict) or not isinstance(value.get("path"), str):
        raise CmergeError(f"{where} must be a path or a mapping with a 'path'.")
    name = value.get("name")
    if name is not None and not isinstance(name, str):
        raise CmergeError(f"{where}.name must be a string, got {name!r}.")
    extras = {}
    for k, v in value.items():
        if k in ("path", "name"):
            continue
        if not isinstance(v, str):
            raise CmergeError(f"{where}.{k} must be a file path, got {v!r}.")
        extras[str(k)] = _relative(folder, v)
    return ModelEntry(_relative(folder, value["path"]), name, extras)


def check_extras(config: MergeConfig) -> None:
    """Per-model extra inputs must be ones the method declares (e.g. ``fisher``)."""
    declared = get_method_class(config.method).extra_inputs
    for i, m in enumerate(config.models):
        for k in m.extras:
            if k not in declared:
                takes = ", ".join(declared) or "none"
                raise CmergeError(f"models[{i}] gives {k!r}, which method {config.method!r} does not take "
                                  f"(its extra inputs: {takes}).")


def dump_config(config: MergeConfig) -> str:
    """The YAML text of a config (e.g. to record what a merge ran)."""
    d: dict[str, Any] = {}
    for f in fields(MergeConfig):
        v = getattr(config, f.name)
        if f.name == "models":
            v = [{"path": m.path, **({"name": m.name} if m.name else {}), **m.extras} for m in v]
        elif isinstance(v, tuple):
            v = list(v)
        d[f.name] = v
    return yaml.safe_dump(d, sort_keys=False, allow_unicode=True)

