"""The text-suite benchmark: experts → continual merging over shuffled orders → results and report.

One run: load the suite's tasks (8 or 14), fine-tune or reuse the cached experts, score
the reference rows (pre-trained zero-shot, each expert on its own task), run every
requested method over the same shuffled task orders with :mod:`cmerge.evaluation.runner`,
optionally add the continual fine-tuning baseline, and write ``results.json`` plus the
evaluation package's report (tables, CSVs, figures).

``results.json`` is rewritten after every method, and a run pointed at a folder that
already holds results over the same tasks, orders and recipe keeps the finished methods,
so an interrupted run continues where it stopped.

A method is named on the command line as ``NAME`` or ``NAME:param=value:param=value``
(``opcm:alpha=0.8``); values are parsed with the types the registry declares.
Task arithmetic and TIES take the paper's λ for the suite size unless ``lam`` is given
(0.3 for 8 tasks, 0.1 for more; OPCM paper Appendix C.1.1).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from cmerge.errors import CmergeError
from cmerge.evaluation.orders import shuffled_orders
from cmerge.evaluation.report import write_report
from cmerge.evaluation.results import add_method, load_results, new_results, save_results
from cmerge.evaluation.runner import evaluate_reference, run_method
from cmerge.methods import REGISTRY
from cmerge.suites.backbone import base_fingerprint, load_backbone
from cmerge.suites.continual_ft import METHOD_NAME as CONTINUAL_FT, continual_finetuning_entry
from cmerge.suites.experts import build_experts
from cmerge.suites.finetune import FinetuneRecipe
from cmerge.suites.text import TextSuiteEvaluator
from cmerge.suites.text_data import SETUP_HINT, TASKS_8, TASKS_14, TextTask, load_task, missing_sources

log = logging.getLogger(__name__)

SUITES = {8: TASKS_8, 14: TASKS_14}
RESULTS_FILE = "results.json"
PAPER_LAMBDA = {8: 0.3, 14: 0.1}  # continual task arithmetic / TIES, OPCM paper C.1.1
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclass(frozen=True)
class MethodSpec:
    """One row of the benchmark: a registry method, its parameters, and the row's label."""

    label: str
    method: str
    params: dict[str, Any] = field(default_factory=dict)


def _parse_value(method: str, name: str, text: str) -> Any:
    declared = {p.name: p for p in REGISTRY[method].params}
    if name not in declared:
        raise CmergeError(f"{method} has no parameter {name!r}; it takes {', '.join(declared) or 'none'}.")
    p = declared[name]
    if p.type is bool:
        if text.lower() not in TRUE + FALSE:
            raise CmergeError(f"{method}: {name} must be true or false, got {text!r}.")
        return text.lower() in TRUE
    return p.coerce(text, method)


def parse_method_specs(text: str, n_tasks: int) -> list[MethodSpec]:
    """``"opcm,average,task_arithmetic:lam=0.2"`` → method specs, checked against the registry."""
    specs = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        method, *assignments = item.split(":")
        if method not in REGISTRY:
            raise CmergeError(f"unknown method {method!r} in --methods; choose from {', '.join(sorted(REGISTRY))}.")
        params = {}
        for a in assignments:
            name, eq, value = a.partition("=")
            if not eq:
                raise CmergeError(f"--methods entry {item!r}: write parameters as name=value, got {a!r}.")
            params[name] = _parse_value(method, name, value)
        if "lam" in {p.name for p in REGISTRY[method].params} and "lam" not in params:
            params["lam"] = PAPER_LAMBDA[8] if n_tasks <= 8 else PAPER_LAMBDA[14]
        specs.append(MethodSpec(item, method, params))
    labels = [s.label for s in specs]
    if not specs or len(set(labels)) < len(labels):
        raise CmergeError("--methods must name at least one method, each at most once.")
    return specs


