"""Which tensors are linear-layer weights (projected by OPCM) and which are not.

OPCM projects only the weight matrices of linear layers (docs/methods.md; the reference
code finds them by module type). Token and position embeddings are 2-D too but are
``nn.Embedding`` and use the identity, so a name-only rule is a fallback, not the first
choice:

1. **Architecture.** When the model folder has a transformers ``config.json`` and
   transformers is installed, the architecture is built on the meta device (no memory, no
   download). Its linear weights are the weights of ``nn.Linear`` modules and of
   transformers' ``Conv1D`` (which stores the transposed matrix); a linear weight that is
   tied to an embedding (a tied ``lm_head``) is an embedding. Each checkpoint key is
   mapped to the model's parameter **the way transformers loads it**: through its
   weight-conversion mapping (transformers 5 renames keys while loading: ViT's
   ``encoder.layer.N.attention.attention.query`` is ``layers.N.attention.q_proj``, CLIP's
   ``vision_model.`` prefix is dropped) and through the base-model prefix (added or
   stripped, as both versions do). A 2-D weight that a converter fuses into a 3-D
   parameter (the stacked experts of a mixture-of-experts layer) is one expert's linear
   weight.
2. **Name rule**, for the checkpoint keys the architecture could not place (or for all of
   them when there is no usable architecture): 2-D tensors named ``*.weight`` whose names
   do not look like embeddings. Whenever it stands in for the architecture, a note says
   so and why; ``strict=True`` refuses instead.
3. ``project`` / ``no_project`` regular expressions override both (``no_project`` wins).

Non-floating tensors (integer buffers such as position ids) are passed through unchanged.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from .errors import CmergeError

if TYPE_CHECKING:
    import torch

log = logging.getLogger("cmerge")

LINEAR = "linear"            # projected (nn.Linear weight, or a 2-D weight by the name rule)
LINEAR_T = "linear_t"        # projected; transformers Conv1D (in x out layout; SVD is transpose-invariant)
LINEAR_STACK = "linear_stack"  # projected matrix by matrix: a 3-D stack of experts' linear weights (MoE)
OTHER = "other"              # identity rule: biases, norms, embeddings, convolutions, ...
PASSTHROUGH = "passthrough"  # non-floating tensor: copied from the base, never merged

PROJECTED = (LINEAR, LINEAR_T, LINEAR_STACK)
EMBEDDING_NAME = re.compile(r"(embed|wte|wpe|tok_embeddings|position|token_type|shared\.weight|lm_head|class_embedding)", re.I)

# How a tensor's kind was decided (Classification.routes).
BY_ARCHITECTURE = "architecture"
BY_NAME = "name rule"
BY_USER = "user pattern"
BY_DTYPE = "dtype"  # non-floating: passed through


def is_projected(kind: str) -> bool:
    return kind in PROJECTED


@dataclass(frozen=True)
class Classification:
    """The kind of every tensor, the route that decided it, and what is worth telling the user.

    ``how`` is the one phrase recorded as the state's ``classified_by``; ``notes`` are the
    fallbacks (one sentence each) that the CLI prints once on stderr; ``architecture`` is
    the class built on the meta device, if any.
    """

    kinds: dict[str, str]
    routes: dict[str, str]
    how: str
    notes: tuple[str, ...] = ()
    architecture: str | None = None

    def projected(self) -> list[str]:
        return sorted(n for n, k in self.kinds.items() if is_projected(k))

    def counts(self) -> dict[str, dict[str, int]]:
        """{"projected" | "identity" | "passed through": {route: count}}."""
        out: dict[str, dict[str, int]] = {"projected": {}, "identity": {}, "passed through": {}}
        for name, kind in self.kinds.items():
            group = "projected" if is_projected(kind) else "passed through" if kind == PASSTHROUGH else "identity"
            route = self.routes[name]
            out[group][route] = out[group].get(route, 0) + 1
        return out

    def summary(self) -> str:
        """One line, e.g. "12 projected (architecture), 30 identity, 1 passed through"."""
        parts = []
        for group, by_route in self.counts().items():
            n = sum(by_route.values())
            if group == "identity" or group == "passed through":
                parts.append(f"{n} {group}")
                continue
            routes = ", ".join(f"{c} {r}" for r, c in sorted(by_route.items()))
            parts.append(f"{n} projected" + (f" ({routes})" if routes else ""))
        return ", ".join(parts)


@dataclass
class _Architecture:
    """The meta-device model of a config: its linear weights and a checkpoint-key → parameter map."""

    name: str
    linear: set[str] = field(default_factory=set)     # parameter names of nn.Linear weights
    linear_t: set[str] = field(default_factory=set)   # of Conv1D weights
    embeddings: set[str] = field(default_factory=set)  # of nn.Embedding weights
    stacks: set[str] = field(default_factory=set)      # 3-D parameters that stack experts' linear weights
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # every parameter's shape
    to_param: Callable[[str], tuple[str, bool]] = lambda key: (key, False)  # key → (param, fused by a converter)

    def kind_of(self, key: str, ndim: int) -> str | None:
        """LINEAR / LINEAR_T / OTHER for a checkpoint key the model has, None if it cannot be placed."""
        param, fused = self.to_param(key)
        if param not in self.shapes:
            return None
        if ndim == 3 and param in self.stacks and not fused:
            return LINEAR_STACK  # a checkpoint that stores the experts stacked, as the model does
        if ndim != 2:
            return OTHER
        if param in self.linear_t:
            return LINEAR_T
        if param in self.linear or (fused and len(self.shapes[param]) == 3):
            return LINEAR  # a Linear weight, or one expert's matrix of a stacked-experts parameter
        return OTHER

    def expected(self) -> set[str]:
        return self.linear | self.linear_t | self.stacks


def _build_architecture(folder: Path) -> tuple[_Architecture | None, str | None]:
    """The architecture of ``folder/config.json`` on the meta device, or (None, why not)."""
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        return None, None  # a plain weights file: the name rule is the only rule, nothing to say
    try:
        import torch  # with transformers: reading a classification needs neither
        import transformers
        from transformers import AutoConfig
    except ImportError:
        return None, "transformers is not installed"
    try:
        cfg_json = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:  # a broken model folder, not a missing architecture: refuse
        raise CmergeError(f"{cfg_path} is not readable JSON ({exc}); fix or remove it.") from None
    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        arch = ((cfg_json.get("architectures") or [None]) if isinstance(cfg_json, dict) else [None])[0]
        cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
        with torch.device("meta"):
            model = cls(config) if cls is not None else transformers.AutoModel.from_config(config)
    except Exception as exc:  # transformers' own errors for configs it cannot build
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")
        return None, f"transformers could not build the architecture of {cfg_path} ({text})"
    return _describe(model), None


def _describe(model: torch.nn.Module) -> _Architecture:
    import torch

    try:
        from transformers.pytorch_utils import Conv1D as conv1d
    except ImportError:
        conv1d = None
    arch = _Architecture(type(model).__name__)
    names_of: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(name)
        arch.shapes[name] = tuple(p.shape)
    linear, linear_t = set(), set()
    for mod_name, mod in model.named_modules():
        name = f"{mod_name}.weight" if mod_name else "weight"
        if conv1d is not None and isinstance(mod, conv1d):
            linear_t.add(name)
        elif isinstance(mod, torch.nn.Linear):
            linear.add(name)
        elif isinstance(mod, torch.nn.Embedding):
            arch.embeddings.add(name)
    for names in names_of.values():
        # a linear weight tied to an embedding (a tied lm_head) is the embedding: identity rule for all names
        if len(names) > 1 and not all(n in linear or n in linear_t for n in names):
            linear.difference_update(names)
            linear_t.difference_update(names)
    arch.linear, arch.linear_t = linear, linear_t
    arch.to_param, targets = _key_mapper(model, set(arch.shapes))
    arch.stacks = {n for n, shape in arch.shapes.items() if len(shape) == 3 and any(t.search(n) for t in targets)}
    return arch


def _key_mapper(model: Any, params: set[str]) -> tuple[Callable[[str], tuple[str, bool]], list[re.Pattern]]:
    """checkpoint key → (the model's parameter name, whether a converter fuses it), as transformers loads it;
    and the converters' target patterns (the parameters they build, e.g. stacked experts)."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    try:  # transformers 5: the weight-conversion mapping, then the base-model prefix
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key
    except ImportError:  # transformers 4: the base-model prefix only
        fix = getattr(model, "_fix_state_dict_key_on_load", None)

        def map_v4(key: str) -> tuple[str, bool]:
            if callable(fix):
                key = fix(key)[0]
            for cand in (key, f"{prefix}.{key}" if prefix else None,
                         key[len(prefix) + 1:] if prefix and key.startswith(prefix + ".") else None):
                if cand is not None and cand in params:
                    return cand, False
            return key, False

        return map_v4, []
    transforms = get_model_conversion_mapping(model)
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    present = dict.fromkeys(params, True)  # rename_source_key only asks whether a name exists
    targets = []
    for conv in converters:
        for pattern in getattr(conv, "target_patterns", None) or []:
            try:
                targets.append(re.compile(re.escape(pattern) + "$" if "*" not in pattern else pattern))
            except re.error:
                continue

    def map_v5(key: str) -> tuple[str, bool]:
        renamed, pattern = rename_source_key(key, renamings, converters, prefix or None, present)
        return renamed, pattern is not None

    return map_v5, targets


def checkpoint_keys(keys: Sequence[str], folder: Path | None) -> dict[str, str]:
    """The model's parameter name → its checkpoint key, for the keys transformers renames while loading
    (empty when there is no usable architecture). A LoRA adapter names modules the model's way."""
    arch, _ = _build_architecture(Path(folder)) if folder is not None else (None, None)
    if arch is None:
        return {}
    out = {}
    for key in keys:
        param, _ = arch.to_param(key)
        if param in arch.shapes and param != key:
            out[param] = key
    return out


def embedding_weights(keys: Sequence[str], folder: Path | None) -> set[str]:
    """The checkpoint keys that are ``nn.Embedding`` weights (by architecture; empty without one)."""
    arch, _ = _build_architecture(Path(folder)) if folder is not None else (None, None)
    if arch is None:
        return set()
    return {k for k in keys if arch.to_param(k)[0] in arch.embeddings}


def _by_name(name: str, meta_shape: tuple[int, ...]) -> str:
    is_lin = len(meta_shape) == 2 and (name == "weight" or name.endswith(".weight")) and not EMBEDDING_NAME.search(name)
    return LINEAR if is_lin else OTHER


def classify(metas: Mapping[str, Any], folder: Path | None = None, project: Sequence[str] = (),
             no_project: Sequence[str] = (), *, strict: bool = False) -> Classification:
    """Kind of every tensor (``metas``: name → TensorMeta), the route that decided it, and notes.

    ``strict``: refuse (CmergeError) instead of falling back to the name rule when the
    architecture cannot be built from ``folder/config.json`` or does not place every one
    of its linear weights in the checkpoint.
    """
    arch, why = _build_architecture(Path(folder)) if folder is not None else (None, None)
    kinds: dict[str, str] = {}
    routes: dict[str, str] = {}
    notes: list[str] = []
    placed: set[str] = set()
    unplaced: list[str] = []
    for name, meta in metas.items():
        if not meta.dtype.is_floating_point:
            kinds[name], routes[name] = PASSTHROUGH, BY_DTYPE
            continue
        kind = arch.kind_of(name, len(meta.shape)) if arch is not None else None
        if kind is None:
            kinds[name], routes[name] = _by_name(name, tuple(meta.shape)), BY_NAME
            if arch is not None:
                unplaced.append(name)
        else:
            kinds[name], routes[name] = kind, BY_ARCHITECTURE
            placed.add(arch.to_param(name)[0])
    if why is not None:
        notes.append(f"linear weights were found by the name rule, because {why}.")
    if arch is not None:
        expected = arch.expected()
        found = len(expected & placed)
        by_name = sum(1 for n in unplaced if is_projected(kinds[n]))
        if found < len(expected):
            notes.append(f"matched {found} of {len(expected)} linear weights of {arch.name} by module; "
                         f"{by_name} classified by name instead.")
    if strict and notes:
        raise CmergeError(f"{notes[0].rstrip('.')}; --strict-layers refuses to merge with fewer linear weights than the "
                          f"architecture has (name them with --project, or drop --strict-layers).")
    for note in notes:
        log.warning(note)
    _apply_patterns(metas, kinds, routes, project, no_project)
    if arch is None:
        how = BY_NAME
    else:
        how = "architecture (config.json)" + (" + name rule" if unplaced else "")
    if project or no_project:
        how += " + user patterns"
    return Classification(kinds, routes, how, tuple(notes), arch.name if arch is not None else None)


def _apply_patterns(metas: Mapping[str, Any], kinds: dict[str, str], routes: dict[str, str],
                    project: Sequence[str], no_project: Sequence[str]) -> None:
    for pattern in project:
        rx = _compile(pattern, "--project")
        for name, meta in metas.items():
            if rx.search(name) and kinds[name] != PASSTHROUGH:
                if len(meta.shape) != 2:
                    raise CmergeError(f"--project {pattern!r} matches {name!r}, which is {len(meta.shape)}-D; "
                                      f"only 2-D weights can be projected.")
                if kinds[name] != LINEAR_T:
                    kinds[name] = LINEAR
                routes[name] = BY_USER
    for pattern in no_project:
        rx = _compile(pattern, "--no-project")
        for name in metas:
            if rx.search(name) and kinds[name] in PROJECTED:
                kinds[name], routes[name] = OTHER, BY_USER


def _compile(pattern: str, flag: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise CmergeError(f"{flag} {pattern!r} is not a valid regular expression ({exc}).") from None
