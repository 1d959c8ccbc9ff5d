"""Continual-merging metrics over accuracy matrices (OPCM paper, Section 6.1, Eq. 16).

An accuracy matrix is the ragged lower-triangular list produced by one task order:
row t (0-based) holds the accuracies, in percent, of the merged model after step t on
the first t + 1 tasks of that order; column j is the j-th task of the order. Every
function here is pure: lists in, numbers out. Missing values (``None``, as written to
JSON for NaN) are read as NaN.

Spread over task orders is the population standard deviation (``ddof=0``), so a
method that does not depend on the order reports exactly ± 0.0 and a single order is
well defined.

Two methods run over the same orders are compared order by order
(:func:`paired_difference`): the difference of their ACC on each order, its mean and a
Student-t confidence interval of that mean (sample standard deviation, ``ddof=1``,
n − 1 degrees of freedom). The interval treats the orders as the random draws; the
test texts are the same for both methods and are not resampled.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

Matrix = Sequence[Sequence[float]]

STD_DDOF = 0


def check_matrix(matrix: Matrix) -> None:
    """Raise ValueError unless ``matrix`` is non-empty and lower-triangular (row t has t + 1 entries)."""
    if len(matrix) == 0:
        raise ValueError("an accuracy matrix needs at least one row (one merging step)")
    for t, row in enumerate(matrix):
        if len(row) != t + 1:
            raise ValueError(
                f"row {t} of the accuracy matrix has {len(row)} entries; a lower-triangular "
                f"matrix has {t + 1} there (one per task seen after step {t + 1})"
            )


def _row(matrix: Matrix, t: int) -> np.ndarray:
    return np.asarray(matrix[t], dtype=np.float64)


def average_accuracy(matrix: Matrix) -> float:
    """ACC: mean accuracy of the final merged model θ_merged^(T) over all T tasks."""
    check_matrix(matrix)
    return float(np.mean(_row(matrix, len(matrix) - 1)))


def backward_transfer(matrix: Matrix) -> float:
    """BWT (Eq. 16): mean over tasks i < T of ACC_i(θ^(T)) − ACC_i(θ^(i)); the last task is excluded.

    With a single task there is no earlier task to forget and BWT is NaN.
    """
    check_matrix(matrix)
    T = len(matrix)
    if T < 2:
        return math.nan
    last = _row(matrix, T - 1)
    when_learned = np.array([matrix[i][i] for i in range(T - 1)], dtype=np.float64)
    return float(np.mean(last[: T - 1] - when_learned))


def accuracy_curve(matrix: Matrix) -> list[float]:
    """Average accuracy over the tasks seen so far, after each step (the curve of the paper's Fig. 5)."""
    check_matrix(matrix)
    return [float(np.mean(_row(matrix, t))) for t in range(len(matrix))]


def final_accuracy(matrix: Matrix, order: Sequence[str]) -> dict[str, float]:
    """Accuracy of the final merged model on each task, keyed by task name."""
    check_matrix(matrix)
    if len(order) != len(matrix):
        raise ValueError(f"the order names {len(order)} tasks but the accuracy matrix has {len(matrix)} steps")
    return {task: float(acc) for task, acc in zip(order, _row(matrix, len(matrix) - 1))}


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population standard deviation (ddof=0) of per-order values."""
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return math.nan, math.nan
    return float(np.mean(a)), float(np.std(a, ddof=STD_DDOF))


def summarize(matrices: Sequence[Matrix], orders: Sequence[Sequence[str]]) -> dict:
    """Every per-method number of the protocol, from one accuracy matrix per task order.

    Returns ``acc`` and ``bwt`` (one value per order), ``acc_mean/acc_std``,
    ``bwt_mean/bwt_std``, the accuracy-versus-number-of-tasks curve ``curve_mean/curve_std``
    (defined while all orders have that many steps) and ``final_mean/final_std``, the final
    accuracy per task name over the orders that contain that task.
    """
    if len(matrices) != len(orders):
        raise ValueError(f"{len(matrices)} accuracy matrices but {len(orders)} task orders; give one matrix per order")
    if len(matrices) == 0:
        raise ValueError("summarize needs at least one task order")
    accs = [average_accuracy(m) for m in matrices]
    bwts = [backward_transfer(m) for m in matrices]
    curves = [accuracy_curve(m) for m in matrices]
    steps = min(len(c) for c in curves)
    curve = np.asarray([c[:steps] for c in curves], dtype=np.float64)
    finals: dict[str, list[float]] = {}
    for m, order in zip(matrices, orders):
        for task, acc in final_accuracy(m, order).items():
            finals.setdefault(task, []).append(acc)
    acc_mean, acc_std = mean_std(accs)
    bwt_mean, bwt_std = mean_std(bwts)
    return {
        "acc": accs,
        "bwt": bwts,
        "acc_mean": acc_mean,
        "acc_std": acc_std,
        "bwt_mean": bwt_mean,
        "bwt_std": bwt_std,
        "curve_mean": [float(v) for v in curve.mean(axis=0)],
        "curve_std": [float(v) for v in curve.std(axis=0, ddof=STD_DDOF)],
        "final_mean": {task: mean_std(v)[0] for task, v in finals.items()},
        "final_std": {task: mean_std(v)[1] for task, v in finals.items()},
    }


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> dict:
    """``a − b`` order by order: the differences, their mean, and a Student-t interval of the mean.

    ``a`` and ``b`` hold one value per order, the same orders in the same positions.
    Returns ``diff`` (per order), ``n``, ``mean``, ``sd`` (ddof=1), ``low`` and ``high``
    (mean ∓ t_{(1+confidence)/2, n−1} · sd/√n; NaN with fewer than two orders), and
    ``wins``/``losses``/``ties`` (orders where ``a`` is above, below, equal to ``b``).
    """
    if len(a) != len(b):
        raise ValueError(f"a paired comparison needs one value per order on both sides, got {len(a)} and {len(b)}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence}")
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    n = int(diff.size)
    mean = float(np.mean(diff)) if n else math.nan
    sd = float(np.std(diff, ddof=1)) if n > 1 else math.nan
    low = high = math.nan
    if n > 1:
        half = student_t_quantile((1.0 + confidence) / 2.0, n - 1) * sd / math.sqrt(n)
        low, high = mean - half, mean + half
    return {"diff": [float(d) for d in diff], "n": n, "mean": mean, "sd": sd, "low": low, "high": high,
            "wins": int(np.sum(diff > 0)), "losses": int(np.sum(diff < 0)), "ties": int(np.sum(diff == 0))}


def student_t_quantile(q: float, df: int) -> float:
    """The ``q`` quantile of Student's t with ``df`` degrees of freedom (scipy)."""
    try:
        from scipy.stats import t
    except ImportError:
        from cmerge.errors import CmergeError
        raise CmergeError("paired confidence intervals need scipy; install it with `pip install scipy`.") from None
    return float(t.ppf(q, df))
