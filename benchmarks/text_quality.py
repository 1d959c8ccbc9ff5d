"""Merge quality on the offline text suite: the committed results, reports and tables.

    python benchmarks/text_quality.py run --tasks 8 -o /work/bench/text8     # one column (hours on 2 cores)
    python benchmarks/text_quality.py run --tasks 14 -o /work/bench/text14
    python benchmarks/text_quality.py publish /work/bench/text8 /work/bench/text14 [more folders ...]

``run`` runs `cmerge bench text` with the benchmark's rows: the OPCM paper's Table 1
(continual fine-tuning on every order, SWA, task arithmetic and TIES with λ from the
paper's grid, MagMax, OPCM with α from a sweep) and the newer data-free methods (DOP as
published and with its exact minimiser, NUFILT, the holistic Fisher merge), 10 orders.
Sweeps are scored on the validation split, rows on the test split. Rows of methods the
registry does not have (yet) are left out and named. ``--rows holistic`` adds the
holistic continual merging ablation. Start the same command twice to split the rows
between two processes (docs/text_suite.md); a stopped run resumes where it stopped.

``publish`` combines result folders by suite size: the 8-task ones into
docs/results/text.json and docs/reports/text/, the 14-task ones into
docs/results/text14.json and docs/reports/text14/ (tables, CSVs, figures, paired
comparisons with OPCM), and writes the two columns side by side, the paper's Table-1
shape, into the quality section of docs/benchmarks.md (between ``<!-- quality:begin -->``
and ``<!-- quality:end -->``), from whichever of the two results files exist.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from speed import DOC, machine, write_doc  # noqa: E402

from cmerge.evaluation.report import fmt, paired_text, reference_mean, run_text, write_report  # noqa: E402
from cmerge.evaluation.results import (  # noqa: E402
    combine_results, load_results, paired_comparisons, refresh_summaries, save_results,
)

SWEEPS = ["task_arithmetic:lam", "ties:lam", "opcm:alpha", "iso:scale", "iso:accumulate=opcm:scale"]
TABLE1_ROWS = ["average", "task_arithmetic", "ties", "magmax", "opcm", "dop:solver=adam", "dop:solver=exact",
               "nufilt", "fisher_merge", "iso", "iso:accumulate=opcm"]
HOLISTIC_ROWS = ["fisher_merge:align=ridge", "fisher_merge:experts=linear", "fisher_merge:experts=linear:align=ridge",
                 "ema", "ema:experts=linear:align=ridge", "opcm:experts=linear", "opcm:align=ridge"]
ROW_GROUPS = {"table1": TABLE1_ROWS, "holistic": HOLISTIC_ROWS}
CONTINUAL_FT = "continual fine-tuning"
PAIRED_REFERENCE = "opcm"
DISPLAY = {
    CONTINUAL_FT: "Continual fine-tuning", "average": "SWA (weight average)", "task_arithmetic": "C. task arithmetic",
    "ties": "C. TIES", "magmax": "MagMax", "opcm": "OPCM", "dop:solver=adam": "DOP (Adam, as published)",
    "dop:solver=exact": "DOP (exact minimiser)", "nufilt": "NUFILT", "fisher_merge": "Fisher merge (holistic CMM)",
    "dop:solver=exact:weights=count:others=running": "DOP exact, c = (t − 1, 1) / t (attempt, ours)",
    "nufilt:others=average": "NUFILT, other tensors averaged (attempt)",
    "iso": "Continual Iso-C: flat spectrum of the sum (ours)",
    "iso:accumulate=opcm": "Flat spectrum of OPCM's projected sum (ours)",
    "iso:accumulate=opcm:protect=0.3": "Flat spectrum of OPCM's projected sum, threshold 0.3 (ours)",
    "iso:accumulate=opcm:keep=0.1": "Flat spectrum of OPCM's projected sum, each τ truncated to its top tenth (ours)",
    "iso:accumulate=opcm:others=base": "Flat spectrum of OPCM's projected sum, other tensors at θ0 (ours)",
    "iso:accumulate=opcm:power=-0.2": "Spectrum of OPCM's projected sum reshaped to s^−0.2 (ours)",
    "iso:accumulate=opcm:protect=0.3:scale=1.8": "Flat spectrum of OPCM's projected sum, threshold 0.3, α = 1.8 given "
                                                 "(ours)",
}
COLUMNS = {8: ("text.json", "text"), 14: ("text14.json", "text14")}
OURS = "iso:accumulate=opcm:power=-0.2"  # our recommended row, compared head to head with the other leading rows
HEAD_TO_HEAD = ["dop:solver=adam", "dop:solver=exact", "nufilt", "iso", "iso:accumulate=opcm",
                "iso:accumulate=opcm:keep=0.1", "iso:accumulate=opcm:others=base", "iso:accumulate=opcm:protect=0.3",
                "iso:accumulate=opcm:protect=0.3:scale=1.8"]
BEGIN, END = "<!-- quality:begin -->", "<!-- quality:end -->"


def available_rows(rows: list[str]) -> tuple[list[str], list[str]]:
    """The rows whose method the registry has, and the ones it lacks (named, not run)."""
    from cmerge.methods import REGISTRY

    have = [r for r in rows if r.split(":")[0] in REGISTRY]
    return have, [r for r in rows if r not in have]


def run(args: argparse.Namespace) -> None:
    rows, missing = available_rows([r for group in args.rows.split(",") for r in ROW_GROUPS[group]])
    if missing:
        print(f"not in the registry (yet), left out: {', '.join(missing)}", flush=True)
    cmd = [sys.executable, "-m", "cmerge.cli", "bench", "text", "--tasks", str(args.tasks),
           "--orders", str(args.orders), "--methods", ",".join(rows) or "none",
           "--continual-ft-orders", str(args.continual_ft_orders), "--paired-reference", PAIRED_REFERENCE,
           "--threads", str(args.threads), "--workers", str(args.workers), "-o", args.output]
    if "table1" in args.rows:
        cmd += [a for s in SWEEPS for a in ("--sweep", s)]
    if args.quiet:
        cmd.append("--quiet")
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))


def holistic_markdown(results: dict) -> str:
    """The holistic ablation: which stages each row uses, and its ACC / BWT (OPCM on the same experts too)."""
    lines = ["| row | tangent-space experts | merging | alignment | ACC (%) ↑ | BWT (%) ↑ |",
             "|---|---|---|---|---|---|"]
    merging = {"fisher_merge": "Fisher-weighted", "ema": "plain interpolation", "opcm": "OPCM"}
    for name in ["fisher_merge", *HOLISTIC_ROWS, "opcm"]:
        e = results["methods"].get(name)
        if e is None:
            continue
        linear = "yes" if e.get("experts") == "linear" else "no"
        align = (e.get("alignment") or {}).get("align", "off")
        lines.append(f"| {name} | {linear} | {merging[e['method']]} | {align} | {fmt(e['acc_mean'], e['acc_std'])} "
                     f"| {fmt(e['bwt_mean'], e['bwt_std'])} |")
    return "\n".join(lines) + "\n"


def sweeps_markdown(results: dict) -> str:
    lines = []
    for name, s in results.get("sweeps", {}).items():
        cells = ", ".join(f"{v}: {fmt(a)}" for v, a in zip(s["values"], s["acc_mean"]))
        split = s.get("split", "test")
        lines.append(f"- `{name}` on {len(s['entries'][0]['orders'])} order(s), {split} split, ACC per value: "
                     f"{cells}; best **{s['best']['value']}**.")
    return "\n".join(lines) + "\n" if lines else ""


def ordered(results: dict) -> dict:
    """Rows in the table's order: continual fine-tuning, the Table-1 rows, the holistic ablation, the rest."""
    preferred = [CONTINUAL_FT, *TABLE1_ROWS, *HOLISTIC_ROWS]
    rank = {name: i for i, name in enumerate(preferred)}
    return {**results, "methods": dict(sorted(results["methods"].items(),
                                              key=lambda kv: rank.get(kv[0], len(rank))))}


