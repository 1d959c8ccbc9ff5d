"""Render a results document (results.py) into tables and figures.

Writes, into one folder: ``table.md`` (the paper's Table 1: rows = methods, ACC ± std
and BWT ± std, and each row's paired difference of ACC against a reference row),
``report.md`` (that table, the paired comparisons, final accuracy per task, sweeps, and
every figure), ``summary.csv`` (one row per method and reference), ``steps.csv`` (one
row per order × step × task seen), ``sweeps.csv`` (one row per swept value),
``paired.csv`` (one row per method × shared order) and the PNGs of plots.py. Metrics
are recomputed from the matrices, which are the source of truth.
"""
from __future__ import annotations

import copy
import csv
import json
import math
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cmerge.evaluation import plots
from cmerge.evaluation.metrics import mean_std
from cmerge.evaluation.results import refresh_summaries, validate_results

REFERENCE_LABELS = {"pretrained": "Pre-trained", "finetuned": "Fine-tuned (individual)",
                    "finetuned_linear": "Fine-tuned in tangent space (individual)",
                    "multitask": "Multi-task (one model trained on every task)"}


def slug(name: str) -> str:
    """A file-name-safe version of a method or sweep name."""
    return re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9._-]+", "_", name)).strip("_") or "unnamed"


def fmt(value: Any, std: Any = None, digits: int = 1) -> str:
    """``75.5 ± 0.5`` (or ``—`` for a missing value), one decimal like the paper."""
    if value is None or not math.isfinite(float(value)):
        return "—"
    text = f"{float(value):.{digits}f}"
    if std is not None and math.isfinite(float(std)):
        text += f" ± {float(std):.{digits}f}"
    return text


def reference_mean(results: dict, kind: str) -> float:
    """Mean over tasks of a reference row (pre-trained or fine-tuned), NaN if absent."""
    row = results.get("reference", {}).get(kind) or {}
    values = [v for v in row.values() if v is not None]
    return float(np.mean(values)) if values else math.nan


def _params_text(params: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())


CHOSEN_MARKS = {"sweep": "†", "paper": "‡"}
"""How a row's parameter was chosen, when it was not given: † best of a sweep (on the split the
sweep names), ‡ the paper's value."""


def run_text(entry: dict) -> str:
    """``opcm(alpha=0.3†)``: the registry method, its parameters and the suite's variant keys.

    Everything that tells two rows apart goes in: the method's parameters (a mark after
    each value a sweep or the paper chose), which experts were merged (``experts=linear``),
    the alignment after each step (``align=ridge``) and, for a row computed off the CPU, where
    (``device=...``).
    """
    chosen = entry.get("chosen") or {}
    items = []
    for key, value in (entry.get("params") or {}).items():
        how = str(chosen.get(key, ""))
        mark = CHOSEN_MARKS["sweep"] if "sweep" in how else CHOSEN_MARKS["paper"] if "paper" in how else ""
        items.append(f"{key}={value}{mark}")
    if entry.get("experts", "standard") != "standard":
        items.append(f"experts={entry['experts']}")
    align = (entry.get("alignment") or {}).get("align")
    if align and align != "off":
        items.append(f"align={align}")
    if entry.get("device"):
        items.append(f"device={entry['device']}")
    text = ", ".join(items)
    method = entry.get("method") or ""
    return f"`{method}({text})`" if method else (f"`{text}`" if text else "—")


def paired_text(results: dict, name: str) -> str:
    """``-1.5 [-1.9, -1.1], 0/10``: mean ACC difference against the paired reference, its interval, orders won."""
    paired = results.get("paired") or {}
    if name == paired.get("reference"):
        return "reference"
    row = (paired.get("rows") or {}).get(name)
    if not row:
        return "—"
    interval = f" [{fmt(row['low'])}, {fmt(row['high'])}]" if row["n"] > 1 and _finite(row["low"]) else ""
    return f"{_signed(row['mean'])}{interval}, {row['wins']}/{row['n']}"


def _finite(value: Any) -> bool:
    return value is not None and math.isfinite(float(value))


def _signed(value: Any) -> str:
    return fmt(value) if not _finite(value) or float(value) < 0 else "+" + fmt(value)