def _resumable(path: Path, tasks: Sequence[str], orders: list[list[str]], suite: dict) -> dict | None:
    """The finished part of an earlier run in the same folder, if it ran the same benchmark."""
    if not path.is_file():
        return None
    try:
        old = load_results(path)
    except (CmergeError, ValueError, OSError):
        return None
    if old.get("tasks") != list(tasks) or old.get("suite") != suite or old.get("orders") != orders:
        return None
    return old


def load_suite(n_tasks: int) -> dict[str, TextTask]:
    """The 8- or 14-task text suite, by name, or a CmergeError naming the packages to install."""
    if n_tasks not in SUITES:
        raise CmergeError(f"the text suite has {' or '.join(map(str, SUITES))} tasks, not {n_tasks}.")
    missing = missing_sources(SUITES[n_tasks])
    if missing:
        raise CmergeError(f"the text suite needs the Debian packages {', '.join(missing)}; run {SETUP_HINT}.")
    return {name: load_task(name) for name in SUITES[n_tasks]}


def run_text_bench(
    out_dir: str | Path, tasks: Mapping[str, TextTask], *, methods: str | None = None, n_orders: int = 10,
    seed: int = 0, recipe: FinetuneRecipe | None = None, continual_ft_orders: int = 0,
    backbone_folder: Path | None = None, cache_dir: Path | None = None, progress: bool = True,
) -> dict:
    """Run the benchmark over ``tasks`` into ``out_dir`` and return the results document.

    ``methods`` defaults to every registered method with its defaults; ``backbone_folder``
    to the packaged all-MiniLM-L6-v2; ``cache_dir`` is the cache root of the experts and
    the continual fine-tuning matrices.
    """
    if not 0 <= continual_ft_orders <= n_orders:
        raise CmergeError(f"--continual-ft-orders must be between 0 and --orders ({n_orders}), got {continual_ft_orders}.")
    task_names = list(tasks)
    specs = parse_method_specs(methods or ",".join(REGISTRY), len(task_names))
    recipe = recipe or FinetuneRecipe()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path = out_dir / RESULTS_FILE

    backbone, tokenizer, base_folder = load_backbone(backbone_folder)
    experts = build_experts(backbone, tokenizer, base_folder, tasks.values(), recipe, cache_dir=cache_dir,
                            progress=progress)
    evaluator = TextSuiteEvaluator(backbone, tokenizer, tasks, max_len=recipe.max_len, logit_scale=recipe.logit_scale)
    orders = shuffled_orders(task_names, n_orders, seed)
    suite = {"name": "text", "backbone": base_fingerprint(base_folder), "recipe": recipe.to_dict(),
             "experts": {name: path.name for name, path in experts.items()}}

    results = _resumable(results_path, task_names, orders, suite)
    if results is None:
        reference = evaluate_reference(base_folder, experts, evaluator)
        results = new_results(task_names, reference, seed=seed, suite=suite, orders=orders)
        save_results(results, results_path)
    for spec in specs:
        if spec.label in results["methods"]:
            log.info("%s: kept from the earlier run", spec.label)
            continue
        entry = run_method(spec.method, spec.params, base_folder, experts, evaluator, orders,
                           progress=progress, desc=spec.label)
        add_method(results, spec.label, entry)
        save_results(results, results_path)
    if continual_ft_orders and CONTINUAL_FT not in results["methods"]:
        entry = continual_finetuning_entry(backbone, tokenizer, base_folder, tasks, orders[:continual_ft_orders],
                                           recipe, evaluator, cache_dir=cache_dir, progress=progress)
        add_method(results, CONTINUAL_FT, entry)
        save_results(results, results_path)
    if evaluator.task_evaluations:
        results["timing"] = {"seconds_per_task_evaluation": evaluator.seconds_per_task,
                             "task_evaluations": evaluator.task_evaluations}
        save_results(results, results_path)
    write_report(results, out_dir, title=f"Continual merging on the {len(task_names)}-task text suite")
    return results