def combine(folders: list[Path]) -> dict[int, dict]:
    """Result folders grouped by suite size and combined.

    Within a size, every folder's orders must be the first orders of the folder with the most (the
    orders are drawn one after another from one seed, so a folder run with fewer orders ran those).
    """
    by_size: dict[int, list[dict]] = {}
    for folder in folders:
        part = load_results(Path(folder) / "results.json")
        by_size.setdefault(len(part["tasks"]), []).append(part)
    combined = {}
    for size, parts in by_size.items():
        if size not in COLUMNS:
            sys.exit(f"a result folder holds {size} tasks; the text suite publishes 8 and 14.")
        parts.sort(key=lambda p: -len(p.get("orders") or []))
        longest, seed = parts[0].get("orders") or [], parts[0].get("seed")
        if any((o := p.get("orders") or []) != longest[:len(o)] or p.get("seed") != seed for p in parts):
            sys.exit(f"the {size}-task result folders ran different task orders; they cannot be combined.")
        results = ordered(combine_results(*parts))
        for key in ("seed", "suite", "orders", "reference_split"):
            results[key] = parts[0].get(key)
        evals = sum(p.get("timing", {}).get("task_evaluations", 0) for p in parts)
        seconds = sum(p.get("timing", {}).get("task_evaluations", 0) * p.get("timing", {}).get(
            "seconds_per_task_evaluation", 0.0) for p in parts)
        results["timing"] = {"task_evaluations": evals, "seconds_per_task_evaluation": seconds / max(evals, 1)}
        combined[size] = refresh_summaries(results, PAIRED_REFERENCE if PAIRED_REFERENCE in results["methods"]
                                           else None)
    return combined


