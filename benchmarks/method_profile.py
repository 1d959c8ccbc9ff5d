"""Where one weight's step goes in DOP's exact solver, beside OPCM's projection on the same pair (issue #14).

    python benchmarks/method_profile.py                 # ViT-B/32's two shapes, 3 runs, one thread
    python benchmarks/method_profile.py --shapes 384x1536 --runs 5

The pair is step 2's of speed.py's models (speed_models.task_vector): the merged task vector
M = τ_1 and the new τ_2, float32. One call of DOP's exact step with the published weights is
timed whole, and inside it each helper of `cmerge.methods.dop` it goes through (the targets' top
singular triplets, the MGDA weights, the eigendecompositions of A and B, the implicit Sylvester
solve or the explicit one), by wrapping those module functions for the call: the parts are the
solver's own route, not a copy of it. Median seconds over the runs. Prints a markdown table.

The last row per shape is a floor for any direct exact solve of DOP's Sylvester equation: it must
diagonalise A (m × m, m the shorter side) and B on its range (K × K, K = min(n, k₁ + k₂)), and
those two float64 eigendecompositions alone are timed (on Gram matrices of the pair, of those sizes).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed_models import task_vector  # noqa: E402

from cmerge.linalg import opcm_project  # noqa: E402
from cmerge.methods import dop  # noqa: E402

EPS = 0.99999


# the helpers of cmerge.methods.dop an exact step calls, and how the table names them
PARTS = {"top_triplets": "top triplets of M and τ", "schedule_weights": "MGDA weights (published schedule)",
         "_eig_of_sum": "eigendecompositions of A (and B)", "_solve_implicit": "implicit Sylvester solve",
         "_solve_explicit": "explicit solve"}


def timed(f, *a, **k) -> tuple[float, object]:
    t = time.perf_counter()
    out = f(*a, **k)
    return time.perf_counter() - t, out


@contextmanager
def timing(module, names: list[str], spent: dict[str, float]) -> Iterator[None]:
    """Within the block, every call of ``module.NAME`` adds its seconds to ``spent[NAME]``."""
    originals = {name: getattr(module, name) for name in names}

    def wrap(name, f):
        def timed_call(*a, **k):
            seconds, out = timed(f, *a, **k)
            spent[name] = spent.get(name, 0.0) + seconds
            return out
        return timed_call

    for name, f in originals.items():
        setattr(module, name, wrap(name, f))
    try:
        yield
    finally:
        for name, f in originals.items():
            setattr(module, name, f)


def dop_exact(t1: torch.Tensor, t2: torch.Tensor) -> torch.Tensor:
    """One weight's step of `dop --solver exact` with its defaults (what DOP's rule computes)."""
    trips = [dop.top_triplets(x, EPS) for x in (t1, t2)]
    return dop.solve_exact(t1, t2, dop.schedule_weights(t1, t2, eps=EPS, triplets=trips), eps=EPS, triplets=trips)


def floor_eigh(t1: torch.Tensor, t2: torch.Tensor) -> float:
    """Seconds of the two float64 eigendecompositions a direct exact solve cannot skip (module docstring)."""
    a, b = (t1, t2) if t1.shape[0] <= t1.shape[1] else (t1.mT, t2.mT)
    a, b = a.to(torch.float64), b.to(torch.float64)
    k = sum(dop.top_triplets(x, EPS)[1].numel() for x in (a, b))
    side = a @ a.mT
    stacked = torch.cat([a, b])
    # K × K, K = min(n, k1 + k2): a principal block of the stacked pair's Gram, or B's own size
    range_b = (stacked @ stacked.mT)[:k, :k] if k < a.shape[1] else stacked.mT @ stacked
    return timed(torch.linalg.eigh, side)[0] + timed(torch.linalg.eigh, range_b)[0]


def parts(t1: torch.Tensor, t2: torch.Tensor) -> dict[str, float]:
    """Seconds of OPCM's projection, of DOP's exact step on (M, τ) = (t1, t2), and of the parts of that step."""
    out = {"OPCM projection": timed(opcm_project, t1, t2, 0.5)[0]}
    spent: dict[str, float] = {}
    with timing(dop, list(PARTS), spent):
        out["DOP exact, whole"] = timed(dop_exact, t1, t2)[0]
    out |= {label: spent[name] for name, label in PARTS.items() if name in spent}
    out["floor: eigendecompositions of A and of B on its range"] = floor_eigh(t1, t2)
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
