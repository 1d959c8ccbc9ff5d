"""The LLM suite's results into the docs: docs/results/llm.json, docs/reports/llm/ and a section of
docs/benchmarks.md (the rows beside the published Llama-2 numbers).

    cmerge bench llm --setting standard -o DIR          # the run (resumable; docs/llm_suite.md)
    python benchmarks/llm_quality.py publish DIR [--command "..."] [--wall "..."] [--as NAME]

``--as NAME`` publishes a second run beside the first: docs/results/NAME.json,
docs/reports/NAME/ and its own section (default NAME: llm).

The section says what was run (setting, orders, recipe, test examples), on which machine,
the cost of one task evaluation and of one adapter as the results record them, and the
table; what the numbers show is written by hand below the section's end marker.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from speed import DOC, machine, write_doc  # noqa: E402

from cmerge.evaluation.report import table1_markdown, write_report  # noqa: E402
from cmerge.evaluation.results import load_results, refresh_summaries, save_results  # noqa: E402
from cmerge.suites.llm.bench import leaderboard_markdown  # noqa: E402
from cmerge.suites.text_data import cache_root  # noqa: E402



def adapter_seconds(results: dict) -> list[float]:
    """Training seconds per step of the run's cached experts (their info.json), where the cache still has them."""
    out = []
    for folder in (results.get("suite") or {}).get("experts", {}).values():
        info = cache_root() / "llm-adapters" / folder / "info.json"
        if info.is_file():
            out.append(float(json.loads(info.read_text()).get("seconds_per_step", 0.0)))
    return out


def section(results: dict, command: str, wall: str, date: str, name: str = "llm") -> str:
    suite = results.get("suite") or {}
    recipe, prompts = suite.get("recipe") or {}, suite.get("prompts") or {}
    timing = results.get("timing") or {}
    per_step = adapter_seconds(results)
    orders = results.get("orders") or []
    lines = [
        f"## Continual LoRA merging on an instruction LM ({suite.get('setting', '?')} setting, "
        f"{len(results.get('orders') or [])} order{'s' if len(results.get('orders') or []) != 1 else ''})",
        "",
        f"SmolLM2-135M-Instruct (de-quantized from the packaged GGUF; [llm_suite.md](llm_suite.md)), "
        f"{len(results['tasks'])} instruction classification tasks ({', '.join(results['tasks'])}), scored by the "
        f"label strings' log-likelihoods on {prompts.get('n_test', '?')} test examples per task. One LoRA per task: "
        f"rank {recipe.get('rank')}, α {recipe.get('alpha')}, on {', '.join(recipe.get('targets', []))}, AdamW lr "
        f"{recipe.get('lr')}, {recipe.get('steps')} steps of batch {recipe.get('batch_size')}. ACC and BWT (OPCM "
        f"paper Eq. 16) in percent, mean ± std over {len(orders)} of O-LoRA's task orders "
        f"({'; '.join(' → '.join(o) for o in orders)}).",
        "",
        f"- Command: `{command}`, then `python benchmarks/llm_quality.py publish DIR"
        + ("`" if name == "llm" else f" --as {name}`") + f". Results: [results/{name}.json](results/{name}.json); "
        f"report and figures: [reports/{name}/](reports/{name}/report.md).",
        f"- Machine: {machine()}, CPU only. Date: {date}. {wall}"
        + (f"One task evaluation ({prompts.get('n_test', '?')} examples): "
           f"{timing.get('seconds_per_task_evaluation', 0.0):.0f} s on average over "
           f"{timing.get('task_evaluations', 0)}. " if timing else "")
        + (f"One adapter: {min(per_step):.1f}–{max(per_step):.1f} s per training step "
           f"({recipe.get('steps')} steps). " if per_step else "")
        + "One thread, other benchmarks running beside it.",
        "",
        "Our rows beside the SLAO paper's published Llama-2-7B-chat numbers (another model, 50× larger, on "
        "other data: compare the order of the rows, not the values):",
        "",
        leaderboard_markdown(results).rstrip(),
        "",
        "Table 1 form, with each row's paired ACC difference to OPCM on ΔW:",
        "",
        table1_markdown(results).rstrip(),
    ]
    return "\n".join(lines)


def publish(args: argparse.Namespace) -> None:
    folder = Path(args.folder)
    results = refresh_summaries(load_results(folder / "results.json"))
    name = args.name
    save_results(results, ROOT / f"docs/results/{name}.json")
    setting = (results.get("suite") or {}).get("setting", "standard")
    write_report(results, ROOT / f"docs/reports/{name}",
                 title=f"Continual LoRA merging, SmolLM2-135M-Instruct, {setting} setting")
    date = args.date or dt.date.today().isoformat()
    write_doc(section(results, args.command, args.wall, date, name), DOC, f"<!-- {name}:begin -->",
              f"<!-- {name}:end -->")
    print(f"wrote docs/results/{name}.json, docs/reports/{name}/ and its section of {DOC}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command_name", required=True)
    p = sub.add_parser("publish", help="copy a run's results into docs/ and write its section")
    p.add_argument("folder")
    p.add_argument("--command", default="cmerge bench llm --setting standard -o DIR",
                   help="the command that made the results, as the section should show it")
    p.add_argument("--wall", default="", help="a sentence on the wall time of the run")
    p.add_argument("--date", default=None)
    p.add_argument("--as", dest="name", default="llm", help="file and section name (default llm)")
    args = ap.parse_args()
    publish(args)


if __name__ == "__main__":
    main()
