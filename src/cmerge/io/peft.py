"""PEFT LoRA adapters as inputs: the task vector an adapter stands for, one base tensor at a time.

A PEFT folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or the older
``adapter_model.bin``, read with ``weights_only=True``). For a linear module M with weight
W (out × in) it stores ``M.lora_A.weight`` (r × in) and ``M.lora_B.weight`` (out × r), and
the adapter moves W by (docs/methods.md, "LoRA adapters as inputs")

    ΔW = s · B A,   s = lora_alpha / r   (use_rslora: lora_alpha / √r)

with r and lora_alpha per module from ``rank_pattern`` / ``alpha_pattern`` where a pattern
matches its name (PEFT's rule: the pattern matches a dotted suffix of the module name).
``fan_in_fan_out`` (GPT-2's Conv1D, weight stored in × out) moves the stored weight by
(s B A)ᵀ; embedding LoRA (``lora_embedding_A`` r × vocab, ``lora_embedding_B`` dim × r)
moves the table by (s B A)ᵀ. DoRA (``use_dora``) rescales: W' = m ⊙ (W + ΔW) / ‖W + ΔW‖ with
the norm per output feature, so its task vector W' − W is dense. Whole tensors saved by the
adapter (``modules_to_save``, trained biases, a ``base_layer`` weight) replace the base's,
their task vector being their difference from it. Every other base tensor has τ = 0.

:class:`LoraSource` presents every tensor of the base model and yields these task vectors
(``delta``), as factors L Rᵀ where they are low rank, so a merge never materialises an
untouched tensor or a low-rank one unless its method needs it dense.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ..errors import CmergeError
from ..lowrank import LowRank
from .hashing import combine_digests, tensor_digest
from .sources import SafetensorsSource, TensorSource, torch_load

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."
#: config keys that change what the adapter computes in ways cmerge does not reproduce
UNSUPPORTED = ("layer_replication", "target_parameters", "trainable_token_indices", "lora_bias", "use_qalora",
               "use_bdlora", "megatron_config")
#: config keys that shape ΔW (part of the adapter's content hash)
SHAPING = ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "fan_in_fan_out", "use_dora")


def is_adapter(path: Path) -> bool:
    """A folder holding a PEFT adapter (its config or its weights file)."""
    return path.is_dir() and any((path / f).exists() for f in (ADAPTER_CONFIG, *ADAPTER_FILES))


def base_matches(made_for: str, base_path: Path) -> bool:
    """Whether an adapter's ``base_model_name_or_path`` names this base: its path, its folder name, or
    the ``_name_or_path`` its config.json records (a hub id such as ``Qwen/Qwen2.5-0.5B`` matches a
    local copy whose folder or config carries that id)."""
    base_path = Path(base_path)
    names = {str(base_path), base_path.name}
    cfg = base_path / "config.json" if base_path.is_dir() else None
    if cfg is not None and cfg.exists():
        try:
            names.add(str(json.loads(cfg.read_text()).get("_name_or_path") or ""))
        except (OSError, ValueError):
            pass
    made = made_for.rstrip("/")
    return made in names or Path(made).name == base_path.name or (Path(made).exists() and
                                                                  Path(made).resolve() == base_path.resolve())


def pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: the first key matching a dotted suffix of ``module``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


@dataclass
class LoraModule:
    """One adapted module: its factors and how they move the base tensor ``tensor``."""

    name: str                          # module name (as in the model)
    tensor: str                        # the base tensor it moves (checkpoint key)
    a: torch.Tensor | None = None      # lora_A (r × in) or lora_embedding_A (r × vocab)
    b: torch.Tensor | None = None      # lora_B (out × r) or lora_embedding_B (dim × r)
    embedding: bool = False
    magnitude: torch.Tensor | None = None  # DoRA's m
    scale: float = 1.0
    rank: int = 0
    transposed: bool = False           # the stored weight is ΔWᵀ's layout (fan_in_fan_out, embeddings)

    def factors(self) -> LowRank:
        """ΔW in the base tensor's stored layout, as L Rᵀ (float64)."""
        a, b = self.a.to(torch.float64), self.b.to(torch.float64)
        lr = LowRank(b * self.scale, a.mT)      # s B A: (out × r)(r × in)
        return lr.transposed() if self.transposed else lr


