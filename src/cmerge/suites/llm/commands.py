"""``cmerge bench llm``: the LLM suite's command (registered in suites/commands.py).

Heavy modules (transformers, peft, the task builders) are imported inside the command.
"""
from __future__ import annotations

import logging
from pathlib import Path

import click
import torch

from cmerge.suites.llm.lora import LoraRecipe

DEFAULT_ORDERS = {"standard": 3, "long": 3}
DEFAULT_ROWS_SCORED = {"standard": "all", "long": "diagonal+final"}


@click.command("llm")
@click.option("--setting", type=click.Choice(["standard", "long"]), default="standard", show_default=True,
              help="standard: 4 tasks in O-LoRA's 3 fixed orders; long: 8 tasks over seeded shuffled orders.")
@click.option("--orders", "n_orders", type=click.IntRange(min=1), default=None,
              help="number of task orders (default 3; the standard setting has exactly 3).")
@click.option("--seed", type=int, default=0, show_default=True, help="seed of the order shuffle (long setting).")
@click.option("--methods", default=None,
              help="comma-separated rows: seqlora, slao, or a merging method NAME[:param=value...][:on=dw|ab] "
                   "(on=dw: experts as θ0 + s·B·A, the default; on=ab: OPCM & co. applied to the LoRA factors, "
                   "the seed leaderboard's way); default: every row that runs today; 'none': only the experts "
                   "and the reference rows.")
@click.option("--sweep", "sweeps", multiple=True, metavar="METHOD[:key=value...]:PARAM[=v1/v2/...]",
              help="grid over one parameter on the validation split (ΔW experts); rows that do not set the "
                   "parameter take the best value (repeatable); key=value before PARAM: a sweep of that row only.")
@click.option("--sweep-orders", type=click.IntRange(min=1), default=1, show_default=True,
              help="orders each swept value runs on.")
@click.option("--rows", "rows_scored", type=click.Choice(["all", "diagonal+final"]), default=None,
              help="accuracies scored for merging rows: the whole matrix, or only what ACC and BWT need "
                   "(default: all for standard, diagonal+final for long).")
@click.option("--no-multitask", is_flag=True, help="skip the multi-task LoRA reference row (its training costs "
                                                    "as much as one expert per task).")
@click.option("--steps", type=click.IntRange(min=1), default=LoraRecipe.steps, show_default=True,
              help="LoRA training steps per task.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=LoraRecipe.lr, show_default=True,
              help="AdamW learning rate (linear warm-up, then constant).")
@click.option("--batch-size", type=click.IntRange(min=1), default=LoraRecipe.batch_size, show_default=True,
              help="training examples per step.")
@click.option("--n-test", type=click.IntRange(min=1), default=200, show_default=True,
              help="test examples per task.")
@click.option("--max-text-tokens", type=click.IntRange(min=1), default=48, show_default=True,
              help="each text is cut to this many tokens (the prompt around it is shared and cached).")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda or auto (a GPU when there is one).")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="cache root of the backbone and the adapters (default $CMERGE_CACHE or ~/.cache/cmerge).")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="folder for results.json, the report and leaderboard.md; a folder holding an earlier run "
                   "of the same benchmark is resumed (every row keeps the orders it finished) or extended.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch intra-op threads (default: one per core); 1 on a machine shared with other jobs.")
@click.option("--quiet", "-q", is_flag=True,
              help="no progress bars (the log lines stay: one per adapter, row and step).")
def llm_command(setting: str, n_orders: int | None, seed: int, methods: str | None, sweeps: tuple[str, ...],
                sweep_orders: int, rows_scored: str | None, no_multitask: bool, steps: int, lr: float,
                batch_size: int, n_test: int, max_text_tokens: int, device: str, cache_dir: Path | None,
                out_dir: Path, threads: int | None, quiet: bool) -> None:
    """Continual merging of LoRA experts of SmolLM2-135M-Instruct, offline.

    Trains (or reuses from the cache) one rank-8 LoRA per task on q_proj and v_proj, the
    multi-task LoRA, SeqLoRA and SLAO in order, runs the merging rows over the same task
    orders, writes OUTPUT/results.json, the report and leaderboard.md (beside the published
    Llama-2 numbers), and prints Table 1. Resumable; two processes on one folder split the rows' orders.
    """
    from cmerge.evaluation.report import table1_markdown
    from cmerge.suites.llm.bench import PromptConfig, run_llm_bench

    if threads is not None:
        torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    results = run_llm_bench(
        out_dir, setting=setting, methods=methods, n_orders=n_orders or DEFAULT_ORDERS[setting], seed=seed,
        recipe=LoraRecipe(steps=steps, lr=lr, batch_size=batch_size),
        prompts=PromptConfig(n_test=n_test, max_text_tokens=max_text_tokens), sweeps=sweeps,
        sweep_orders=sweep_orders, rows_scored=rows_scored or DEFAULT_ROWS_SCORED[setting],
        multitask=not no_multitask, device=device, cache_dir=cache_dir, progress=not quiet)
    click.echo(table1_markdown(results))
    click.echo(f"wrote {out_dir / 'results.json'} and the report in {out_dir}", err=True)
