"""Where one weight's step goes in DOP's exact solver, beside OPCM's projection on the same pair (issue #14).

    python benchmarks/method_profile.py                 # ViT-B/32's two shapes, 3 runs, one thread
    python benchmarks/method_profile.py --shapes 384x1536 --runs 5

The pair is step 2's of speed.py's models (speed_models.task_vector): the merged task vector
M = τ_1 and the new τ_2, float32. Each part of `dop.solve_exact` with the published weights
(`dop.schedule_weights`) is timed on its own, in the order the solver runs them: the two targets'
top singular triplets, the MGDA weights, A's eigendecomposition and the solve (the implicit
Sylvester solve, or the explicit one when the implicit does not apply). Median seconds over
the runs; the parts are timed separately, so their sum is near, not equal to, the whole.
Prints a markdown table.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed_models import task_vector  # noqa: E402

from cmerge.linalg import opcm_project  # noqa: E402
from cmerge.methods import dop  # noqa: E402

EPS = 0.99999


def timed(f, *a, **k) -> tuple[float, object]:
    t = time.perf_counter()
    out = f(*a, **k)
    return time.perf_counter() - t, out


def dop_exact(t1: torch.Tensor, t2: torch.Tensor) -> torch.Tensor:
    """One weight's step of `dop --solver exact` with its defaults (what DOP's rule computes)."""
    trips = [dop.top_triplets(x, EPS) for x in (t1, t2)]
    return dop.solve_exact(t1, t2, dop.schedule_weights(t1, t2, eps=EPS, triplets=trips), eps=EPS, triplets=trips)


def parts(t1: torch.Tensor, t2: torch.Tensor) -> dict[str, float]:
    """Seconds of each part of DOP's exact step on (M, τ) = (t1, t2), and of OPCM's projection and the whole."""
    out = {"OPCM projection": timed(opcm_project, t1, t2, 0.5)[0]}
    out["DOP exact, whole"], _ = timed(dop_exact, t1, t2)
    out["top triplets of M and τ"], trips = timed(lambda: [dop.top_triplets(x, EPS) for x in (t1, t2)])
    out["MGDA weights (published schedule)"], c = timed(dop.schedule_weights, t1, t2, eps=EPS, triplets=trips)
    wide = [(u, s, v) if t1.shape[0] <= t1.shape[1] else (v, s, u) for u, s, v in trips]
    m = min(t1.shape)
    blocks = [(u, s, v, ci) for (u, s, v), ci in zip(wide, c)]
    out["A's eigendecomposition"], (p, a) = timed(dop._eig_of_sum, [(u, ci * s.square()) for u, s, _, ci in blocks], m)
    k_sum = sum(s.numel() for _, s, _, _ in blocks)
    if k_sum < max(t1.shape) and p.shape[1] == m:
        out[f"implicit solve (K = {k_sum})"], _ = timed(dop._solve_implicit, blocks, p, a, 2)
    else:
        out["explicit solve (B's eigendecomposition and the rest)"] = (
            out["DOP exact, whole"] - out["top triplets of M and τ"] - out["MGDA weights (published schedule)"]
            - out["A's eigendecomposition"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="768x768,768x3072", help="comma-separated MxN weight shapes")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"| weight | part | seconds (median of {args.runs}) | × OPCM |\n|---|---|---|---|")
    for text in args.shapes.split(","):
        shape = tuple(int(x) for x in text.split("x"))
        name = f"profile.{text}.weight"
        t1, t2 = task_vector(name, shape, 1), task_vector(name, shape, 2)
        runs = [parts(t1, t2) for _ in range(args.runs)]
        opcm = statistics.median(r["OPCM projection"] for r in runs)
        for part in runs[0]:
            sec = statistics.median(r[part] for r in runs)
            print(f"| {shape[0]} × {shape[1]} | {part} | {sec:.2f} | {sec / opcm:.2f}× |")


if __name__ == "__main__":
    main()
