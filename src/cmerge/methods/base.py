"""What a continual merging method is: declared parameters, a per-tensor rule, a finalize.

Every method in cmerge is "a per-tensor rule plus a few global numbers" (docs/architecture.md):

    new_accumulators[name] = rule(base[name], accumulators[name], incoming[name])
    scalars = finalize(scalars, sums gathered while streaming, t)

The engine streams one tensor at a time through :meth:`Method.rule`, adds up the sums it
returns, and calls :meth:`Method.finalize` once at the end of the step. Rules are pure
functions of tensors and numbers: no I/O, no logging.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping

import torch

from ..errors import CmergeError
from ..lowrank import LowRank


TRUE_WORDS = ("true", "yes", "on", "1")
FALSE_WORDS = ("false", "no", "off", "0")


@dataclass(frozen=True)
class Param:
    """One hyper-parameter, declared once: the CLI flag ``--name-with-dashes``, the config key and
    the bench's ``NAME:key=value`` come from it, and :meth:`parse` is their one parser.

    ``minimum`` / ``maximum`` bound a number (``exclusive_minimum``: the bound itself is refused).
    """

    name: str
    type: type
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def parse(self, value: Any, method: str) -> Any:
        """``value`` (typed, or a string from a flag, a config file or a bench row) as this
        parameter's type, checked against its choices and bounds; one CmergeError if it is not."""
        if self.type is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
                return value.strip().lower() in TRUE_WORDS
            raise CmergeError(f"{method}: {self.name} must be true or false, got {value!r}.")
        if isinstance(value, bool) or (self.type is not str and isinstance(value, str) and not value.strip()):
            raise CmergeError(f"{method}: {self.name} must be a {self.type.__name__}, got {value!r}.")
        try:
            out = self.type(value)
        except (TypeError, ValueError):
            raise CmergeError(f"{method}: {self.name} must be a {self.type.__name__}, got {value!r}.") from None
        if self.type is float and not math.isfinite(out):
            raise CmergeError(f"{method}: {self.name} must be a finite number, got {value!r}.")
        if self.choices is not None and out not in self.choices:
            raise CmergeError(f"{method}: {self.name} must be one of {', '.join(self.choices)}, got {value!r}.")
        low_ok = self.minimum is None or (out > self.minimum if self.exclusive_minimum else out >= self.minimum)
        if not low_ok or (self.maximum is not None and out > self.maximum):
            raise CmergeError(f"{method}: {self.name} must be {self.range_text()}, got {value!r}.")
        return out

    def range_text(self) -> str:
        """The allowed range in words, e.g. "in (0, 1]" or "≥ 0"."""
        if self.minimum is not None and self.maximum is not None:
            return f"in {'(' if self.exclusive_minimum else '['}{self.minimum:g}, {self.maximum:g}]"
        if self.minimum is not None:
            return f"{'>' if self.exclusive_minimum else '≥'} {self.minimum:g}"
        return f"≤ {self.maximum:g}" if self.maximum is not None else "any number"


class TensorStep:
    """What the rule sees for one tensor (or one block of its rows) at step ``t`` (1-based), in the compute dtype.

    ``base`` is the base tensor θ0 of this tensor; given as ``load_base`` (a function), it is
    read and converted only if the rule asks for it (most rules need only τ).
    ``tau_owned``: ``tau`` is a fresh tensor that nothing reads after the rule, so the rule
    may overwrite it (the engine's steps); False: every tensor of the step is read-only.
    """

    def __init__(self, name: str, t: int, tau: torch.Tensor, acc: Mapping[str, torch.Tensor],
                 scalars: Mapping[str, Any], projected: bool, base: torch.Tensor | None = None, *,
                 load_base: Callable[[], torch.Tensor] | None = None,
                 extra: Mapping[str, torch.Tensor] | None = None,
                 extra_meta: Mapping[str, Mapping[str, str]] | None = None, tau_owned: bool = False) -> None:
        if base is None and load_base is None:
            raise ValueError("a TensorStep needs its base tensor or a function that loads it")
        self.name, self.t, self.tau, self.acc, self.scalars = name, t, tau, acc, scalars
        self.projected = projected              # a linear-layer weight (see layers.py)
        self.extra = extra or {}                # e.g. second moments
        self.extra_meta = extra_meta or {}      # their files' metadata
        self.tau_owned = tau_owned
        self._base, self._load_base = base, load_base

    @property
    def base(self) -> torch.Tensor:
        if self._base is None:
            self._base = self._load_base()  # type: ignore[misc]
        return self._base


