"""Generate docs/reports/toy/: the OPCM paper's protocol run end to end on the toy suite.

    python benchmarks/toy_report.py [--out docs/reports/toy] [--tasks 8] [--orders 10] [--seed 0]

Builds the toy suite (cmerge.evaluation.toy: a small MLP with frozen per-task heads,
pre-trained briefly on a mixture and fine-tuned on each synthetic task), runs every
continual method over the same shuffled task orders, sweeps OPCM's α and task
arithmetic's λ, computes the task-vector similarity matrix, and writes results.json
plus the rendered report (tables, CSVs, PNGs). Under two minutes on two CPU cores.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from cmerge.evaluation.orders import shuffled_orders
from cmerge.evaluation.report import write_report
from cmerge.evaluation.results import add_sweep, combine_results, save_results
from cmerge.evaluation.runner import evaluate_reference, run_continual, similarity_block
from cmerge.evaluation.sweep import run_sweep
from cmerge.evaluation.toy import build_toy_suite

# (name in the report, registry method, parameters); λ for TA/TIES as the paper picks for 8 tasks.
METHODS = [
    ("OPCM", "opcm", {"alpha": 0.5}),
    ("OPCM (λ_t = √t)", "opcm", {"alpha": 0.5, "scaling": "sqrt_t"}),
    ("Average (SWA)", "average", {}),
    ("C. Task Arithmetic", "task_arithmetic", {"lam": 0.3}),
    ("C. TIES-Merging", "ties", {"density": 0.2, "lam": 0.3}),
    ("MagMax", "magmax", {"scale": 0.5}),
]
GRID = [round(0.1 * i, 1) for i in range(1, 11)]
SWEEPS = [("opcm", "alpha", GRID), ("task_arithmetic", "lam", GRID)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/reports/toy"))
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--orders", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()

    suite = build_toy_suite(n_tasks=args.tasks, seed=args.seed)
    orders = shuffled_orders(suite.tasks, args.orders, args.seed)
    reference = evaluate_reference(suite.base, suite.experts, suite)
    parts = [
        run_continual(method, params, suite.base, suite.experts, suite, orders=orders, seed=args.seed,
                      name=name, reference=reference)
        for name, method, params in METHODS
    ]
    results = combine_results(*parts)
    results["seed"] = args.seed  # every run used the orders drawn from this seed
    for method, param, values in SWEEPS:
        sweep = run_sweep(method, param, values, suite.base, suite.experts, suite, orders=orders)
        add_sweep(results, sweep)
    results["similarity"] = similarity_block(suite.base, suite.experts)
    results["suite"] = {"name": "toy", "n_tasks": args.tasks, "seed": args.seed,
                        "builder": "cmerge.evaluation.toy.build_toy_suite"}

    save_results(results, args.out / "results.json")
    written = write_report(results, args.out, title=f"Toy suite: {args.tasks} tasks, {args.orders} orders")
    print(f"wrote results.json and {len(written)} files to {args.out} in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
