"""``cmerge bench``: benchmark commands of the task suites (cli.py registers ``bench_command``).

The suite's heavy modules (transformers, matplotlib, the task builders) are imported
inside the commands, so registering the group costs almost nothing.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import click
import torch

from cmerge.suites.finetune import FinetuneRecipe


FULL_ORDERS, DEMO_ORDERS = 10, 2
SCORED = {"all": "all", "acc-bwt": "diagonal+final"}   # --scored choice -> runner's rows


@click.group("bench")
def bench_command() -> None:
    """Benchmark continual merging methods on a task suite."""


@bench_command.command("text")
@click.option("--tasks", "n_tasks", type=click.Choice(["8", "14"]), default="8", show_default=True,
              help="suite size: the 8-task set or the 14-task set.")
@click.option("--orders", "n_orders", type=click.IntRange(min=1), default=None,
              help=f"number of shuffled task orders (default {FULL_ORDERS}, as in the paper; {DEMO_ORDERS} with --demo).")
@click.option("--demo", is_flag=True,
              help=f"a first look: {DEMO_ORDERS} task orders unless --orders is given, and --scored acc-bwt "
                   "unless --scored is given (minutes once the experts are cached).")
@click.option("--scored", type=click.Choice(list(SCORED)), default=None,
              help="which accuracies each row scores: all (every task seen after every step: the accuracy "
                   "curves, the default) or acc-bwt (the new task after each step and every task after the "
                   "last: exactly the ACC and BWT of `all`, 2.4x fewer evaluations on 8 tasks; the default "
                   "with --demo).")
@click.option("--seed", type=int, default=0, show_default=True, help="seed of the order shuffle.")
@click.option("--methods", default=None,
              help="comma-separated rows, each NAME or NAME:key=value[:key=value]: the method's parameters "
                   "(see `cmerge methods`) and experts=standard|linear (tangent-space experts), "
                   "align=off|ridge|adam (post-merge representation alignment); default: every registered "
                   "method (task arithmetic and TIES with the best λ of a sweep, else the paper's λ: "
                   "0.3 for 8 tasks, 0.1 for 14); 'none' for no merging rows (e.g. only "
                   "--continual-ft-orders).")
@click.option("--sweep", "sweeps", multiple=True, metavar="METHOD[:key=value...]:PARAM[=v1/v2/...]",
              help="grid over one parameter (repeatable; default grids: task_arithmetic:lam and ties:lam "
                   "0.1..1.0, opcm:alpha 0.1..1.0, iso:scale 1.0..2.6), run on the first --sweep-orders orders; "
                   "rows that do not set the parameter take the best value. With key=value before PARAM the sweep "
                   "runs with those parameters and decides only the row written the same way.")
@click.option("--sweep-orders", type=click.IntRange(min=1), default=1, show_default=True,
              help="orders each swept value runs on (scored on the validation split; only the diagonal and "
                   "final row).")
@click.option("--paired-reference", default="opcm", show_default=True, metavar="ROW",
              help="the row every other row is compared with, order by order: mean ACC difference and its 95% "
                   "Student-t interval over orders, in results.json, the table and a figure.")
@click.option("--align-samples", type=click.IntRange(min=1), default=128, show_default=True,
              help="current-task training inputs used by each alignment step (rows with align=...).")
@click.option("--continual-ft-orders", type=click.IntRange(min=0), default=0, show_default=True,
              help="also run continual fine-tuning (a baseline row) on the first N orders; "
                   "each order costs one fine-tuning run per task (cached per order and per task, so an "
                   "interrupted run resumes; runs into one folder split the orders).")
@click.option("--steps", type=click.IntRange(min=1), default=FinetuneRecipe.steps, show_default=True,
              help="fine-tuning steps per expert.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=FinetuneRecipe.lr, show_default=True,
              help="fine-tuning learning rate (AdamW, warm-up then cosine).")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="cache root of the experts and continual fine-tuning results "
                   "(default $CMERGE_CACHE or ~/.cache/cmerge).")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="folder for results.json and the report (tables, CSVs, figures); a folder holding an "
                   "earlier run of the same benchmark is resumed (every row keeps the orders it finished) or "
                   "extended to more orders; runs started on one folder split the rows' orders.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="torch intra-op threads of fine-tuning and merging; on a machine shared with other jobs "
                   "more than 1 can be many times slower (docs/text_suite.md).")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="tasks an evaluation scores side by side, one core each (default: one per core); the "
                   "results do not depend on it.")
@click.option("--device", default="cpu", show_default=True,
              help="where fine-tuning and scoring run: cpu, cuda or auto (a GPU when there is one); the merges "
                   "stay on the CPU.")
@click.option("--quiet", "-q", is_flag=True, help="no progress bars.")
def text_command(n_tasks: str, n_orders: int | None, demo: bool, scored: str | None, seed: int, methods: str | None,
                 sweeps: tuple[str, ...], sweep_orders: int, align_samples: int, continual_ft_orders: int,
                 steps: int, lr: float, cache_dir: Path | None, out_dir: Path, threads: int,
                 workers: int | None, paired_reference: str, device: str, quiet: bool) -> None:
    """Continual merging of all-MiniLM-L6-v2 experts on the offline text suite.

    Fine-tunes (or reuses from the cache) one expert per task with a frozen zero-shot
    head, chooses swept parameters on the validation split, runs every method over the
    same shuffled task orders on the test split, writes OUTPUT/results.json and the
    report, and prints Table 1 (ACC and BWT, mean ± std over orders, paired differences).
    """
    from cmerge.evaluation.report import table1_markdown
    from cmerge.engine import resolve_device
    from cmerge.suites.bench import load_suite, run_text_bench

    resolve_device(device)  # a device this machine lacks is refused before any work
    torch.set_num_threads(threads)
    if not quiet:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    if n_orders is None:
        n_orders = DEMO_ORDERS if demo else FULL_ORDERS
    scored = scored or ("acc-bwt" if demo else "all")
    results = run_text_bench(out_dir, load_suite(int(n_tasks)), methods=methods, n_orders=n_orders, seed=seed,
                             sweeps=sweeps, sweep_orders=min(sweep_orders, n_orders), align_samples=align_samples,
                             recipe=FinetuneRecipe(steps=steps, lr=lr), continual_ft_orders=continual_ft_orders,
                             cache_dir=cache_dir, progress=not quiet, workers=workers or os.cpu_count() or 1,
                             paired_reference=paired_reference, rows=SCORED[scored], device=device)
    click.echo(table1_markdown(results))
    click.echo(f"wrote {out_dir / 'results.json'} and the report in {out_dir}", err=True)


def _register_llm() -> None:
    """``cmerge bench llm`` (suites/llm/commands.py; its heavy imports stay inside the command)."""
    from cmerge.suites.llm.commands import llm_command

    bench_command.add_command(llm_command)


_register_llm()
