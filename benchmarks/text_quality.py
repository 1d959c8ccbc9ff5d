"""Merge quality on the offline text suite: the committed results, report and tables.

    python benchmarks/text_quality.py run -o bench-out/text          # every row (hours on 2 cores)
    python benchmarks/text_quality.py publish bench-out/text [more result folders ...]

``run`` runs `cmerge bench text` with the benchmark's rows: the OPCM paper's Table 1
(continual fine-tuning, SWA, task arithmetic and TIES with λ from the paper's grid,
MagMax, OPCM with α from a sweep, diagonal zeroed and kept) and the holistic continual
merging ablation (linearised experts, Fisher vs plain interpolation, alignment on/off,
OPCM on linearised experts), 10 orders. The rows can be split over several processes
writing into the same folder (``--rows``), see docs/text_suite.md.

``publish`` combines one or more result folders over the same tasks and orders into
docs/results/text.json, renders docs/reports/text/ (tables, CSVs, figures) and writes the
two tables with the machine, date and wall time into the quality section of
docs/benchmarks.md (between ``<!-- quality:begin -->`` and ``<!-- quality:end -->``).
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from cmerge.evaluation.report import fmt, reference_mean, table1_markdown, write_report  # noqa: E402
from cmerge.evaluation.results import combine_results, load_results, save_results  # noqa: E402

SWEEPS = ["task_arithmetic:lam", "ties:lam", "opcm:alpha"]
TABLE1_ROWS = ["average", "task_arithmetic", "ties", "magmax", "opcm", "opcm:keep_diagonal=true"]
HOLISTIC_ROWS = ["fisher_merge", "fisher_merge:align=ridge", "fisher_merge:experts=linear",
                 "fisher_merge:experts=linear:align=ridge", "ema", "ema:experts=linear:align=ridge",
                 "opcm:experts=linear", "opcm:align=ridge"]
ROW_GROUPS = {"table1": TABLE1_ROWS, "holistic": HOLISTIC_ROWS}
BEGIN, END = "<!-- quality:begin -->", "<!-- quality:end -->"


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, CPU only, torch {torch.__version__}"


def run(args: argparse.Namespace) -> None:
    rows = [r for group in args.rows.split(",") for r in ROW_GROUPS[group]]
    cmd = [sys.executable, "-m", "cmerge.cli", "bench", "text", "--orders", str(args.orders),
           "--methods", ",".join(rows), "--continual-ft-orders", str(args.continual_ft_orders), "-o", args.output]
    if "table1" in args.rows:
        cmd += [a for s in SWEEPS for a in ("--sweep", s)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))


def holistic_markdown(results: dict) -> str:
    """The holistic ablation: which stages each row uses, and its ACC / BWT (OPCM on the same experts too)."""
    lines = ["| row | tangent-space experts | merging | alignment | ACC (%) ↑ | BWT (%) ↑ |",
             "|---|---|---|---|---|---|"]
    merging = {"fisher_merge": "Fisher-weighted", "ema": "plain interpolation", "opcm": "OPCM"}
    for name in [*HOLISTIC_ROWS, "opcm"]:
        e = results["methods"].get(name)
        if e is None:
            continue
        linear = "yes" if e.get("experts") == "linear" else "no"
        align = (e.get("alignment") or {}).get("align", "off")
        lines.append(f"| {name} | {linear} | {merging[e['method']]} | {align} | {fmt(e['acc_mean'], e['acc_std'])} "
                     f"| {fmt(e['bwt_mean'], e['bwt_std'])} |")
    return "\n".join(lines) + "\n"


def table1_rows(results: dict) -> dict:
    """The results with only the OPCM paper's Table-1 rows (and continual fine-tuning)."""
    keep = {"continual fine-tuning", *TABLE1_ROWS}
    return {**results, "methods": {k: v for k, v in results["methods"].items() if k in keep}}


def sweeps_markdown(results: dict) -> str:
    lines = []
    for name, s in results.get("sweeps", {}).items():
        cells = ", ".join(f"{v}: {fmt(a)}" for v, a in zip(s["values"], s["acc_mean"]))
        lines.append(f"- `{name}` on {len(s['entries'][0]['orders'])} order(s), ACC per value: {cells}; "
                     f"best **{s['best']['value']}**.")
    return "\n".join(lines) + "\n" if lines else ""


