"""The LLM benchmark: LoRA experts of SmolLM2-135M-Instruct → continual rows → results and report.

One run, for one setting (``standard``: four tasks in O-LoRA's three orders; ``long``:
eight tasks over seeded shuffled orders, :mod:`tasks`):

1. the backbone (cached float32 conversion of the packaged GGUF, :mod:`backbone`);
2. the tasks' prompts (train, validation, test) and one LoRA expert per task
   (:mod:`adapters`, cached);
3. reference rows on the test split: the pre-trained model, each expert on its own task,
   and the multi-task LoRA (trained on all tasks of the setting; stored as the reference
   row ``multitask``);
4. the rows, each order of each claimed with a lock (so two processes on one folder split
   them, even one row's orders: :mod:`cmerge.suites.row_orders`):
   merging rows run by :func:`cmerge.evaluation.runner.run_method` over the same orders,
   and SeqLoRA / SLAO (:mod:`sequential`), which train in order.

A merging row is named like the text suite's (``NAME[:param=value...]``) plus the key
``on=dw|ab``: what the experts are.

* ``on=dw`` (default): each expert is its PEFT adapter folder, merged as the task vector
  ΔW = s·B·A it stands for, on the adapted matrices (q_proj and v_proj of every layer;
  every other tensor equals θ0 in every expert, so every method leaves it at θ0). OPCM,
  task arithmetic and averaging keep these weights as exact low-rank factors, so OPCM
  projects the exact ΔW with the rule for a rank-deficient merged task vector
  (docs/methods.md); TIES and MagMax see ΔW materialised.
* ``on=ab``: the seed leaderboard's way. A "model" is the adapter's factors themselves
  (every lora_A and lora_B), the base is zeros, each factor is treated as a linear
  weight (``project``), and the merged adapter (A_merged, B_merged) is scored as
  θ0 + s·B_merged·A_merged.

``seqlora`` and ``slao`` name the two trained rows. Sweeps (``--sweep``) run on the
*validation* split, with ΔW experts; a row that does not set the swept parameter takes
the best value. Without a sweep task arithmetic and TIES take λ = 0.3 (the OPCM paper's
value for up to 8 tasks). The results document is the text suite's
(:mod:`cmerge.evaluation.results`), resumable and shared between processes in the same way.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from cmerge.engine import resolve_device
from cmerge.errors import CmergeError
from cmerge.evaluation.orders import shuffled_orders
from cmerge.evaluation.report import fmt, reference_mean, write_report
from cmerge.evaluation.results import load_results, new_results, save_results
from cmerge.evaluation.runner import ROWS, run_method, score
from cmerge.evaluation.sweep import run_sweep
from cmerge.methods import REGISTRY
from cmerge.suites.backbone import base_fingerprint
from cmerge.suites.bench import (ROW_SPLIT, SWEEP_ROWS, SWEEP_SPLIT, add_timing, claim_in, first_pending,
                                 locked_results, parse_method_specs, parse_sweep_specs, record, record_row_order,
                                 resumable, results_lock, row_params)
from cmerge.suites.row_orders import claim_orders
from cmerge.suites.llm.adapters import AdapterStore
from cmerge.suites.llm.backbone import backbone_folder, load_backbone
from cmerge.suites.llm.lora import LoraRecipe, LoraTrainer, adapted_weights, merged_weights
from cmerge.suites.llm.scoring import LLMEvaluator
from cmerge.suites.llm.sequential import KINDS, sequential_entry
from cmerge.suites.llm.tasks import (PROMPT_VERSION, STANDARD_ORDERS, Prompts, check_setting, encode,
                                     task_splits)
from cmerge.suites.text_data import load_task

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
LEADERBOARD_FILE = "leaderboard.md"
SPACES = ("dw", "ab")
FACTOR_PATTERN = r"\.lora_[AB]\.weight$"
MULTITASK = "multitask"
DEFAULT_ROWS = "opcm:on=ab,opcm,magmax,task_arithmetic,ties,average,seqlora,slao"

# SLAO (arXiv 2512.23017) main table, Llama-2-7B-chat, average accuracy (%): Standard CL, Long (15 tasks).
PUBLISHED = {"SeqLoRA": (76.0, 68.7), "O-LoRA": (77.2, 73.5), "MagMax": (80.3, 73.4),
             "OPCM (on A and B)": (60.2, 50.5), "SLAO": (80.4, 74.8), "Multi-task LoRA": (80.9, 78.1)}
LEADERBOARD_NAMES = {"seqlora": "SeqLoRA", "slao": "SLAO", "magmax": "MagMax", "opcm:on=ab": "OPCM (on A and B)",
                     "opcm": "OPCM (on ΔW, exact)", "task_arithmetic": "Task arithmetic (ΔW)", "ties": "TIES (ΔW)",
                     "average": "Average (ΔW)", "dop": "DOP (ΔW)", "nufilt": "NUFILT (ΔW)"}


@dataclass(frozen=True)
class PromptConfig:
    """What shapes the prompts and the splits (recorded in the results; keys nothing else)."""

    n_test: int = 200
    n_validation: int = 100
    max_text_tokens: int = 48
    version: int = PROMPT_VERSION


@dataclass(frozen=True)
class Row:
    """One row: a merging method over ΔW or A/B experts, or a trained row (seqlora, slao)."""

    label: str
    kind: str                 # "merge", "seqlora" or "slao"
    spec: Any = None          # suites.bench.MethodSpec of a merging row
    on: str = "dw"


def default_rows() -> str:
    """Every row this suite can run today (DOP once it is registered)."""
    return DEFAULT_ROWS + (",dop" if "dop" in REGISTRY else "")


def parse_rows(text: str) -> list[Row]:
    """``"opcm:on=ab,opcm,seqlora"`` → rows; merging rows are checked against the registry."""
    rows = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        if item in KINDS:
            rows.append(Row(item, item))
            continue
        parts = item.split(":")
        on = [p.partition("=")[2] for p in parts[1:] if p.startswith("on=")]
        if on and on[-1] not in SPACES:
            raise CmergeError(f"--methods entry {item!r}: on must be one of {', '.join(SPACES)}.")
        spec = parse_method_specs(":".join(p for p in parts if not p.startswith("on=")))[0]
        if spec.experts != "standard" or spec.align != "off":
            raise CmergeError(f"--methods entry {item!r}: the LLM suite has no experts= or align= keys.")
        rows.append(Row(item, "merge", spec, on[-1] if on else "dw"))
    labels = [r.label for r in rows]
    if not rows or len(set(labels)) < len(labels):
        raise CmergeError("--methods must name at least one row, each at most once.")
    return rows


def setting_orders(setting: str, tasks: Sequence[str], n_orders: int, seed: int) -> list[list[str]]:
    """O-LoRA's fixed orders (standard, at most 3) or ``n_orders`` seeded shuffles (long)."""
    if setting == "standard":
        if not 1 <= n_orders <= len(STANDARD_ORDERS):
            raise CmergeError(f"the standard setting has {len(STANDARD_ORDERS)} fixed orders; --orders must be "
                              f"1 to {len(STANDARD_ORDERS)}, got {n_orders}.")
        return [list(o) for o in STANDARD_ORDERS[:n_orders]]
    return shuffled_orders(list(tasks), n_orders, seed)


