"""The results document: one JSON object holding every order, every matrix and every summary.

Shape (all accuracies in percent)::

    {"tasks": [task, ...],
     "reference": {"pretrained": {task: acc}, "finetuned": {task: acc}},
     "methods": {NAME: {"method": registry_name, "params": {...},
                        "orders": [[task, ...], ...],        # one per run
                        "matrices": [[[acc, ...], ...], ...],  # one ragged lower-triangular matrix per order
                        "acc_mean", "acc_std", "bwt_mean", "bwt_std", ...   # metrics.summarize
                        ...diagnostics}},                   # lambdas, task_norms, merged_norms, loss_matrices
     "sweeps": {NAME: {...}},                                # sweep.sweep_entry, optional
     "paired": {"reference": NAME, "rows": {NAME: {...}}},   # paired_comparisons, derived from the matrices
     "similarity": {"tasks": [...], "matrix": [[...]]},      # optional
     "seed": int, "std_ddof": 0}

A row or sweep may say which split of the tasks its numbers come from (``"split"``:
``"test"`` for the rows a suite reports, ``"validation"`` for the sweeps that choose a
parameter); the text suite records both.

NaN is written as JSON ``null`` and read back as ``None``; metrics read ``None`` as NaN.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from cmerge.errors import CmergeError
from cmerge.evaluation.metrics import STD_DDOF, check_matrix, paired_difference, summarize
from cmerge.fsutil import atomic_write

DEFAULT_PAIRED_REFERENCE = "opcm"
PAIRED_CONFIDENCE = 0.95
PAIRED_INTERVAL = ("Student-t confidence interval of the mean per-order difference of ACC "
                   "(sample standard deviation, n - 1 degrees of freedom, orders as the random draws)")


def method_entry(
    matrices: Sequence[Sequence[Sequence[float]]],
    orders: Sequence[Sequence[str]],
    method: str | None = None,
    params: Mapping[str, Any] | None = None,
    **diagnostics: Any,
) -> dict:
    """A method's entry from its accuracy matrices (percent) and the task order of each.

    Use it for rows produced outside the runner too (e.g. continual fine-tuning by a
    trainer). Extra keyword arguments are stored as they are (per-order diagnostics).
    """
    if len(matrices) != len(orders):
        raise ValueError(f"{len(matrices)} accuracy matrices but {len(orders)} task orders; give one matrix per order")
    for k, (matrix, order) in enumerate(zip(matrices, orders)):
        check_matrix(matrix)
        if len(matrix) != len(order):
            raise ValueError(f"order {k} names {len(order)} tasks but its accuracy matrix has {len(matrix)} rows")
    entry = {
        "method": method,
        "params": dict(params or {}),
        "orders": [list(o) for o in orders],
        "matrices": [[[_number(v) for v in row] for row in m] for m in matrices],
    }
    entry.update(summarize(matrices, orders))
    entry.update(diagnostics)
    return entry


def extend_entry(entry: dict, more: dict) -> dict:
    """``entry`` (one row) run on further orders: ``more``'s orders appended, the summaries recomputed.

    A per-order value is a list with one item per order in both entries (``orders``,
    ``matrices``, ``loss_matrices``, ``task_norms``, ...): those are concatenated. Every other
    stored value (method, params, scored rows, split, ...) must agree, since a row is one
    method with one setting; a CmergeError names the first that does not.
    """
    n_old, n_new = len(entry["orders"]), len(more["orders"])
    if set(entry) != set(more):
        key = sorted(set(entry) ^ set(more))[0]
        raise CmergeError(f"cannot extend a row with a run that {'lacks' if key in entry else 'adds'} {key!r}.")
    orders = [*entry["orders"], *more["orders"]]
    matrices = [*entry["matrices"], *more["matrices"]]
    summary = summarize(matrices, orders)
    extended = {}
    for key, value in entry.items():
        other = more[key]
        if key in summary:
            continue
        per_order = (isinstance(value, list) and isinstance(other, list) and len(value) == n_old
                     and len(other) == n_new)
        if per_order:
            extended[key] = [*value, *other]
        elif to_jsonable(value) == to_jsonable(other):
            extended[key] = value
        else:
            raise CmergeError(f"cannot extend a row with a run whose {key!r} differs ({value!r} against {other!r}).")
    extended.update(summary)
    return extended


def new_results(
    tasks: Sequence[str],
    reference: Mapping[str, Mapping[str, float]] | None = None,
    methods: Mapping[str, dict] | None = None,
    **extra: Any,
) -> dict:
    """An empty (or pre-filled) results document over ``tasks``."""
    return {
        "tasks": list(tasks),
        "reference": {k: dict(v) for k, v in (reference or {}).items()},
        "methods": dict(methods or {}),
        "sweeps": {},
        "std_ddof": STD_DDOF,
        **extra,
    }


def add_method(results: dict, name: str, entry: dict) -> dict:
    """Put ``entry`` under ``results["methods"][name]``; refuses to overwrite an existing name."""
    if name in results["methods"]:
        raise ValueError(f"results already hold a method named {name!r}; pick another name")
    unknown = {t for o in entry["orders"] for t in o} - set(results["tasks"])
    if unknown:
        raise ValueError(f"method {name!r} was run on task {sorted(unknown)[0]!r}, which the results do not list")
    results["methods"][name] = entry
    return results


def add_sweep(results: dict, sweep: dict, name: str | None = None) -> dict:
    """Put a sweep (see ``sweep.sweep_entry``) under ``results["sweeps"]``, named ``method.param`` by default."""
    name = name or f"{sweep['method']}.{sweep['param']}"
    if name in results.setdefault("sweeps", {}):
        raise ValueError(f"results already hold a sweep named {name!r}; pick another name")
    results["sweeps"][name] = sweep
    return results


def combine_results(*parts: dict) -> dict:
    """One document from several over the same tasks: methods and sweeps united, first reference kept."""
    if not parts:
        raise ValueError("combine_results needs at least one results document")
    combined = json.loads(json.dumps(to_jsonable(parts[0])))
    for part in parts[1:]:
        if list(part["tasks"]) != combined["tasks"]:
            raise ValueError("results over different task lists cannot be combined")
        for kind, row in part.get("reference", {}).items():
            if not combined["reference"].get(kind) and row:
                combined["reference"][kind] = dict(row)
        for name, entry in part["methods"].items():
            add_method(combined, name, entry)
        for name, sweep in part.get("sweeps", {}).items():
            add_sweep(combined, sweep, name)
        if "similarity" in part and "similarity" not in combined:
            combined["similarity"] = part["similarity"]
    return combined


def validate_results(results: Any) -> dict:
    """Check the document's shape; raise CmergeError with one sentence naming the first problem."""
    if not isinstance(results, dict) or not isinstance(results.get("methods"), dict):
        raise CmergeError("a results document is a JSON object with a 'tasks' list and a 'methods' object.")
    if not isinstance(results.get("tasks"), list):
        raise CmergeError("the results document has no 'tasks' list.")
    tasks = set(results["tasks"])
    for name, entry in results["methods"].items():
        if not isinstance(entry, dict):
            raise CmergeError(f"method {name!r} is not a JSON object.")
        for key in ("orders", "matrices"):
            if key not in entry:
                raise CmergeError(f"method {name!r} has no {key!r}.")
        try:
            method_entry(entry["matrices"], entry["orders"])
        except (ValueError, TypeError) as err:
            raise CmergeError(f"method {name!r}: {err}.") from None
        unknown = {t for o in entry["orders"] for t in o} - tasks
        if unknown:
            raise CmergeError(f"method {name!r} names task {sorted(unknown)[0]!r}, which 'tasks' does not list.")
    for name, sweep in results.get("sweeps", {}).items():
        if len(sweep.get("values", [])) != len(sweep.get("entries", [])):
            raise CmergeError(f"sweep {name!r} needs one entry per value.")
    return results