def publish(args: argparse.Namespace) -> None:
    parts = [load_results(Path(d) / "results.json") for d in args.folders]
    orders = {str(p.get("orders")) for p in parts}
    if len(orders) > 1:
        sys.exit("the result folders ran different task orders; they cannot be combined.")
    results = combine_results(*parts)
    preferred = ["continual fine-tuning", *TABLE1_ROWS, *HOLISTIC_ROWS]
    rank = {name: i for i, name in enumerate(preferred)}
    results["methods"] = dict(sorted(results["methods"].items(), key=lambda kv: rank.get(kv[0], len(rank))))
    for key in ("seed", "suite", "orders"):
        results[key] = parts[0].get(key)
    evals = sum(p.get("timing", {}).get("task_evaluations", 0) for p in parts)
    seconds = sum(p.get("timing", {}).get("task_evaluations", 0) * p.get("timing", {}).get(
        "seconds_per_task_evaluation", 0.0) for p in parts)
    results["timing"] = {"task_evaluations": evals, "seconds_per_task_evaluation": seconds / max(evals, 1)}
    save_results(results, ROOT / "docs/results/text.json")
    write_report(results, ROOT / "docs/reports/text", title=f"Continual merging on the {len(results['tasks'])}-task text suite")

    n_orders = len(results.get("orders") or [])
    today = args.date or dt.date.today().isoformat()
    section = [
        BEGIN,
        f"## Merge quality on the offline text suite ({len(results['tasks'])} tasks)",
        "",
        "all-MiniLM-L6-v2 (22.7 M parameters) fine-tuned on real text classification tasks built from "
        "Debian packages ([text_suite.md](text_suite.md)): frozen zero-shot heads, encoder-only fine-tuning "
        "(AdamW, lr 1e-4, 120 steps, batch 32). ACC and BWT (OPCM paper Eq. 16) in percent, mean ± std "
        f"(ddof 0) over {n_orders} shuffled task orders (seed {results.get('seed')}). "
        f"Pre-trained {fmt(reference_mean(results, 'pretrained'))}, individual fine-tuned "
        f"{fmt(reference_mean(results, 'finetuned'))}.",
        "",
        f"- Command: `python benchmarks/text_quality.py run -o DIR` (rows split over processes with "
        f"`--rows table1` and `--rows holistic`), then `python benchmarks/text_quality.py publish DIR...`. "
        "Results: [results/text.json](results/text.json); report and figures: "
        "[reports/text/](reports/text/report.md).",
        f"- Machine: {machine()}. Date: {today}. {args.wall or ''}"
        f"{evals} task evaluations at {results['timing']['seconds_per_task_evaluation']:.2f} s each "
        "(300 test texts each; the benchmark processes ran with one thread each).",
        "",
        "### Table 1 (OPCM paper protocol)",
        "",
        table1_markdown(table1_rows(results)).rstrip(),
        "",
        "Swept on the first order, only the entries ACC and BWT need scored (diagonal and final row):",
        "",
        sweeps_markdown(results).rstrip(),
        "",
        "### Holistic continual merging: ablation (arXiv 2509.23592)",
        "",
        holistic_markdown(results).rstrip(),
        END,
    ]
    doc = ROOT / "docs/benchmarks.md"
    text = doc.read_text()
    if BEGIN not in text or END not in text:
        sys.exit(f"{doc} has no {BEGIN} … {END} section.")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    doc.write_text(head + "\n".join(section) + tail)
    print(f"wrote docs/results/text.json, docs/reports/text/ and the quality section of {doc}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the benchmark's rows")
    r.add_argument("-o", "--output", required=True)
    r.add_argument("--rows", default="table1,holistic", help="row groups: table1, holistic (comma-separated)")
    r.add_argument("--orders", type=int, default=10)
    r.add_argument("--continual-ft-orders", type=int, default=10)
    r.add_argument("--threads", type=int, default=None)
    p = sub.add_parser("publish", help="combine result folders and write docs/")
    p.add_argument("folders", nargs="+")
    p.add_argument("--date", default=None)
    p.add_argument("--wall", default=None, help="a sentence on the wall time, e.g. 'Wall time 2 h 10 min. '")
    args = ap.parse_args()
    run(args) if args.command == "run" else publish(args)


if __name__ == "__main__":
    main()
