"""Extend a text-suite result folder's continual fine-tuning row to more orders, without its experts.

    python benchmarks/continual_ft_rows.py DIR --orders 10              # the CPU, as the folder's row ran
    python benchmarks/continual_ft_rows.py DIR --orders 10 --device cuda

`cmerge bench text --methods none --continual-ft-orders N -o DIR` computes the row over the first N
orders and replaces a shorter one: orders in this machine's continual fine-tuning cache load from it,
the others (all of them on a fresh machine) are fine-tuned again. This script fine-tunes only the
orders the folder's row lacks. Neither trains the suite's experts when the folder holds its
reference rows.

The script reads what the folder fixes (DIR/results.json: its tasks, seeded orders, recipe
and split), fine-tunes the orders the row lacks with the bench's own function
(``continual_ft.continual_finetuning_entry``: cached per order, so two processes started together
split the orders between them, and an interrupted order resumes at its next task) and extends the
row. A row computed on one device is not extended on another (``results.extend_entry`` refuses the
mix). The paired comparisons are refreshed by ``text_quality.py publish``.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from cmerge.engine import device_fields, resolve_device  # noqa: E402
from cmerge.evaluation.results import load_results  # noqa: E402
from cmerge.suites.backbone import load_backbone  # noqa: E402
from cmerge.suites.bench import CONTINUAL_FT, RESULTS_FILE, load_suite, pending_orders, record  # noqa: E402
from cmerge.suites.continual_ft import continual_finetuning_entry  # noqa: E402
from cmerge.suites.finetune import FinetuneRecipe  # noqa: E402
from cmerge.suites.text import TextSuiteEvaluator  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path, help="a `cmerge bench text` result folder")
    ap.add_argument("--orders", type=int, required=True, help="how many of the folder's orders the row should hold")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)

    path = args.folder / RESULTS_FILE
    results = load_results(path)
    if not 1 <= args.orders <= len(results["orders"]):
        sys.exit(f"--orders must be between 1 and the folder's {len(results['orders'])} orders.")
    tasks = load_suite(len(results["tasks"]))
    if list(tasks) != results["tasks"]:
        sys.exit(f"{path} holds other tasks than the {len(tasks)}-task suite.")
    todo = pending_orders(results["methods"].get(CONTINUAL_FT), results["orders"][:args.orders])
    if not todo:
        print(f"{CONTINUAL_FT}: already {args.orders} orders or more in {path}")
        return
    device = resolve_device(args.device)
    recipe = FinetuneRecipe(**results["suite"]["recipe"])
    split = results.get("reference_split") or "test"
    backbone, tokenizer, base_folder = load_backbone()
    evaluator = TextSuiteEvaluator(backbone, tokenizer, tasks, split=split, max_len=recipe.max_len,
                                   logit_scale=recipe.logit_scale, device=device)
    entry = continual_finetuning_entry(backbone, tokenizer, base_folder, tasks, todo, recipe, evaluator,
                                       device=device)
    entry["split"] = split
    entry.update(device_fields(device))
    row = record(path, "methods", CONTINUAL_FT, entry)["methods"][CONTINUAL_FT]
    print(f"{CONTINUAL_FT}: {len(row['orders'])} orders in {path}, ACC {row['acc_mean']:.2f} ± {row['acc_std']:.2f}")


if __name__ == "__main__":
    main()