def refresh_summaries(results: dict, paired_reference: str | None = None) -> dict:
    """Recompute every method's metrics and the paired comparisons from the matrices (the source of truth).

    ``paired_reference`` is the row every other row is compared with; default: the one the
    document names already, else ``opcm``. A reference the document lacks leaves
    ``paired`` out (or raises, when asked for by name).
    """
    for entry in results["methods"].values():
        entry.update(summarize(entry["matrices"], entry["orders"]))
    asked = paired_reference
    reference = asked or (results.get("paired") or {}).get("reference") or DEFAULT_PAIRED_REFERENCE
    if reference in results["methods"]:
        results["paired"] = paired_comparisons(results, reference)
    elif asked is not None:
        raise CmergeError(f"there is no row {asked!r} to compare with; the rows are {', '.join(results['methods'])}.")
    else:
        results.pop("paired", None)
    return results


def paired_comparisons(results: dict, reference: str = DEFAULT_PAIRED_REFERENCE,
                       confidence: float = PAIRED_CONFIDENCE) -> dict:
    """Every row against ``reference``, order by order: ACC(row) − ACC(reference) on each shared order.

    Orders are matched by their task sequence (the k-th run of a sequence with the k-th run
    of the same sequence), so a row run on fewer orders (e.g. continual fine-tuning on the
    first four) is compared on those. Per row: ``orders`` (how many were shared), ``diff``
    (one per shared order, in the row's order) and the summary of
    ``metrics.paired_difference``.
    """
    ref = results["methods"][reference]
    ref_acc: dict[tuple, list[float]] = {}
    for order, acc in zip(ref["orders"], _accs(ref)):
        ref_acc.setdefault(tuple(order), []).append(acc)
    rows = {}
    for name, entry in results["methods"].items():
        if name == reference:
            continue
        seen: dict[tuple, int] = {}
        pairs = []
        for order, acc in zip(entry["orders"], _accs(entry)):
            key = tuple(order)
            k = seen[key] = seen.get(key, -1) + 1
            if k < len(ref_acc.get(key, ())):
                pairs.append((acc, ref_acc[key][k]))
        if not pairs:
            continue
        mine, theirs = zip(*pairs)
        rows[name] = {"orders": len(pairs), **paired_difference(mine, theirs, confidence)}
    return {"reference": reference, "metric": "acc", "confidence": confidence,
            "interval": f"{confidence:.0%} {PAIRED_INTERVAL}", "rows": rows}


