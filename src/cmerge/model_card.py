"""The README.md model card written beside an exported merged model."""
from __future__ import annotations

from typing import Any, Mapping

from . import __version__


def model_card(info: Mapping[str, Any], dtype: str) -> str:
    """Markdown naming the method, its parameters and every merged input with its content hash."""
    params = "\n".join(f"| `{k}` | `{v}` |" for k, v in info["params"].items()) or "| (none) | |"
    rows = []
    for s in info["steps"]:
        lam = f"{s['lambda']:.4f}" if s.get("lambda") is not None else "–"
        rows.append(f"| {s['t']} | {s['name']} | `{s['sha256']}` | {s['norm']:.4f} | {lam} |")
    projected = "\n".join(f"- `{n}`" for n in info.get("projected", [])) or "- (none)"
    return f"""---
tags:
- merge
- cmerge
- continual-merging
- {info['method']}
---

# Merged model ({info['method']})

Made with cmerge {__version__} by continual merging: the
experts below were folded into the base model one at a time, in this order.

- Method: `{info['method']}`
- Base model: `{info['base']['path']}` (sha256 `{info['base']['sha256']}`)
- Compute precision: {info['precision']}; exported dtype: {dtype}
- Tensors: {info['summary']} (classified by {info['base']['classified_by']})

## Parameters

| parameter | value |
|---|---|
{params}

## Merged inputs

| step | name | sha256 | ‖τ‖ | λ_t |
|---|---|---|---|---|
{chr(10).join(rows)}

## Projected tensors

The linear-layer weights that the method's projection acted on; every other tensor used the
identity rule (or was passed through unchanged if it is not floating point).

<details><summary>{len(info.get("projected", []))} tensors</summary>

{projected}

</details>
"""