@dataclass
class TensorUpdate:
    """The rule's answer: new accumulators, numbers to sum over tensors, per-tensor notes."""

    acc: dict[str, torch.Tensor]
    sums: dict[str, float] = field(default_factory=dict)
    note: Any = None  # e.g. OPCM's protected rank for this weight, kept in the step log


class Method:
    """Base class of the registry's methods; subclasses declare the ClassVars and three functions."""

    name: ClassVar[str]
    summary: ClassVar[str]
    params: ClassVar[tuple[Param, ...]] = ()
    accumulators: ClassVar[tuple[str, ...]]
    # per-tensor inputs besides the model, e.g. {"fisher": "exp_avg_sq.safetensors"}: the key names the
    # input (CLI flag --<key>), the value is the file looked for beside a model folder when none is given
    extra_inputs: ClassVar[Mapping[str, str]] = {}
    # the rule takes low-rank task vectors and accumulators as factors (``lowrank.LowRank``) and keeps
    # them factored, exactly: a merge of LoRA adapters then stores O((m + n)·Σ r) per weight, not m·n
    factored: ClassVar[bool] = False
    # "weights": the rule merges task vectors (θ_t − θ0, or ΔW of an adapter); "lora": it merges LoRA adapters'
    # factors A and B themselves (its inputs must be LoRA adapters; s.tau is an io.peft.LoraFactors or None)
    space: ClassVar[str] = "weights"

    def __init__(self, **params: Any) -> None:
        self.p = {**{p.name: p.default for p in self.params}, **self.parse_params(params)}
        self.validate()

    @classmethod
    def parse_params(cls, given: Mapping[str, Any]) -> dict[str, Any]:
        """The one parameter parser: names checked against the declaration, values (typed or
        strings) converted and range-checked by :meth:`Param.parse`; None means "not given"."""
        known = {p.name: p for p in cls.params}
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise CmergeError(f"method {cls.name!r} has no parameter {unknown[0]!r}"
                              f" (it takes: {', '.join(known) or 'none'}).")
        return {n: known[n].parse(v, cls.name) for n, v in given.items() if v is not None}

    def validate(self) -> None:
        """Check parameter values beyond their type; raise CmergeError naming the parameter."""

    def initial_scalars(self) -> dict[str, Any]:
        return {}

    def factor_width(self, previous: int | None, incoming: int) -> int:
        """The width of a factored accumulator after a step: the factors of the previous one stacked with the
        incoming ones (None: the first step)."""
        return incoming if previous is None else previous + incoming

    def accumulators_of(self, projected: bool) -> tuple[str, ...]:
        """The accumulators one tensor keeps (``projected``: a linear-layer weight): ``accumulators``,
        or fewer for a method whose extra accumulators serve only one kind of tensor. The rule returns,
        and the state stores and hands back, exactly these for that tensor."""
        return self.accumulators

    def elementwise(self, projected: bool) -> bool:
        """Whether :meth:`rule` acts element by element on a tensor of this kind (``projected``:
        a linear-layer weight), with sums that add up over elements.

        This is the one switch of row-block streaming: the engine then takes a large tensor
        through the rule in blocks of rows, so a step never holds it whole. The default,
        False, always gives the rule whole tensors (needed by e.g. an SVD or a per-tensor
        magnitude threshold). :meth:`merged` must always be element-wise (exports stream).
        """
        return False

    def rule(self, s: TensorStep) -> TensorUpdate:  # pragma: no cover - abstract
        """New accumulators for one tensor. Must not modify the tensors of ``s`` in place, except
        ``s.tau`` when ``s.tau_owned``."""
        raise NotImplementedError

    def finalize(self, scalars: Mapping[str, Any], sums: Mapping[str, float], t: int) -> dict[str, Any]:
        """Global numbers after step ``t`` from the previous ones and the streamed sums."""
        return dict(scalars)

    def merged(self, base: torch.Tensor, acc: Mapping[str, torch.Tensor], scalars: Mapping[str, Any], *,
               name: str = "") -> torch.Tensor:
        """θ_merged for one tensor (or block of rows) from the base tensor and the accumulators, element by element
        (``name``: the tensor's, for methods whose global numbers hold something per tensor)."""
        raise NotImplementedError  # pragma: no cover

    def merged_delta(self, acc: Mapping[str, Any], scalars: Mapping[str, Any], *, name: str = "") -> Any:
        """θ_merged − θ0 for one tensor: ``merged`` at a zero base (exactly, no subtraction); a method
        that keeps factors (``factored``) returns factors for factored accumulators."""
        first = next(iter(acc.values()))
        return self.merged(torch.zeros_like(first), acc, scalars, name=name)

    def unmerge(self, base: torch.Tensor, merged: torch.Tensor, acc: Mapping[str, torch.Tensor],
                scalars: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """All accumulators of one tensor such that ``self.merged(base, result, scalars)`` is ``merged``.

        The inverse of :meth:`merged`, for post-merge corrections (e.g. representation
        alignment) that replace a few merged tensors: the next step then continues from the
        corrected model. Accumulators that do not hold the merged model (e.g. fisher_merge's
        F̄) are returned unchanged, and so are the global ``scalars`` (not returned).
        """
        raise CmergeError(f"method {self.name!r} cannot take a corrected merged model.")

    def step_summary(self, scalars: Mapping[str, Any]) -> dict[str, Any]:
        """Numbers worth showing in the step log (e.g. λ_t)."""
        return {}


class DeltaMethod(Method):
    """A method whose one accumulator is the merged task vector, M = θ_merged − θ0 (scaled by ``merged_scale``).

    Average, task arithmetic, TIES, EMA and MagMax are all this shape; only their rules
    differ. ``merged_scale``: θ_merged = θ0 + scale·M (MagMax keeps τ_max and scales it).
    """

    accumulators: ClassVar[tuple[str, ...]] = ("M",)

    def elementwise(self, projected: bool) -> bool:
        return True  # element by element, unless a subclass says otherwise

    def merged_scale(self) -> float:
        return 1.0

    def merged(self, base: torch.Tensor, acc: Mapping[str, torch.Tensor], scalars: Mapping[str, Any], *,
               name: str = "") -> torch.Tensor:
        scale = self.merged_scale()
        return base + acc["M"] if scale == 1.0 else base + scale * acc["M"]

    def merged_delta(self, acc: Mapping[str, Any], scalars: Mapping[str, Any], *, name: str = "") -> Any:
        m, scale = acc["M"], self.merged_scale()
        if scale == 1.0:
            return m
        return m.scaled(scale) if isinstance(m, LowRank) else scale * m

    def unmerge(self, base: torch.Tensor, merged: torch.Tensor, acc: Mapping[str, torch.Tensor],
                scalars: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        scale = self.merged_scale()
        if scale == 0:
            raise CmergeError(f"{self.name} with scale 0 always returns the base model, so it cannot take a corrected "
                              f"merged model.")
        return {"M": merged - base if scale == 1.0 else (merged - base) / scale}


def sq_norm(x: torch.Tensor, chunk: int = 1 << 22) -> float:
    """‖x‖² accumulated in float64, in chunks so no float64 copy of a large tensor is made.

    On the CPU every chunk is converted into one float64 buffer kept per thread (same
    values, and the same 64-byte-aligned start as a fresh chunk, so the same ``torch.dot``
    result bit for bit): a fresh buffer per chunk cost page faults and page zeroing that
    took longer than the products themselves.
    """
    flat = x.reshape(-1)
    n = flat.numel()
    if n == 0:
        return 0.0
    buf = None if flat.dtype == torch.float64 else _f64_buffer(min(n, chunk), flat.device)
    total = 0.0
    for i in range(0, n, chunk):
        src = flat[i:i + chunk]
        if buf is None:
            part = src
        else:
            part = buf[:src.numel()]
            part.copy_(src)
        total += float(torch.dot(part, part))
    return total


_F64 = threading.local()


def _f64_buffer(n: int, device: torch.device) -> torch.Tensor:
    """A float64 scratch buffer of at least ``n`` elements (kept per thread on the CPU)."""
    if device.type != "cpu":
        return torch.empty(n, dtype=torch.float64, device=device)  # CUDA's caching allocator reuses memory
    buf = getattr(_F64, "buf", None)
    if buf is None or buf.numel() < n:
        buf = _F64.buf = torch.empty(max(n, 1 << 22), dtype=torch.float64)
    return buf