def table1_columns(columns: dict[int, dict]) -> str:
    """The paper's Table 1 shape: one row per method, the 8- and 14-task columns side by side."""
    sizes = sorted(columns)
    head = ["method"]
    for n in sizes:
        head += [f"ACC {n} (%) ↑", f"BWT {n} (%) ↑", f"Δ ACC vs OPCM {n} [95% CI], won"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for kind, label in (("pretrained", "Pre-trained"), ("finetuned", "Fine-tuned (individual)")):
        cells = [label]
        for n in sizes:
            cells += [fmt(reference_mean(columns[n], kind)), "—", "—"]
        lines.append("| " + " | ".join(cells) + " |")
    names = list(dict.fromkeys(name for n in sizes for name in columns[n]["methods"]
                               if name in DISPLAY or name not in HOLISTIC_ROWS))
    for name in names:
        cells = [DISPLAY.get(name, f"`{name}`")]
        for n in sizes:
            e = columns[n]["methods"].get(name)
            if e is None:
                cells += ["—", "—", "—"]
                continue
            orders = "" if len(e["orders"]) == len(columns[n].get("orders") or e["orders"]) else \
                f" ({len(e['orders'])} order{'s' if len(e['orders']) != 1 else ''})"
            cells += [fmt(e["acc_mean"], e["acc_std"]) + orders, fmt(e["bwt_mean"], e["bwt_std"]),
                      paired_text(columns[n], name)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def head_to_head_markdown(columns: dict[int, dict], ours: str = OURS, others: list[str] = HEAD_TO_HEAD) -> str:
    """Our best row against each of the other leading rows, paired on their shared orders (as against OPCM)."""
    sizes = sorted(columns)
    head = ["row"] + [f"Δ ACC {n}, ours − row [95% CI], won" for n in sizes]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for other in others:
        if not any(other in columns[n]["methods"] and ours in columns[n]["methods"] for n in sizes):
            continue
        cells = [DISPLAY.get(other, f"`{other}`")]
        for n in sizes:
            have = other in columns[n]["methods"] and ours in columns[n]["methods"]
            cells.append(paired_text({"paired": paired_comparisons(columns[n], reference=other)}, ours) if have
                         else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def runs_markdown(columns: dict[int, dict]) -> str:
    """Per column and row, the exact run (parameters, how each was chosen)."""
    lines = []
    for n in sorted(columns):
        runs = ", ".join(f"{name}: {run_text(e)}" for name, e in columns[n]["methods"].items())
        lines.append(f"- {n} tasks: {runs}.")
    return "\n".join(lines) + "\n"


def splits_markdown(results: dict) -> str:
    sizes = (results.get("suite") or {}).get("splits") or {}
    if not sizes:
        return ""
    cells = "; ".join(f"{t} {s['train']}/{s['validation']}/{s['test']}" for t, s in sizes.items())
    return f"Train / validation / test texts per task: {cells}.\n"


def publish(args: argparse.Namespace) -> None:
    columns = {}
    for size, results in combine([Path(f) for f in args.folders]).items():
        file, report = COLUMNS[size]
        save_results(results, ROOT / "docs/results" / file)
        write_report(results, ROOT / "docs/reports" / report,
                     title=f"Continual merging on the {size}-task text suite")
        print(f"wrote docs/results/{file} and docs/reports/{report}/")
    for size, (file, _) in COLUMNS.items():   # the other column, as published before
        if (ROOT / "docs/results" / file).is_file():
            columns[size] = refresh_summaries(load_results(ROOT / "docs/results" / file))
    today = args.date or dt.date.today().isoformat()
    first = columns[min(columns)]
    section = [
        f"## Merge quality on the offline text suite ({' and '.join(str(n) for n in sorted(columns))} tasks)",
        "",
        "all-MiniLM-L6-v2 (22.7 M parameters) fine-tuned on real text classification tasks built from "
        "Debian packages ([text_suite.md](text_suite.md), data recipe version "
        f"{(first.get('suite') or {}).get('data_recipe_version', '?')}): frozen zero-shot heads, encoder-only "
        "fine-tuning (AdamW, lr 1e-4, 120 steps, batch 32). ACC and BWT (OPCM paper Eq. 16) in percent on the "
        "**test** split, mean ± std (ddof 0) over "
        + " / ".join(f"{len(c.get('orders') or [])}" for _, c in sorted(columns.items()))
        + f" shuffled task orders (seed {first.get('seed')}). Parameters a sweep chooses are chosen on the "
        "**validation** split. Δ ACC vs OPCM is the mean over orders of ACC(row) − ACC(OPCM) on the same "
        "order, with its 95 % Student-t interval (n − 1 degrees of freedom, orders as the random draws; the "
        "test texts are not resampled) and the number of orders the row won; an interval that excludes 0 is "
        "what \"A beats B\" needs.",
        "",
        f"- Command: {args.command}, then "
        f"`python benchmarks/text_quality.py publish {' '.join('DIR' + str(n) for n in sorted(columns))}`. Results: "
        + ", ".join(f"[results/{COLUMNS[n][0]}](results/{COLUMNS[n][0]})" for n in sorted(columns))
        + "; reports and figures: "
        + ", ".join(f"[reports/{COLUMNS[n][1]}/](reports/{COLUMNS[n][1]}/report.md)" for n in sorted(columns))
        + ".",
        f"- Machine: {machine()}. Date: {today}. {args.wall or ''}"
        + " ".join(f"{n} tasks: {c['timing']['task_evaluations']} task evaluations at "
                   f"{c['timing']['seconds_per_task_evaluation']:.2f} s each."
                   for n, c in sorted(columns.items()) if (c.get("timing") or {}).get("task_evaluations"))
        + " (one thread per process).",
        "",
        "### Table 1 (OPCM paper protocol)",
        "",
        table1_columns(columns).rstrip(),
        "",
        f"Head to head: ours = {DISPLAY.get(OURS, OURS)}, `{OURS}`, against the other leading rows, ACC "
        "paired order by order on the orders both rows ran (as Δ ACC vs OPCM above):",
        "",
        head_to_head_markdown(columns).rstrip(),
        "",
        "Rows a method of the registry did not have when the column ran show —. The exact runs († = chosen "
        "by the sweep on validation, ‡ = the paper's value):",
        "",
        runs_markdown(columns).rstrip(),
        "",
    ]
    for n, c in sorted(columns.items()):
        if sweeps_markdown(c):
            section += [f"Sweeps, {n} tasks (only the entries ACC and BWT need scored: diagonal and final row):",
                        "", sweeps_markdown(c).rstrip(), ""]
        if splits_markdown(c):
            section += [f"{n} tasks. " + splits_markdown(c).rstrip(), ""]
    if 8 in columns and any(name in columns[8]["methods"] for name in HOLISTIC_ROWS):
        section += ["### Holistic continual merging: ablation (arXiv 2509.23592), 8 tasks", "",
                    holistic_markdown(columns[8]).rstrip(), ""]
    write_doc("\n".join(section), DOC, BEGIN, END)
    print(f"wrote the quality section of {DOC}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the benchmark's rows for one suite size")
    r.add_argument("-o", "--output", required=True)
    r.add_argument("--tasks", type=int, choices=sorted(COLUMNS), default=8)
    r.add_argument("--rows", default="table1", help="row groups: table1, holistic (comma-separated)")
    r.add_argument("--orders", type=int, default=10)
    r.add_argument("--continual-ft-orders", type=int, default=10)
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--workers", type=int, default=1)
    r.add_argument("--quiet", action="store_true", help="no progress bars (for log files)")
    p = sub.add_parser("publish", help="combine result folders and write docs/")
    p.add_argument("folders", nargs="+")
    p.add_argument("--date", default=None)
    p.add_argument("--command", default="`python benchmarks/text_quality.py run --tasks 8 -o DIR8` and `... "
                   "--tasks 14 -o DIR14` (each started twice to split the rows over two processes)",
                   help="how the results were made, as the section should say it (Markdown)")
    p.add_argument("--wall", default=None, help="a sentence on the wall time, e.g. 'Wall time 2 h 10 min. '")
    args = ap.parse_args()
    run(args) if args.command == "run" else publish(args)


if __name__ == "__main__":
    main()
