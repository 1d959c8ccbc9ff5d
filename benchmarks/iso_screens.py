"""Screens of the projected-sum flat-spectrum row (`iso --accumulate opcm`) on the validation split.

    python benchmarks/iso_screens.py embeddings          # how the embedding tensors are merged
    python benchmarks/iso_screens.py others              # how the biases and norms (and `--others base`) are merged
    python benchmarks/iso_screens.py alpha-type          # α per layer type (attention, MLP), a 3 × 3 grid
    python benchmarks/iso_screens.py alpha-depth         # α per depth (layers 0-2, 3-5), one half moved off 2.2
    python benchmarks/iso_screens.py accumulate          # what is accumulated before the flattening
    python benchmarks/iso_screens.py accumulate --orders 3 --variants tenth --grid 2.2,2.6,3.0,3.4

One merge of the 8-task suite's experts over the first seeded order (the first N with ``--orders N``;
``--tasks 14`` the 14-task suite's), as the bench's row (α = 2.2 from its validation sweep on 8 tasks,
1.8 on 14; threshold 0.5), then variants of
the final model, each scored on every task's **validation** split: what a knob would be chosen on
(``--split test`` scores a variant already chosen there on the test split: its final ACC as a row
would report it, without BWT).
The ``accumulate`` screen replaces the row's S_t = S_{t−1} + P_{S_{t−1}}(τ_t) by variants (each at α 1.8,
2.2 and 2.6, since most change the scale of S): each τ_t truncated to its top singular directions,
flattened itself, or scaled to an equal norm before the projection; the projection with its cross
blocks dropped (the strict reading of Eq. 9), keeping the diagonal of UᵀXV, at another threshold, or
protecting as many directions of S_{t−1} as τ_t's own spectrum needs; S_T flattened on its top
directions only, or at the root mean square of its singular values instead of their mean, or its
spectrum reshaped to sᵖ (``power-0.2`` and the like: the method's ``--power``); and the flattened
merged update of DOP's exact minimiser and of NUFILT. Not bench rows (one order, one model); docs/benchmarks.md
reports them among the attempts. The merge is linear in α, so one merge at α = 1 serves every
point of an α grid. Prints one line per variant and order: its mean ACC over the
tasks; with several orders, then each variant's mean over the orders and its paired difference to
the row's (mean and range over the orders).
"""
from __future__ import annotations

import argparse
import functools
import itertools
import math
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from cmerge.evaluation.orders import shuffled_orders  # noqa: E402
from cmerge.evaluation.runner import score  # noqa: E402
from cmerge.linalg import numerical_rank, opcm_project, protected_rank, rank_rtol, svd_factors  # noqa: E402
from cmerge.methods.iso import isotropic, truncated  # noqa: E402
from cmerge.merger import Merger  # noqa: E402
from cmerge.suites.backbone import WEIGHTS_FILE, load_backbone  # noqa: E402
from cmerge.suites.bench import load_suite  # noqa: E402
from cmerge.suites.experts import expert_folders  # noqa: E402
from cmerge.suites.finetune import FinetuneRecipe  # noqa: E402
from cmerge.suites.text import TextSuiteEvaluator  # noqa: E402

ROW_ALPHA = {8: 2.2, 14: 1.8}   # the row's α per column (``--tasks``), chosen on validation
GRID = (1.8, 2.2, 2.6)


def is_flattened(name: str, t: torch.Tensor) -> bool:
    """A linear-layer weight (the tensors whose spectrum the row flattens): 2-D, not an embedding."""
    return name.endswith(".weight") and t.ndim == 2 and not name.startswith("embeddings.")


def depth(name: str) -> int | None:
    """The encoder block a tensor belongs to (None for the pooler)."""
    return int(name.split(".")[2]) if name.startswith("encoder.layer.") else None


def scaled(base: dict, merged_at_one: dict, alpha_of, row_alpha: float) -> dict:
    """The final model with each linear weight's merged update at α = alpha_of(name) (the pooler,
    which the suite's mean pooling does not use, at the row's α)."""
    out = dict(merged_at_one)
    for name, t in merged_at_one.items():
        if is_flattened(name, t):
            out[name] = base[name] + (alpha_of(name) if depth(name) is not None else row_alpha) * (t - base[name])
    return out