@dataclass
class LoraFactors:
    """One module's LoRA factors as trained: ΔW = scale · B A in the (out × in) layout, ``transposed`` if the
    stored weight is ΔWᵀ's layout (fan_in_fan_out, embeddings). For methods that merge A and B themselves."""

    a: torch.Tensor      # r × in
    b: torch.Tensor      # out × r
    scale: float
    transposed: bool

    def stored(self) -> LowRank:
        """B A (without the scale) as factors in the base tensor's stored layout."""
        lr = LowRank(self.b, self.a.mT)
        return lr.transposed() if self.transposed else lr

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    @classmethod
    def zeros(cls, shape: tuple[int, int], dtype: torch.dtype) -> "LoraFactors":
        """No change to a weight of ``shape`` (rank 0): what an adapter means for a weight it does not touch."""
        return cls(torch.zeros(0, shape[1], dtype=dtype), torch.zeros(shape[0], 0, dtype=dtype), 1.0, False)

    @staticmethod
    def unstore(lr: LowRank, transposed: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) back from factors in the stored layout (the inverse of :meth:`stored`)."""
        if transposed:
            lr = lr.transposed()
        return lr.right.mT, lr.left


@dataclass
class LoraAdapter:
    """A parsed PEFT adapter: its config, its adapted modules and the whole tensors it saved."""

    folder: Path
    config: dict[str, Any]
    modules: dict[str, LoraModule] = field(default_factory=dict)   # base tensor → module
    whole: dict[str, torch.Tensor] = field(default_factory=dict)   # base tensor → saved values
    digest: str = ""

    @property
    def base_id(self) -> str | None:
        return self.config.get("base_model_name_or_path") or None


def read_adapter(folder: Path, base: TensorSource,
                 resolve: Callable[[], Mapping[str, str]] | None = None) -> LoraAdapter:
    """Read and check a PEFT LoRA adapter for ``base``: one sentence for anything wrong.

    ``resolve()``: model parameter name → checkpoint key, for bases whose file keys differ
    from the module names (see ``layers.checkpoint_keys``); asked for only if a name is not
    a key of the base.
    """
    folder = Path(folder)
    config = _read_config(folder)
    tensors = _read_tensors(folder)
    desc = f"adapter {folder}"
    for key in UNSUPPORTED:
        if config.get(key):
            raise CmergeError(f"{desc} uses {key}, which cmerge does not support; merge it with peft's "
                              f"merge_and_unload() and add the full model instead.")
    if config.get("use_rslora") and config.get("use_dora"):
        pass  # both compose: DoRA rescales whatever ΔW the scaling gives
    keys = set(base.keys())
    mapping: dict[str, str] = {}

    def base_key(param: str) -> str | None:
        if param in keys:
            return param
        if resolve is not None and not mapping:
            mapping.update(resolve())
        return mapping.get(param)

    adapter = LoraAdapter(folder, config)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if not t.dtype.is_floating_point:
            raise CmergeError(f"{desc}: tensor {key!r} is not floating point.")
        if not bool(torch.isfinite(t).all()):
            raise CmergeError(f"{desc}: tensor {key!r} contains NaN or Inf.")
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        m = re.match(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)$",
                     name)
        if m:
            parts.setdefault(m.group(1), {})[m.group(2)] = t
            continue
        target = base_key(name.replace(".base_layer.", "."))
        if target is None:
            raise CmergeError(f"{desc} saves tensor {name!r}, which the base model does not have.")
        if tuple(t.shape) != base.meta(target).shape:
            raise CmergeError(f"{desc}: saved tensor {name!r} has shape {list(t.shape)} but the base's {target!r} "
                              f"has {list(base.meta(target).shape)}.")
        adapter.whole[target] = t
    for module, got in sorted(parts.items()):
        adapter_module = _module(desc, module, got, config, base, base_key)
        adapter.modules[adapter_module.tensor] = adapter_module
    if not adapter.modules and not adapter.whole:
        raise CmergeError(f"{desc} holds no LoRA weights.")
    shaping = {k: config.get(k) for k in SHAPING}
    digests = {k: tensor_digest(k, t) for k, t in tensors.items()}
    digests["__config__"] = json.dumps(shaping, sort_keys=True).encode()
    adapter.digest = combine_digests(digests)
    return adapter


def _module(desc: str, module: str, got: Mapping[str, torch.Tensor], config: Mapping[str, Any],
            base: TensorSource, base_key) -> LoraModule:
    embedding = "lora_embedding_A" in got or "lora_embedding_B" in got
    a = got.get("lora_embedding_A" if embedding else "lora_A.weight")
    b = got.get("lora_embedding_B" if embedding else "lora_B.weight")
    if a is None or b is None:
        have, miss = ("lora_A", "lora_B") if a is not None else ("lora_B", "lora_A")
        raise CmergeError(f"{desc}: module {module!r} has {have} but no {miss}.")
    if a.ndim != 2 or b.ndim != 2:
        raise CmergeError(f"{desc}: module {module!r} is a LoRA on a convolution ({a.ndim}-D factors), which cmerge "
                          f"does not support.")
    tensor = base_key(f"{module}.weight")
    if tensor is None:
        raise CmergeError(f"{desc} adapts module {module!r}, but the base model has no tensor {module + '.weight'!r}.")
    r = int(pattern_value(config.get("rank_pattern") or {}, module, config.get("r", 8)))
    alpha = float(pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", r)))
    if a.shape[0] != r or b.shape[1] != r:
        raise CmergeError(f"{desc}: module {module!r} has factors of rank {a.shape[0]} but adapter_config.json gives "
                          f"r = {r} for it.")
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    transposed = embedding or bool(config.get("fan_in_fan_out"))
    shape = base.meta(tensor).shape
    out_in = (b.shape[0], a.shape[1])
    want = out_in[::-1] if transposed else out_in
    if len(shape) != 2 or tuple(shape) != want:
        raise CmergeError(f"{desc} does not fit the base model: module {module!r} moves a {want[0]} × {want[1]} "
                          f"weight, but the base's {tensor!r} has shape {list(shape)}.")
    magnitude = got.get("lora_magnitude_vector")
    if magnitude is not None and magnitude.numel() != (want[1] if transposed else want[0]):
        raise CmergeError(f"{desc}: module {module!r} has a DoRA magnitude of {magnitude.numel()} values for a "
                          f"{want[0]} × {want[1]} weight.")
    return LoraModule(module, tensor, a, b, embedding, magnitude, scale, r, transposed)


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / ADAPTER_CONFIG
    if not path.exists():
        raise CmergeError(f"{folder} has adapter weights but no {ADAPTER_CONFIG}; cmerge needs it for each adapter's "
                          f"rank and scaling.")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CmergeError(f"{path} is not readable JSON ({exc}).") from None
    if not isinstance(config, dict):
        raise CmergeError(f"{path} is not a PEFT adapter config (a JSON object).")
    kind = config.get("peft_type", "LORA")
    if kind != "LORA":
        raise CmergeError(f"{folder} is a {kind} adapter; cmerge reads LoRA adapters (peft_type LORA, including "
                          f"rsLoRA and DoRA).")
    return config


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    for name in ADAPTER_FILES:
        path = folder / name
        if path.exists():
            if name.endswith(".safetensors"):
                src = SafetensorsSource([path], f"adapter weights {path}")
                return {k: src.get(k) for k in src.keys()}
            return torch_load(path)
    raise CmergeError(f"{folder} has no adapter weights ({' or '.join(ADAPTER_FILES)}).")


class LoraSource(TensorSource):
    """Every tensor of the base model, as the task vector a LoRA adapter stands for (see the module doc).

    ``delta(name, rows, dtype)`` is τ of one tensor: a ``LowRank`` (pure LoRA on a 2-D
    weight), a dense tensor (DoRA, whole tensors saved by the adapter), or None (τ = 0).
    """

    deltas = True

    def __init__(self, folder: Path, base: TensorSource) -> None:
        super().__init__()
        self.description = f"adapter {folder}"
        self.folder = Path(folder)
        self.base = base
        def resolve() -> Mapping[str, str]:  # module names are the model's; file keys may differ (transformers 5)
            from ..layers import checkpoint_keys

            return checkpoint_keys(base.keys(), base.folder) if base.folder is not None else {}

        self.adapter = read_adapter(self.folder, base, resolve)
        self._meta = {n: base.meta(n) for n in base.keys()}
        self.files = [self.folder / f for f in ADAPTER_FILES if (self.folder / f).exists()]

    def content_digest(self) -> str:
        """The adapter's own content hash (its tensors and the config that shapes ΔW)."""
        return self.adapter.digest

    def low_rank_width(self, name: str) -> int | None:
        """The rank of τ's factors if τ is exactly low rank without the base (0 for τ = 0), else None."""
        if name in self.adapter.whole:
            return None
        mod = self.adapter.modules.get(name)
        if mod is None:
            return 0 if len(self._meta[name].shape) == 2 else None
        return None if mod.magnitude is not None else mod.rank

    def lora_factors(self, name: str, dtype: torch.dtype) -> LoraFactors | None:
        """The factors of the module that moves tensor ``name`` (None where the adapter does not touch it)."""
        mod = self.adapter.modules.get(name)
        if mod is None:
            return None
        return LoraFactors(mod.a.to(dtype), mod.b.to(dtype), mod.scale, mod.transposed)

    def check_factors_only(self, method: str) -> None:
        """Refuse an adapter whose change is not A and B alone (DoRA, saved modules), for a method that merges
        the factors themselves."""
        for name, mod in self.adapter.modules.items():
            if mod.magnitude is not None:
                raise CmergeError(f"method {method} merges LoRA factors, but {self.description} is a DoRA adapter "
                                  f"(module {mod.name!r}); merge its ΔW with a method that takes task vectors.")
        if self.adapter.whole:
            first = sorted(self.adapter.whole)[0]
            raise CmergeError(f"method {method} merges LoRA factors, but {self.description} also saves whole tensor "
                              f"{first!r}; merge its ΔW with a method that takes task vectors.")

    def delta(self, name: str, rows: slice | None, dtype: torch.dtype,
              device: torch.device | str = "cpu") -> torch.Tensor | LowRank | None:
        mod = self.adapter.modules.get(name)
        whole = self.adapter.whole.get(name)
        if mod is None and whole is None:
            return None
        if whole is None and mod.magnitude is None:
            lr = mod.factors()
            return (lr if rows is None else LowRank(lr.left[rows], lr.right)).to(device, dtype)
        b = self.base.get(name, rows).to(torch.float64)
        w = whole.to(torch.float64)[rows if rows is not None else slice(None)] if whole is not None else b
        if mod is None:
            return (w - b).to(device, dtype)
        return (self._dora(mod, w, rows) - b).to(device, dtype)

    def _dora(self, mod: LoraModule, w: torch.Tensor, rows: slice | None) -> torch.Tensor:
        """W + ΔW, rescaled by DoRA's magnitude over the norm of each output feature when the module has one."""
        lr = mod.factors()
        if mod.magnitude is None:
            return w + lr.dense(rows)
        if rows is not None:  # the norm of an output feature may span every row: whole tensor, then the rows
            full = self.base.get(mod.tensor).to(torch.float64)
            whole = self.adapter.whole.get(mod.tensor)
            return self._dora(mod, whole.to(torch.float64) if whole is not None else full, None)[rows]
        total = w + lr.dense()
        norm = torch.linalg.vector_norm(total, dim=0 if mod.transposed else 1, keepdim=True)
        factor = mod.magnitude.to(torch.float64).reshape(norm.shape) / norm
        return factor * total

    def _read(self, name: str, rows: slice | None) -> torch.Tensor:
        d = self.delta(name, rows, torch.float32)
        meta = self._meta[name]
        if d is None:
            shape = meta.shape if rows is None else (rows.stop - rows.start, *meta.shape[1:])
            return torch.zeros(shape, dtype=torch.float32)
        return d.dense() if isinstance(d, LowRank) else d