def _best(values: list[float]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return max(finite) if finite else None


def table1_markdown(results: dict) -> str:
    """Rows = reference models and methods; ACC ± std and BWT ± std over orders (best in bold).

    With a paired reference (``results["paired"]``) a column gives each row's mean ACC
    difference to it over the shared orders, the interval and the orders won.
    """
    methods = results["methods"]
    paired = results.get("paired")
    best_acc = _best([e["acc_mean"] for e in methods.values()])
    best_bwt = _best([e["bwt_mean"] for e in methods.values()])
    head = ["method", "ACC (%) ↑", "BWT (%) ↑"]
    paired = paired if paired and paired.get("rows") else None
    if paired:
        head.append(f"Δ ACC vs {paired['reference']} [{paired['confidence']:.0%} CI], orders won")
    head += ["orders", "run"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for kind, label in REFERENCE_LABELS.items():
        if results.get("reference", {}).get(kind):
            cells = [label, fmt(reference_mean(results, kind))] + ["—"] * (len(head) - 2)
            lines.append("| " + " | ".join(cells) + " |")
    for name, e in methods.items():
        acc, bwt = fmt(e["acc_mean"], e["acc_std"]), fmt(e["bwt_mean"], e["bwt_std"])
        acc = f"**{acc}**" if len(methods) > 1 and e["acc_mean"] == best_acc else acc
        bwt = f"**{bwt}**" if len(methods) > 1 and e["bwt_mean"] == best_bwt else bwt
        cells = [name, acc, bwt] + ([paired_text(results, name)] if paired else [])
        cells += [str(len(e["orders"])), run_text(e)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def splits_text(results: dict) -> str:
    """One sentence saying which split the rows and the sweeps were scored on (empty if not recorded)."""
    rows = sorted({e.get("split") for e in results["methods"].values()} - {None})
    sweeps = sorted({s.get("split") for s in results.get("sweeps", {}).values()} - {None})
    parts = []
    if rows:
        parts.append(f"Every row is scored on the {' and '.join(rows)} split")
    partial = [name for name, e in results["methods"].items() if e.get("rows") == "diagonal+final"]
    if partial:
        parts.append(f"{', '.join(partial)} scored only the new task after each step and every task after the last "
                     "(exactly the ACC and BWT of a full run; no accuracy curve)")
    if sweeps:
        parts.append(f"the sweeps that choose a parameter (marked †) on the {' and '.join(sweeps)} split")
    return (", ".join(parts) + ".") if parts else ""


def paired_markdown(results: dict) -> str:
    """Each row against the paired reference: shared orders, mean difference, interval, wins/losses."""
    paired = results.get("paired")
    if not paired or not paired.get("rows"):
        return ""
    lines = [f"ACC(row) − ACC({paired['reference']}) on each order both ran; {paired['interval']}, "
             f"{paired['confidence']:.0%}. An interval that excludes 0 is what \"A beats B\" needs here.\n",
             "| method | orders | mean Δ ACC | sd | CI low | CI high | won / lost / tied |", "|---|---|---|---|---|---|---|"]
    for name, row in paired["rows"].items():
        lines.append(f"| {name} | {row['n']} | {_signed(row['mean'])} | {fmt(row['sd'])} | {fmt(row['low'])} "
                     f"| {fmt(row['high'])} | {row['wins']} / {row['losses']} / {row['ties']} |")
    return "\n".join(lines) + "\n"


def per_task_markdown(results: dict) -> str:
    """Final accuracy per task (mean over orders) for every row."""
    tasks = results["tasks"]
    lines = ["| method | " + " | ".join(tasks) + " | avg |", "|---" * (len(tasks) + 2) + "|"]
    rows = [(REFERENCE_LABELS[k], results["reference"][k]) for k in REFERENCE_LABELS
            if results.get("reference", {}).get(k)]
    rows += [(name, e["final_mean"]) for name, e in results["methods"].items()]
    for label, per_task in rows:
        cells = [fmt(per_task.get(t)) for t in tasks]
        known = [per_task[t] for t in tasks if per_task.get(t) is not None]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {fmt(np.mean(known) if known else None)} |")
    return "\n".join(lines) + "\n"


def sweep_markdown(name: str, sweep: dict) -> str:
    """One row per swept value: ACC ± std and BWT ± std, the best value in bold."""
    lines = [f"| {sweep['param']} | ACC (%) ↑ | BWT (%) ↑ |", "|---|---|---|"]
    for i, value in enumerate(sweep["values"]):
        acc = fmt(sweep["acc_mean"][i], sweep["acc_std"][i])
        acc = f"**{acc}**" if i == sweep["best"]["index"] else acc
        lines.append(f"| {value} | {acc} | {fmt(sweep['bwt_mean'][i], sweep['bwt_std'][i])} |")
    return "\n".join(lines) + "\n"


def _lambda_curves(results: dict) -> dict[str, tuple[list[float], list[float]]]:
    curves = {}
    for name, e in results["methods"].items():
        rows = e.get("lambdas")
        if not rows or any(v is None for r in rows for v in r):
            continue
        steps = min(len(r) for r in rows)
        per_step = [mean_std([r[t] for r in rows]) for t in range(steps)]
        curves[name] = ([m for m, _ in per_step], [s for _, s in per_step])
    return curves


def render_plots(results: dict, out_dir: Path) -> list[Path]:
    """Every figure the document has data for; returns the paths written."""
    written = []
    methods = results["methods"]
    curves = {name: (e["curve_mean"], e["curve_std"]) for name, e in methods.items()
              if all(v is not None and math.isfinite(v) for v in e["curve_mean"])}   # not the rows scored in part
    if curves:
        written.append(plots.plot_accuracy_curves(curves, out_dir / "accuracy_vs_tasks.png",
                                                  upper_bound=reference_mean(results, "finetuned")))
    for name, e in methods.items():
        title = f"{name}, order 1 of {len(e['orders'])}"
        written.append(plots.plot_accuracy_matrix(e["matrices"][0], e["orders"][0],
                                                  out_dir / f"accuracy_matrix_{slug(name)}.png", title))
    paired = results.get("paired")
    if paired and paired["rows"]:
        rows = {name: (row["diff"], row["mean"], row["low"], row["high"]) for name, row in paired["rows"].items()}
        written.append(plots.plot_paired(rows, paired["reference"], out_dir / f"paired_vs_{slug(paired['reference'])}.png",
                                         confidence=paired["confidence"]))
    lambdas = _lambda_curves(results)
    if lambdas:
        written.append(plots.plot_lambdas(lambdas, out_dir / "lambda_vs_sqrt_t.png"))
    references = {REFERENCE_LABELS["pretrained"]: reference_mean(results, "pretrained")}
    for name, sweep in results.get("sweeps", {}).items():
        written.append(plots.plot_sweep(sweep["param"], sweep["values"], sweep["acc_mean"], sweep["acc_std"],
                                        out_dir / f"sweep_{slug(name)}.png", label=name,
                                        best=sweep["best"]["value"], references=references))
    similarity = results.get("similarity")
    if similarity:
        written.append(plots.plot_similarity(similarity["matrix"], similarity["tasks"], out_dir / "similarity.png"))
    return written


def write_csvs(results: dict, out_dir: Path) -> list[Path]:
    """summary.csv, steps.csv and (when there are sweeps) sweeps.csv."""
    tasks = results["tasks"]
    summary = out_dir / "summary.csv"
    with summary.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "method", "params", "n_orders", "acc_mean", "acc_std", "bwt_mean", "bwt_std",
                    *[f"final_{t}" for t in tasks]])
        for kind in REFERENCE_LABELS:
            row = results.get("reference", {}).get(kind)
            if row:
                w.writerow([kind, "", "", "", reference_mean(results, kind), "", "", "", *[row.get(t, "") for t in tasks]])
        for name, e in results["methods"].items():
            w.writerow([name, e.get("method") or "", json.dumps(e.get("params", {})), len(e["orders"]),
                        e["acc_mean"], e["acc_std"], e["bwt_mean"], e["bwt_std"],
                        *[e["final_mean"].get(t, "") for t in tasks]])
    steps = out_dir / "steps.csv"
    with steps.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "order", "step", "task_added", "task", "accuracy", "loss"])
        for name, e in results["methods"].items():
            losses = e.get("loss_matrices")
            for k, (order, matrix) in enumerate(zip(e["orders"], e["matrices"])):
                for t, row in enumerate(matrix):
                    for j, acc in enumerate(row):
                        loss = losses[k][t][j] if losses else None
                        w.writerow([name, k, t + 1, order[t], order[j], _cell(acc), _cell(loss)])
    written = [summary, steps]
    if (results.get("paired") or {}).get("rows"):
        paired = out_dir / "paired.csv"
        with paired.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["method", "reference", "pair", "diff", "mean", "sd", "low", "high", "confidence"])
            p = results["paired"]
            for name, row in p["rows"].items():
                for k, d in enumerate(row["diff"]):
                    w.writerow([name, p["reference"], k, _cell(d), _cell(row["mean"]), _cell(row["sd"]),
                                _cell(row["low"]), _cell(row["high"]), p["confidence"]])
        written.append(paired)
    if results.get("sweeps"):
        sweeps = out_dir / "sweeps.csv"
        with sweeps.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["sweep", "method", "param", "value", "acc_mean", "acc_std", "bwt_mean", "bwt_std"])
            for name, s in results["sweeps"].items():
                for i, value in enumerate(s["values"]):
                    w.writerow([name, s["method"], s["param"], value, s["acc_mean"][i], s["acc_std"][i],
                                s["bwt_mean"][i], s["bwt_std"][i]])
        written.append(sweeps)
    return written


