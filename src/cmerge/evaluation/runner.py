"""The continual protocol: merge experts one at a time, evaluate after every step.

For each task order, a fresh in-memory merge state takes the experts in that order;
after step t the merged model is scored on the t + 1 tasks of the order seen so far,
giving row t of that order's accuracy matrix (metrics.py). Reference rows are the
pre-trained model on every task and each expert on its own task (the upper bound).
Per step the runner also records λ_t (OPCM), ‖τ_t‖ and ‖θ_merged − θ0‖.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import torch
from tqdm import tqdm

from cmerge.io import open_source
from cmerge.merger import Merger
from cmerge.errors import CmergeError
from cmerge.evaluation.orders import check_orders, shuffled_orders
from cmerge.evaluation.protocol import Evaluator
from cmerge.evaluation.results import add_method, method_entry, new_results
from cmerge.evaluation.similarity import cosine_similarity_matrix, delta_norm


def materialize(model: Any, description: str = "model") -> dict[str, torch.Tensor]:
    """A state dict for the evaluator from a state dict, an ``nn.Module`` or a path."""
    source = open_source(model, description)
    return {name: source.get(name) for name in source.keys()}


def score(evaluator: Evaluator, model: Mapping[str, torch.Tensor], tasks: Sequence[str]) -> tuple[list[float], list[float]]:
    """Accuracies (percent) and losses of ``model`` on ``tasks``, in that order, checked."""
    results = evaluator.evaluate(model, list(tasks))
    accs, losses = [], []
    for task in tasks:
        if task not in results:
            raise CmergeError(f"the evaluator returned no result for task {task!r}.")
        result = results[task]
        if not hasattr(result, "accuracy"):
            raise CmergeError(f"the evaluator returned a {type(result).__name__} for task {task!r}; return a TaskResult.")
        acc = float(result.accuracy)
        if not (0.0 <= acc <= 1.0 or math.isnan(acc)):
            raise CmergeError(
                f"the evaluator returned accuracy {acc} for task {task!r}; TaskResult.accuracy is a fraction in [0, 1]."
            )
        accs.append(100.0 * acc)
        losses.append(float(getattr(result, "loss", math.nan)))
    return accs, losses


def evaluate_reference(base: Any, experts: Mapping[str, Any], evaluator: Evaluator) -> dict[str, dict[str, float]]:
    """Reference rows: the pre-trained model on every task, each expert on its own task (percent)."""
    tasks = list(experts)
    pretrained, _ = score(evaluator, materialize(base, "the base model"), tasks)
    finetuned = {}
    for task, model in experts.items():
        finetuned[task] = score(evaluator, materialize(model, f"expert {task!r}"), [task])[0][0]
    return {"pretrained": dict(zip(tasks, pretrained)), "finetuned": finetuned}


def similarity_block(base: Any, experts: Mapping[str, Any]) -> dict:
    """The results document's ``similarity`` entry: cosine similarity of every expert's task vector."""
    tasks = list(experts)
    matrix = cosine_similarity_matrix(base, [experts[t] for t in tasks], labels=[f"expert {t!r}" for t in tasks])
    return {"tasks": tasks, "matrix": matrix.tolist()}


def _progress(total: int, desc: str, progress: bool | tqdm):
    if isinstance(progress, tqdm):
        return progress
    return tqdm(total=total, desc=desc, unit="step", disable=not progress, leave=False)


def _step_field(step: Any, key: str) -> Any:
    value = step.get(key) if isinstance(step, Mapping) else getattr(step, key, None)
    return None if value is None else float(value)


PostStep = Callable[[Merger, int, str, "dict[str, torch.Tensor] | None"], "Mapping[str, Any] | None"]
ROWS = ("all", "diagonal+final")


def run_order(
    method: str, params: Mapping[str, Any], base: Any, experts: Mapping[str, Any], evaluator: Evaluator,
    order: Sequence[str], bar=None, *, post_step: PostStep | None = None, rows: str = "all",
    base_tensors: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, list]:
    """One order: merge step by step in memory; return its accuracy/loss matrices and per-step diagnostics.

    ``post_step(merger, t, task, previous)`` runs after step t's merge and before its
    evaluation, with ``previous`` the merged state dict of step t − 1 (None at t = 1); it
    may correct the merged model with ``merger.override`` (post-merge alignment) and may
    return a dict of numbers, recorded per step. ``rows="diagonal+final"`` scores only
    what ACC and BWT need (the new task after each step, every task after the last; the
    other entries are NaN), for sweeps. ``base_tensors`` is the base already in memory
    (``materialize(base)``), so that ‖θ_merged − θ0‖ does not read it again at every step.
    """
    if rows not in ROWS:
        raise CmergeError(f"rows must be one of {', '.join(ROWS)}, got {rows!r}.")
    merger = Merger(base, method=method, **dict(params))
    record: dict[str, list] = {"matrix": [], "losses": [], "lambdas": [], "task_norms": [], "merged_norms": [],
                               "post_step": []}
    previous = None
    for t, task in enumerate(order):
        step = merger.add(experts[task], name=task)
        if post_step is not None:
            record["post_step"].append(post_step(merger, t + 1, task, previous))
        merged = merger.state_dict()
        seen = order[: t + 1]
        chosen = seen if rows == "all" or t == len(order) - 1 else [task]
        accs, losses = score(evaluator, merged, chosen)
        by_task = dict(zip(chosen, zip(accs, losses)))
        record["matrix"].append([by_task[name][0] if name in by_task else math.nan for name in seen])
        record["losses"].append([by_task[name][1] if name in by_task else math.nan for name in seen])
        record["lambdas"].append(_step_field(step, "lambda"))
        record["task_norms"].append(_step_field(step, "norm"))
        record["merged_norms"].append(delta_norm(merged, base if base_tensors is None else base_tensors))
        previous = merged if post_step is not None else None
        if bar is not None:
            bar.update(1)
    return record


def run_method(
    method: str, params: Mapping[str, Any] | None, base: Any, experts: Mapping[str, Any], evaluator: Evaluator,
    orders: Sequence[Sequence[str]], *, progress: bool | tqdm = True, desc: str | None = None,
    post_step: PostStep | None = None, rows: str = "all",
) -> dict:
    """A method entry (results.method_entry) over the given orders, with per-step diagnostics
    (``post_step`` and ``rows``: see :func:`run_order`)."""
    params = dict(params or {})
    orders = check_orders(orders, list(experts))
    base_tensors = materialize(base, "the base model")
    bar = _progress(sum(len(o) for o in orders), desc or method, progress)
    try:
        records = [run_order(method, params, base, experts, evaluator, order, bar, post_step=post_step, rows=rows,
                             base_tensors=base_tensors)
                   for order in orders]
    finally:
        if bar is not progress:
            bar.close()
    diagnostics = {
        "loss_matrices": [r["losses"] for r in records],
        "task_norms": [r["task_norms"] for r in records],
        "merged_norms": [r["merged_norms"] for r in records],
    }
    if any(v is not None for r in records for v in r["lambdas"]):
        diagnostics["lambdas"] = [r["lambdas"] for r in records]
    if post_step is not None:
        diagnostics["post_step"] = [r["post_step"] for r in records]
    if rows != "all":
        diagnostics["rows"] = rows
    return method_entry([r["matrix"] for r in records], orders, method=method, params=params, **diagnostics)


def resolve_orders(tasks: Sequence[str], orders: Sequence[Sequence[str]] | None, n_orders: int, seed: int) -> list[list[str]]:
    """The given orders (checked) or ``n_orders`` shuffled ones from ``seed``."""
    if orders is not None:
        return check_orders(orders, tasks)
    return shuffled_orders(tasks, n_orders, seed)


def run_continual(
    method: str, params: Mapping[str, Any] | None, base: Any, experts: Mapping[str, Any], evaluator: Evaluator,
    orders: Sequence[Sequence[str]] | None = None, n_orders: int = 10, seed: int = 0, *,
    name: str | None = None, reference: Mapping[str, Mapping[str, float]] | None = None,
    progress: bool = True,
) -> dict:
    """Run one method over shuffled task orders and return a results document (results.py).

    ``experts`` maps task name → fine-tuned model (state dict, ``nn.Module`` or path);
    ``orders`` defaults to ``n_orders`` permutations drawn from ``seed`` (recorded as the
    document's ``seed``; None when the orders were given). The reference
    rows are evaluated unless given (pass ``results["reference"]`` to reuse them).
    The method is stored under ``name`` (default: the registry name).
    """
    tasks = list(experts)
    if not tasks:
        raise CmergeError("run_continual needs at least one expert model.")
    chosen = resolve_orders(tasks, orders, n_orders, seed)
    if reference is None:
        reference = evaluate_reference(base, experts, evaluator)
    entry = run_method(method, params, base, experts, evaluator, chosen, progress=progress, desc=name or method)
    results = new_results(tasks, reference, seed=seed if orders is None else None)
    return add_method(results, name or method, entry)
