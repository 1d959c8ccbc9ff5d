"""The README.md cards written beside an exported merged model and a merged LoRA adapter."""
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
    return f"""{_front_matter(info['method'])}

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


def lora_card(info: Mapping[str, Any], ranks: Mapping[str, int], errors: Mapping[str, float],
              rank: int | None) -> str:
    rows = "\n".join(f"| `{n}` | {errors[n]:.3g} |" for n in sorted(errors))
    how = ("exact: every module at the numerical rank of its merged task vector" if rank is None else
           f"truncated to rank {rank} per module: the best rank-{rank} approximation (Eckart-Young) of each merged "
           f"task vector, with the relative Frobenius error below")
    return f"""{_front_matter(info['method'], library="peft")}

# Merged LoRA adapter ({info['method']})

The merged task vector of a continual merge made with cmerge, written as one LoRA adapter for
the base model `{info['base']['path']}` ({how}). Scaling is 1 for every module
(`lora_alpha` = `r`, per module through `rank_pattern` and `alpha_pattern`).

Merged inputs: {', '.join(s['name'] for s in info['steps'])}.

| tensor | relative error |
|---|---|
{rows}
"""


def _front_matter(method: str, library: str | None = None) -> str:
    lib = f"library_name: {library}\n" if library else ""
    return f"---\n{lib}tags:\n- merge\n- cmerge\n- continual-merging\n- {method}\n---"