def _accs(entry: dict) -> list[float]:
    return summarize(entry["matrices"], entry["orders"])["acc"]


def to_jsonable(obj: Any) -> Any:
    """Plain JSON values: NaN and ±inf become None, numpy scalars and arrays become numbers and lists."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return _number(obj)
    return obj


def dumps(obj: Any, indent: int = 0) -> str:
    """Indented JSON in which each innermost list (a matrix row, an order) stays on one line."""
    pad, inner = " " * indent, " " * (indent + 1)
    if isinstance(obj, dict) and obj:
        items = [f"{inner}{json.dumps(str(k), ensure_ascii=False)}: {dumps(v, indent + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        return "[\n" + ",\n".join(inner + dumps(v, indent + 1) for v in obj) + "\n" + pad + "]"
    return json.dumps(obj, allow_nan=False, ensure_ascii=False)


def save_results(results: dict, path: str | Path) -> Path:
    """Write the document as JSON (NaN as null), one matrix row per line; atomically (``fsutil.atomic_write``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, dumps(to_jsonable(results)) + "\n")
    return path


def load_results(path: str | Path) -> dict:
    """Read and validate a results document written by ``save_results`` (or by hand in the same shape)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise CmergeError(f"cannot read results file {str(path)!r}: {err.strerror or err}.") from None
    except json.JSONDecodeError as err:
        raise CmergeError(f"{str(path)!r} is not valid JSON ({err.msg} at line {err.lineno}).") from None
    return validate_results(data)


def _number(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None