def _cell(value: Any) -> Any:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else value


def report_markdown(results: dict, figures: Sequence[Path], title: str = "Continual merging report") -> str:
    """The whole report: Table 1, final accuracy per task, sweeps, figures (linked by file name)."""
    n_orders = sorted({len(e["orders"]) for e in results["methods"].values()})
    parts = [f"# {title}\n",
             f"{len(results['tasks'])} tasks: {', '.join(results['tasks'])}. "
             f"Mean ± standard deviation (ddof={results.get('std_ddof', 0)}) over "
             f"{'/'.join(map(str, n_orders)) or 0} task orders"
             + (f" (shuffled with seed {results['seed']})" if results.get("seed") is not None else "") + "; "
             "accuracies in percent; BWT excludes the last task (OPCM paper Eq. 16). " + splits_text(results) + "\n",
             "## Average accuracy and backward transfer (Table 1)\n", table1_markdown(results),
             f"In *run*, {CHOSEN_MARKS['sweep']} marks a value chosen by a sweep (the best mean ACC of its grid), "
             f"{CHOSEN_MARKS['paper']} the paper's value for the suite size.\n"]
    if paired_markdown(results):
        parts += [f"## Paired comparison with {results['paired']['reference']}\n", paired_markdown(results)]
    parts += ["## Final accuracy per task (mean over orders)\n", per_task_markdown(results)]
    for name, sweep in results.get("sweeps", {}).items():
        fixed = _params_text(sweep.get("params", {})) or "defaults"
        split = f", scored on the {sweep['split']} split" if sweep.get("split") else ""
        orders = f", {len(sweep['entries'][0]['orders'])} order(s)" if sweep.get("entries") else ""
        parts += [f"## Sweep {name} (other parameters: {fixed}{split}{orders})\n", sweep_markdown(name, sweep)]
    if figures:
        parts.append("## Figures\n")
        parts += [f"![{p.stem}]({p.name})\n" for p in figures]
    return "\n".join(parts)


def write_report(results: dict, out_dir: str | Path, title: str = "Continual merging report",
                 paired_reference: str | None = None) -> list[Path]:
    """Validate ``results``, recompute its metrics and write every table, CSV and figure into ``out_dir``.

    ``paired_reference`` names the row the others are compared with, order by order
    (default: the one ``results["paired"]`` names, else ``opcm`` when there is such a row).
    """
    results = refresh_summaries(copy.deepcopy(validate_results(results)), paired_reference)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = render_plots(results, out_dir)
    table = out_dir / "table.md"
    table.write_text(table1_markdown(results))
    report = out_dir / "report.md"
    report.write_text(report_markdown(results, figures, title))
    return [table, report, *write_csvs(results, out_dir), *figures]