def project_top(delta: torch.Tensor, x: torch.Tensor, k: int) -> torch.Tensor:
    """OPCM's projection (Eq. 9, the reference's variant: the k × k block and the diagonal of UᵀXV removed,
    the cross blocks kept) with the protected rank k given."""
    u, s, v = svd_factors(delta)
    r = numerical_rank(s)
    u, v = u[:, :r], v[:, :r]
    c = u.mT @ x @ v
    removed = torch.zeros_like(c)
    removed[:k, :k] = c[:k, :k]
    idx = torch.arange(k, r)
    removed[idx, idx] = c[idx, idx]
    return x - u @ removed @ v.mT


def flattened_top(s_mat: torch.Tensor, fraction: float) -> torch.Tensor:
    """s̄ · U_k V_kᵀ of one matrix: the flattening of `isotropic` at α = 1 (s̄ the mean over all R nonzero singular
    values) kept on the top k = ⌈fraction · R⌉ singular pairs only, float64."""
    u, s, v = svd_factors(s_mat.to(torch.float64))
    rank = numerical_rank(s, rank_rtol(s_mat))
    k = math.ceil(fraction * rank)
    return float(s[:rank].mean()) * (u[:, :k] @ v[:, :k].mT)


def flattened_rms(s_mat: torch.Tensor) -> torch.Tensor:
    """`isotropic` at α = 1 with its flat value at the root mean square of the R nonzero singular values instead of
    their mean s̄, float64."""
    s = torch.linalg.svdvals(s_mat.to(torch.float64))
    s = s[:numerical_rank(s, rank_rtol(s_mat))]
    return isotropic(s_mat, float(s.square().mean().sqrt() / s.mean()) if len(s) else 1.0)


def norm_of(tau: torch.Tensor, kind: str) -> float:
    """‖τ‖ of the kind a variant equalises: "fro" the Frobenius norm, "top" the largest singular value."""
    return float(torch.linalg.matrix_norm(tau, "fro" if kind == "fro" else 2))


def accumulated(taus: list[torch.Tensor], *, truncate: float | None = None, flatten_each: bool = False,
                drop_cross_blocks: bool = False, protect_by_task: bool = False,
                equalise: str | None = None, threshold: float = 0.5,
                keep_diagonal: bool = False) -> torch.Tensor:
    """S_T of the projected sum over ``taus`` (float64), with the screened variant. With ``equalise``, each τ_t
    enters as τ_t / ‖τ_t‖ (a zero τ_t as itself) and S_T is scaled by the mean of those norms (a running mean:
    constant memory)."""
    scale = 1.0
    if equalise is not None:
        norms = [norm_of(tau, equalise) for tau in taus]
        scale = sum(norms) / len(norms)
        taus = [tau / n if n > 0 else tau for tau, n in zip(taus, norms)]
    acc = None
    for tau in taus:
        if truncate is not None:
            tau = truncated(tau, truncate)
        if flatten_each:
            tau = isotropic(tau, 1.0)
        if acc is None:
            acc = tau
        elif protect_by_task:
            acc = acc + project_top(acc, tau, protected_rank(torch.linalg.svdvals(tau), threshold))
        else:
            acc = acc + opcm_project(acc, tau, threshold, drop_cross_blocks=drop_cross_blocks,
                                     keep_diagonal=keep_diagonal)[0]
    return scale * acc


VARIANTS = {   # the accumulate screen's variants: key -> (label, options of `accumulated`, and ``final``: the rule
    # that makes S_T the merged update at α = 1, default `isotropic`)
    "row": ("the row's rule, recomputed here in float64 (a check of this loop)", {}),
    "half": ("τ_t truncated to its top half of directions", dict(truncate=0.5)),
    "quarter": ("τ_t truncated to its top quarter of directions", dict(truncate=0.25)),
    "tenth": ("τ_t truncated to its top tenth of directions", dict(truncate=0.1)),
    "twentieth": ("τ_t truncated to its top twentieth of directions", dict(truncate=0.05)),
    "flatten-each": ("τ_t flattened before the projection", dict(flatten_each=True)),
    "strict": ("projection without the cross blocks (strict Eq. 9)", dict(drop_cross_blocks=True)),
    "by-task": ("protected directions of S_{t-1}: as many as τ_t needs for half its mass",
                dict(protect_by_task=True)),
    "equal-fro": ("τ_t entering at equal Frobenius norm", dict(equalise="fro")),
    "equal-top": ("τ_t entering at equal largest singular value", dict(equalise="top")),
    "final-half": ("S_T flattened on its top half of directions only",
                   dict(final=functools.partial(flattened_top, fraction=0.5))),
    "final-quarter": ("S_T flattened on its top quarter of directions only",
                      dict(final=functools.partial(flattened_top, fraction=0.25))),
    "final-tenth": ("S_T flattened on its top tenth of directions only",
                    dict(final=functools.partial(flattened_top, fraction=0.1))),
    "keep-diagonal": ("projection keeping the diagonal of UᵀXV (OPCM's `--keep-diagonal`)", dict(keep_diagonal=True)),
    "threshold-0.4": ("OPCM's threshold 0.4 instead of 0.5", dict(threshold=0.4)),
    "threshold-0.6": ("OPCM's threshold 0.6 instead of 0.5", dict(threshold=0.6)),
    "rms": ("S_T flattened at the root mean square of its singular values", dict(final=flattened_rms)),
}
VARIANTS.update({f"power{p:g}": (f"S_T's spectrum s^{p:g}, at the mean s̄",
                                 dict(final=functools.partial(isotropic, scale=1.0, power=p)))
                 for p in (-0.1, -0.15, -0.2, -0.25, -0.3, -0.35, -0.5, 0.1)})