def encode_splits(tokenizer, names: Sequence[str], config: PromptConfig) -> dict[str, dict[str, Prompts]]:
    """``{"train" | "validation" | "test": {task: Prompts}}`` for the named text-suite tasks."""
    out: dict[str, dict[str, Prompts]] = {"train": {}, "validation": {}, "test": {}}
    for name in names:
        task = load_task(name)
        splits = task_splits(task, n_test=config.n_test, n_validation=config.n_validation)
        for split, examples in asdict(splits).items():
            out[split][name] = encode(tokenizer, name, task.labels, examples, config.max_text_tokens)
    return out


class FactorEvaluator:
    """Scores merged LoRA factors (A/B "models") as the weights θ0 + s·B·A they stand for."""

    def __init__(self, inner: LLMEvaluator, to_weights: Callable[[Mapping[str, torch.Tensor]], dict]) -> None:
        self.inner, self.to_weights = inner, to_weights

    def evaluate(self, model: Mapping[str, torch.Tensor], tasks: Sequence[str]):
        return self.inner.evaluate(self.to_weights(model), tasks)


def run_llm_bench(
    out_dir: str | Path, *, setting: str = "standard", methods: str | None = None, n_orders: int = 3, seed: int = 0,
    recipe: LoraRecipe | None = None, prompts: PromptConfig | None = None, sweeps: Sequence[str] = (),
    sweep_orders: int = 1, rows_scored: str = "all", multitask: bool = True, device: str = "auto",
    eval_batch_size: int = 16, backbone: Path | None = None, cache_dir: Path | None = None, progress: bool = True,
) -> dict:
    """Run the LLM benchmark of ``setting`` into ``out_dir`` and return the results document.

    ``methods``: rows (see the module docstring; default :func:`default_rows`, ``"none"``
    for only experts and reference rows); ``rows_scored``: ``all`` (full accuracy matrices)
    or ``diagonal+final`` (what ACC and BWT need) for the merging rows; ``backbone``: a
    converted backbone folder (default: the packaged GGUF's, converted once).
    """
    names = list(check_setting(setting))
    rows = [] if methods == "none" else parse_rows(methods or default_rows())
    sweep_specs = parse_sweep_specs(sweeps)
    if rows_scored not in ROWS:
        raise CmergeError(f"--rows must be one of {', '.join(ROWS)}, got {rows_scored!r}.")
    recipe, prompts = recipe or LoraRecipe(), prompts or PromptConfig()
    orders = setting_orders(setting, names, n_orders, seed)
    if not 1 <= sweep_orders <= len(orders):
        raise CmergeError(f"--sweep-orders must be between 1 and --orders ({len(orders)}), got {sweep_orders}.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path = out_dir / RESULTS_FILE

    folder = Path(backbone) if backbone is not None else backbone_folder(cache_dir=cache_dir)
    lm, tokenizer = load_backbone(folder, resolve_device(device))
    data = encode_splits(tokenizer, names, prompts)
    trainer = LoraTrainer(lm, recipe)
    store = AdapterStore(trainer, folder, cache_dir)
    experts = {t: store.get(t, [data["train"][t]], progress=progress) for t in names}
    base = adapted_weights(lm, recipe)

    def to_weights(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return merged_weights(base, state, recipe.scaling)

    evaluator = LLMEvaluator(lm, data["test"], batch_size=eval_batch_size)
    suite = json.loads(json.dumps({  # as it reads back from results.json (tuples become lists)
        "name": "llm", "setting": setting, "backbone": base_fingerprint(folder), "recipe": recipe.to_dict(),
        "prompts": asdict(prompts), "experts": {t: a.folder.name for t, a in experts.items()}}))

    with results_lock(results_path):  # one process scores the references
        results = resumable(results_path, names, orders, suite)
        if results is None:
            pretrained, _ = score(evaluator, base, names)
            finetuned = {t: score(evaluator, to_weights(experts[t].state), [t])[0][0] for t in names}
            reference = {"pretrained": dict(zip(names, pretrained)), "finetuned": finetuned}
            results = new_results(names, reference, seed=seed, suite=suite, orders=orders, reference_split=ROW_SPLIT)
            save_results(results, results_path)
            log.info("reference rows: pre-trained %s; individual %s", pretrained, finetuned)
    if multitask and MULTITASK not in results["reference"]:
        adapter = store.get(MULTITASK, [data["train"][t] for t in names], steps=recipe.steps * len(names),
                            progress=progress)
        accs, _ = score(evaluator, to_weights(adapter.state), names)
        log.info("reference row multitask: %s", accs)
        with locked_results(results_path) as results:
            results["reference"].setdefault(MULTITASK, dict(zip(names, accs)))

    dw_experts = {t: a.folder for t, a in experts.items()}  # adapters: ΔW merged exactly, as factors
    by_name = {s.name: s for s in sweep_specs}
    if by_name:
        validation = LLMEvaluator(lm, data["validation"], batch_size=eval_batch_size)
    for name in claim_in(out_dir, "sweep", list(by_name)):
        if name in load_results(results_path).get("sweeps", {}):
            continue
        s = by_name[name]
        entry = run_sweep(s.method, s.param, list(s.values), base, dw_experts, validation, dict(s.fixed),
                          orders=orders[:sweep_orders], progress=progress, rows=SWEEP_ROWS)
        for e in (entry, *entry["entries"]):
            e["split"] = SWEEP_SPLIT
        log.info("sweep %s (validation): best %s (ACC %.1f)", name, entry["best"]["value"], entry["best"]["acc_mean"])
        results = record(results_path, "sweeps", name, entry)

    by_label = {r.label: r for r in rows}
    for label, index in claim_orders(out_dir, results_path, list(by_label), first_pending):
        results = load_results(results_path)
        row, order = by_label[label], orders[index]
        if row.kind in KINDS:
            entry = sequential_entry(row.kind, [order], data["train"], data["test"], store, evaluator,
                                     to_weights, progress=progress)
        else:
            entry = _merge_row(row, results, base, experts, dw_experts, evaluator, to_weights, [order],
                               rows_scored, progress)
        entry["split"] = ROW_SPLIT
        results = record_row_order(results_path, label, index, entry)
        entry = results["methods"].get(label)
        if entry is not None and len(entry["orders"]) == len(orders):
            log.info("row %s: ACC %.1f ± %.1f, BWT %.1f ± %.1f over %d orders", label, entry["acc_mean"],
                     entry["acc_std"], entry["bwt_mean"], entry["bwt_std"], len(entry["orders"]))
    if evaluator.task_evaluations:
        with locked_results(results_path) as results:
            add_timing(results, evaluator.task_evaluations, evaluator.seconds)
    results = load_results(results_path)
    write_report(results, out_dir, title=f"Continual LoRA merging, SmolLM2-135M-Instruct, {setting} setting")
    (out_dir / LEADERBOARD_FILE).write_text(leaderboard_markdown(results))
    return results


def _merge_row(row: Row, results: dict, base: dict, experts: Mapping, dw_experts: Mapping, evaluator: LLMEvaluator,
               to_weights: Callable, orders: list[list[str]], rows_scored: str, progress: bool) -> dict:
    """One merging row over ΔW experts, or over the A/B factors with a zero base."""
    params, chosen = row_params(row.spec, results.get("sweeps", {}), len(results["tasks"]),
                                results["methods"].get(row.label))
    if row.on == "dw":
        entry = run_method(row.spec.method, params, base, dw_experts, evaluator, orders, progress=progress,
                           desc=row.label, rows=rows_scored)
    else:
        zeros = {n: torch.zeros_like(t) for n, t in next(iter(experts.values())).state.items()}
        factors = {t: a.state for t, a in experts.items()}
        entry = run_method(row.spec.method, {**params, "project": [FACTOR_PATTERN]}, zeros, factors,
                           FactorEvaluator(evaluator, to_weights), orders, progress=progress, desc=row.label,
                           rows=rows_scored)
    entry["on"] = row.on
    if chosen:
        entry["chosen"] = chosen
    return entry


def leaderboard_markdown(results: dict) -> str:
    """Our rows beside the published Llama-2-7B numbers of the SLAO paper (another model, other data)."""
    setting = (results.get("suite") or {}).get("setting", "standard")
    column = 0 if setting == "standard" else 1
    published_name = "Standard CL (4 tasks)" if column == 0 else "Long (15 tasks)"
    lines = [f"| row | ACC (%), SmolLM2-135M, ours | BWT (%), ours | orders | published ACC (%), Llama-2-7B-chat, "
             f"{published_name} |", "|---|---|---|---|---|"]
    ref = results.get("reference", {})
    for kind, label in (("pretrained", "Pre-trained"), ("finetuned", "Individual LoRA (per-task upper bound)"),
                        (MULTITASK, "Multi-task LoRA")):
        if ref.get(kind):
            published = PUBLISHED.get(label, (None, None))[column]
            lines.append(f"| {label} | {fmt(reference_mean(results, kind))} | — | — | {fmt(published)} |")
    for name, e in results["methods"].items():
        label = LEADERBOARD_NAMES.get(name, name)
        published = PUBLISHED.get(label, (None, None))[column]
        lines.append(f"| {label} | {fmt(e['acc_mean'], e['acc_std'])} | {fmt(e['bwt_mean'], e['bwt_std'])} | "
                     f"{len(e['orders'])} | {fmt(published)} |")
    lines.append(f"| O-LoRA | — | — | — | {fmt(PUBLISHED['O-LoRA'][column])} |")
    return "\n".join(lines) + "\n"
