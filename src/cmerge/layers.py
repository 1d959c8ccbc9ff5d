"""Which tensors are linear-layer weights (projected by OPCM) and which are not.

OPCM projects only the weight matrices of linear layers (paper Sec. 4; the reference finds
them by module type). Token and position embeddings are 2-D too but are ``nn.Embedding``
and use the identity, so a name-only rule is a fallback, not the first choice:

1. When the model folder has a transformers ``config.json`` and transformers is installed,
   the architecture is built on the meta device (no memory, no download) and the weights
   of ``nn.Linear`` modules — and transformers' ``Conv1D``, which stores the transposed
   matrix — are the linear weights.
2. Otherwise: 2-D tensors named ``*.weight`` whose names do not look like embeddings.
3. ``project`` / ``no_project`` regular expressions override both (``no_project`` wins).

Non-floating tensors (integer buffers such as position ids) are passed through unchanged.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Mapping, Sequence

import torch

from .checkpoint import TensorMeta
from .errors import CmergeError

LINEAR = "linear"            # projected (nn.Linear weight, or a 2-D weight by the name rule)
LINEAR_T = "linear_t"        # projected; transformers Conv1D (in x out layout; SVD is transpose-invariant)
OTHER = "other"              # identity rule: biases, norms, embeddings, convolutions, ...
PASSTHROUGH = "passthrough"  # non-floating tensor: copied from the base, never merged

PROJECTED = (LINEAR, LINEAR_T)
EMBEDDING_NAME = re.compile(r"(embed|wte|wpe|tok_embeddings|position|token_type|shared\.weight|lm_head|class_embedding)", re.I)


def is_projected(kind: str) -> bool:
    return kind in PROJECTED


def _linear_weight_names_from_config(folder: Path) -> tuple[set[str], set[str], str] | None:
    """Build the architecture on the meta device and list its Linear / Conv1D weight names."""
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        return None
    try:
        import transformers
        from transformers import AutoConfig
    except ImportError:
        return None
    try:
        cfg_json = json.loads(cfg_path.read_text())
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        arch = (cfg_json.get("architectures") or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        with torch.device("meta"):
            if cls is not None:
                model = cls(config)
            else:
                model = transformers.AutoModel.from_config(config)
    except Exception:
        return None
    conv1d = getattr(getattr(transformers, "pytorch_utils", None), "Conv1D", None)
    linear, linear_t = set(), set()
    for mod_name, mod in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if conv1d is not None and isinstance(mod, conv1d):
            linear_t.add(prefix + "weight")
        elif isinstance(mod, torch.nn.Linear):
            linear.add(prefix + "weight")
    return linear, linear_t, getattr(model, "base_model_prefix", "") or ""


def _lookup(name: str, names: set[str], prefix: str) -> bool:
    if name in names:
        return True
    if prefix and f"{prefix}.{name}" in names:
        return True
    return bool(prefix) and name.startswith(prefix + ".") and name[len(prefix) + 1:] in names


def classify(metas: Mapping[str, TensorMeta], folder: Path | None = None,
             project: Sequence[str] = (), no_project: Sequence[str] = ()) -> tuple[dict[str, str], str]:
    """Kind of every tensor, and a word on how it was decided ("architecture" or "name rule")."""
    found = _linear_weight_names_from_config(Path(folder)) if folder is not None else None
    kinds: dict[str, str] = {}
    for name, meta in metas.items():
        if not meta.dtype.is_floating_point:
            kinds[name] = PASSTHROUGH
        elif found is not None:
            linear, linear_t, prefix = found
            if len(meta.shape) == 2 and _lookup(name, linear_t, prefix):
                kinds[name] = LINEAR_T
            elif len(meta.shape) == 2 and _lookup(name, linear, prefix):
                kinds[name] = LINEAR
            else:
                kinds[name] = OTHER
        else:
            is_lin = len(meta.shape) == 2 and (name == "weight" or name.endswith(".weight")) \
                and not EMBEDDING_NAME.search(name)
            kinds[name] = LINEAR if is_lin else OTHER
    for pattern in project:
        rx = _compile(pattern, "--project")
        for name, meta in metas.items():
            if rx.search(name) and kinds[name] != PASSTHROUGH:
                if len(meta.shape) != 2:
                    raise CmergeError(f"--project {pattern!r} matches {name!r}, which is {len(meta.shape)}-D; only 2-D weights can be projected.")
                kinds[name] = LINEAR
    for pattern in no_project:
        rx = _compile(pattern, "--no-project")
        for name in metas:
            if rx.search(name) and kinds[name] in PROJECTED:
                kinds[name] = OTHER
    how = "architecture (config.json)" if found is not None else "name rule"
    if project or no_project:
        how += " + user patterns"
    return kinds, how


def _compile(pattern: str, flag: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise CmergeError(f"{flag} {pattern!r} is not a valid regular expression ({exc}).") from None