OTHERS = {"dop": dict(solver="exact"), "nufilt": {}}   # methods whose merged update the screen flattens
OTHER_TENSORS = ["sum-0.2", "sum-0.3", "sum-0.5", "base", "all-base"]   # the others screen's variants


def expert_weights(experts: dict, order: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """Each task's fine-tuned weights (its expert's safetensors file), by task."""
    return {t: load_file(str(experts[t] / WEIGHTS_FILE)) for t in order}


ROW_LABEL = "the row (its α everywhere, embeddings averaged)"


def screen_order(screen: str, order: list[str], experts: dict, base: dict, base_folder: Path, evaluator,
                 alpha: float, grid: list[float], variants_arg: str, scores: dict[str, list[float]]) -> None:
    """One order's screen: the row (at ``alpha``), then the screen's variants, each line printed and added to
    ``scores``."""

    def at(merged_at_one: dict, alpha_of) -> dict:
        return scaled(base, merged_at_one, alpha_of, alpha)

    def report(label: str, model: dict) -> None:
        accs, _ = score(evaluator, model, order)
        scores.setdefault(label, []).append(sum(accs) / len(accs))
        print(f"{label}: ACC {scores[label][-1]:.2f} ({evaluator.split})", flush=True)

    merger = Merger(base_folder, method="iso", accumulate="opcm", scale=1.0)
    for task in order:
        merger.add(experts[task], name=task)
    at_one = merger.state_dict()
    row = at(at_one, lambda name: alpha)
    report(ROW_LABEL, row)

    if screen == "embeddings":
        names = [n for n in base if n.startswith("embeddings.") and base[n].is_floating_point()]
        weights = expert_weights(experts, order)
        stacked = {n: torch.stack([weights[t][n] - base[n] for t in order]) for n in names}
        variants = {
            "embeddings: θ0 + Σ τ": lambda d: d.sum(0),
            "embeddings: θ0 + Σ τ / 2": lambda d: d.sum(0) / 2,
            "embeddings: MagMax (largest |τ| per entry)": lambda d: d.gather(0, d.abs().argmax(0, keepdim=True))[0],
            "embeddings: θ0": lambda d: torch.zeros_like(d[0]),
        }
        for label, rule in variants.items():
            report(label, {**row, **{n: base[n] + rule(stacked[n]) for n in names}})
    elif screen == "others":
        names = [n for n, t in base.items() if t.is_floating_point() and not is_flattened(n, t)
                 and not n.startswith("embeddings.")]
        weights = expert_weights(experts, order)
        summed = {n: sum(weights[t][n] - base[n] for t in order) for n in names}
        chosen = variants_arg.split(",") if variants_arg else OTHER_TENSORS
        for c in (0.2, 0.3, 0.5):
            if f"sum-{c}" in chosen:
                report(f"biases and norms: θ0 + {c} Σ τ", {**row, **{n: base[n] + c * summed[n] for n in names}})
        if "base" in chosen:
            report("biases and norms: θ0", {**row, **{n: base[n] for n in names}})
        if "all-base" in chosen:
            report("biases, norms and embeddings: θ0 (`--others base`)",
                   {**row, **{n: base[n] for n, t in base.items() if t.is_floating_point() and not is_flattened(n, t)}})
    elif screen == "alpha-type":
        for a, b in itertools.product(GRID, GRID):
            report(f"attention α {a}, MLP α {b}", at(at_one, lambda n: a if ".attention." in n else b))
    elif screen == "accumulate":
        weights = expert_weights(experts, order)
        names = [n for n, t in base.items() if is_flattened(n, t)]
        chosen = variants_arg.split(",") if variants_arg else [*VARIANTS, *OTHERS]
        for key in (k for k in chosen if k in VARIANTS):
            label, options = VARIANTS[key]
            options = dict(options)
            final = options.pop("final", functools.partial(isotropic, scale=1.0))
            at_one_v = dict(at_one)
            for n in names:
                taus = [weights[t][n].double() - base[n].double() for t in order]
                at_one_v[n] = base[n] + final(accumulated(taus, **options)).to(base[n].dtype)
            for a in grid:
                report(f"{label}, α {a}", at(at_one_v, lambda n, a=a: a))
        for method in (k for k in chosen if k in OTHERS):
            other = Merger(base_folder, method=method, **OTHERS[method])
            for task in order:
                other.add(experts[task], name=task)
            merged = other.state_dict()
            flat = {**merged, **{n: base[n] + isotropic(merged[n].double() - base[n].double(), 1.0).to(base[n].dtype)
                                 for n in names}}
            for a in grid:
                report(f"{method} {OTHERS[method] or ''}: its merged update flattened, α {a}",
                       at(flat, lambda n, a=a: a))
    else:
        for a, b in ((alpha, 1.8), (alpha, 2.6), (1.8, alpha), (2.6, alpha)):
            report(f"layers 0-2 α {a}, layers 3-5 α {b}", at(at_one, lambda n: a if depth(n) < 3 else b))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("screen", choices=("embeddings", "others", "alpha-type", "alpha-depth", "accumulate"))
    ap.add_argument("--grid", default=",".join(map(str, GRID)),
                    help="accumulate: the α values, comma-separated (default: the row's sweep grid)")
    ap.add_argument("--variants", default="", help="accumulate, others: the variants to run, comma-separated "
                                                   "(default: all)")
    ap.add_argument("--orders", type=int, default=1, help="screen over the first N seeded orders (default 1)")
    ap.add_argument("--split", choices=("validation", "test"), default="validation",
                    help="the split the variants are scored on (default validation: where knobs are chosen)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tasks", type=int, choices=sorted(ROW_ALPHA), default=8,
                    help="the column screened (default 8); the row runs at that column's α")
    args = ap.parse_args()
    grid = [float(a) for a in args.grid.split(",")]
    known = OTHER_TENSORS if args.screen == "others" else [*VARIANTS, *OTHERS]
    unknown = set(args.variants.split(",") if args.variants else ()) - set(known)
    if unknown:
        sys.exit(f"unknown variant(s) {', '.join(sorted(unknown))}; choose from {', '.join(known)}")
    torch.set_num_threads(args.threads)

    tasks, recipe = load_suite(args.tasks), FinetuneRecipe()
    backbone, tokenizer, base_folder = load_backbone()
    experts = expert_folders(base_folder, tasks.values(), recipe)
    missing = [t for t, folder in experts.items() if not (folder / WEIGHTS_FILE).is_file()]
    if missing:
        sys.exit(f"no cached expert for {', '.join(missing)}: run `cmerge bench text --tasks {args.tasks}` first.")
    orders = shuffled_orders(list(tasks), 10, 0)[:args.orders]
    evaluator = TextSuiteEvaluator(backbone, tokenizer, tasks, split=args.split, max_len=recipe.max_len,
                                   logit_scale=recipe.logit_scale)
    base = load_file(str(base_folder / WEIGHTS_FILE))
    scores: dict[str, list[float]] = {}
    for i, order in enumerate(orders, 1):
        print(f"order {i}: {', '.join(order)}", flush=True)
        screen_order(args.screen, order, experts, base, base_folder, evaluator, ROW_ALPHA[args.tasks], grid,
                     args.variants, scores)
    if len(orders) > 1:
        row = scores[ROW_LABEL]
        print(f"over the first {len(orders)} orders ({args.split}; difference to the row per order):")
        for label, accs in scores.items():
            diffs = [a - b for a, b in zip(accs, row)]
            print(f"{label}: ACC {sum(accs) / len(accs):.2f}, − row {sum(diffs) / len(diffs):+.2f} "
                  f"[{min(diffs):+.2f}, {max(diffs):+.2f}]", flush=True)


if __name__ == "__main__":
    main()
