"""PNG figures of the continual protocol, one function per figure of the OPCM paper.

Each function takes plain numbers (lists, dicts) and a path, draws with matplotlib's
Agg canvas (no display, no pyplot global state) and returns the path written. Bands
are mean ± one standard deviation over task orders.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

Curve = tuple[Sequence[float], Sequence[float]]  # (mean, std) per step or per value


def _figure(width: float = 6.0, height: float = 4.0) -> Figure:
    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def _band(ax, x: Sequence[float], mean: Sequence[float], std: Sequence[float], label: str, marker: str = "o"):
    mean = np.asarray(mean, dtype=float)
    std = np.nan_to_num(np.asarray(std, dtype=float))
    line = ax.plot(x, mean, marker=marker, markersize=4, label=label)[0]
    ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
    return line


def plot_accuracy_curves(curves: Mapping[str, Curve], path: str | Path, upper_bound: float | None = None) -> Path:
    """Average accuracy on the tasks seen so far versus number of tasks merged (paper Fig. 5).

    Past ten curves the colours come from tab20 and the legend moves beside the axes.
    """
    many = len(curves) > 10
    fig = _figure(width=9.0 if many else 6.0, height=4.5 if many else 4.0)
    ax = fig.add_subplot()
    if many:
        ax.set_prop_cycle(color=[matplotlib.colormaps["tab20"](i % 20) for i in range(len(curves))])
    for name, (mean, std) in curves.items():
        _band(ax, range(1, len(mean) + 1), mean, std, name)
    if upper_bound is not None and math.isfinite(upper_bound):
        ax.axhline(upper_bound, color="black", linestyle=":", linewidth=1, label="fine-tuned (mean)")
    ax.set_xlabel("number of tasks merged")
    ax.set_ylabel("average accuracy on seen tasks (%)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    if many:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_sweep(
    param: str, values: Sequence[float], mean: Sequence[float], std: Sequence[float], path: str | Path,
    label: str = "", best: float | None = None, references: Mapping[str, float] | None = None,
) -> Path:
    """Mean ACC (± std over orders) against one parameter's values (paper Fig. 6, 14, 15).

    Non-numeric values (e.g. a scaling rule's name) are placed at equal spacing.
    """
    fig = _figure()
    ax = fig.add_subplot()
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    x = list(values) if numeric else list(range(len(values)))
    _band(ax, x, mean, std, label or param)
    if not numeric:
        ax.set_xticks(x, [str(v) for v in values])
    if best is not None:
        i = list(values).index(best)
        ax.plot([x[i]], [mean[i]], marker="*", markersize=14, color="gold", markeredgecolor="black",
                linestyle="none", label=f"best {param} = {best}")
    for k, (name, value) in enumerate((references or {}).items()):
        if value is not None and math.isfinite(value):
            ax.axhline(value, color="grey", linestyle=("--", ":", "-.")[k % 3], linewidth=1, label=name)
    ax.set_xlabel(param)
    ax.set_ylabel("ACC after the last task (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_lambdas(lambdas: Mapping[str, Curve], path: str | Path) -> Path:
    """The scaling factor λ_t per step against √t (paper Fig. 7)."""
    fig = _figure()
    ax = fig.add_subplot()
    longest = 1
    for name, (mean, std) in lambdas.items():
        _band(ax, range(1, len(mean) + 1), mean, std, name)
        longest = max(longest, len(mean))
    t = np.linspace(1, longest, 200)
    ax.plot(t, np.sqrt(t), color="black", linestyle="--", linewidth=1, label=r"$\sqrt{t}$")
    ax.set_xlabel("step $t$")
    ax.set_ylabel(r"$\lambda_t$")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def similarity_colours(m: np.ndarray) -> tuple[np.ma.MaskedArray, float]:
    """What the heatmap colours: ``m`` with its diagonal and non-finite cells masked, and the half-width of the
    colour scale (the largest off-diagonal magnitude; 1 when there is none)."""
    n = m.shape[0]
    diagonal = np.eye(n, dtype=bool)
    off = np.abs(m[~diagonal & np.isfinite(m)])
    scale = float(off.max()) if off.size and off.max() > 0 else 1.0
    return np.ma.masked_array(m, mask=diagonal | ~np.isfinite(m)), scale


def plot_similarity(matrix: Sequence[Sequence[float]], names: Sequence[str], path: str | Path) -> Path:
    """Heatmap of the pairwise cosine similarity of task vectors (paper Fig. 4, 9-11).

    The colour scale spans the off-diagonal values, centred on 0; the diagonal (1 by
    definition) is drawn grey, so it neither saturates the scale nor looks like a high
    similarity. Every cell is annotated when there are ≤ 20 models, in scientific notation
    when the off-diagonal values are all below 0.01 in magnitude.
    """
    m = np.asarray(matrix, dtype=float)
    n = len(names)
    shown, scale = similarity_colours(m)
    size = max(4.0, 0.45 * n + 2.0)
    fig = _figure(size + 1.0, size)
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="lightgrey")
    image = ax.imshow(shown, cmap=cmap, vmin=-scale, vmax=scale)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="cosine similarity (off the diagonal)")
    ax.set_xticks(range(n), names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), names, fontsize=8)
    fmt = "{:.1e}" if scale < 0.01 else "{:.2f}"
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if np.isfinite(m[i, j]):
                    strong = i != j and abs(m[i, j]) > 0.6 * scale
                    ax.text(j, i, f"{m[i, j]:.2f}" if i == j else fmt.format(m[i, j]), ha="center", va="center",
                            fontsize=6 if scale < 0.01 else 7, color="white" if strong else "black")
    ax.set_title("cosine similarity of task vectors")
    return _save(fig, path)


def plot_accuracy_matrix(matrix: Sequence[Sequence[float]], order: Sequence[str], path: str | Path,
                         title: str = "") -> Path:
    """Lower-triangular accuracy matrix of one order: row = after step t, column = task (paper Fig. 12)."""
    T = len(order)
    square = np.full((T, T), np.nan)
    for t, row in enumerate(matrix):
        square[t, : len(row)] = np.asarray(row, dtype=float)
    finite = square[np.isfinite(square)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 100.0)
    size = max(4.0, 0.5 * T + 2.0)
    fig = _figure(size + 1.0, size)
    ax = fig.add_subplot()
    image = ax.imshow(square, cmap="viridis", vmin=low, vmax=high)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="accuracy (%)")
    ax.set_xticks(range(T), order, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(T), [f"{t + 1}: +{task}" for t, task in enumerate(order)], fontsize=8)
    ax.set_xlabel("task evaluated")
    ax.set_ylabel("after merging step")
    if T <= 20:
        mid = (low + high) / 2
        for t in range(T):
            for j in range(t + 1):
                if np.isfinite(square[t, j]):
                    ax.text(j, t, f"{square[t, j]:.1f}", ha="center", va="center", fontsize=7,
                            color="black" if square[t, j] > mid else "white")
    ax.set_title(title or "accuracy matrix")
    return _save(fig, path)


def plot_paired(rows: Mapping[str, tuple[Sequence[float], float, float, float]], reference: str, path: str | Path,
                confidence: float = 0.95) -> Path:
    """Each row's ACC minus the reference's, order by order (dots), with the mean and its interval (bar).

    ``rows`` maps a row name to (per-order differences, mean, interval low, interval high).
    Rows are drawn top to bottom in the given order; the dashed line is "no difference".
    """
    names = list(rows)
    fig = _figure(width=7.0, height=max(2.5, 0.45 * len(names) + 1.3))
    ax = fig.add_subplot()
    for y, name in enumerate(names):
        diffs, mean, low, high = rows[name]
        diffs = np.asarray([d for d in diffs if d is not None], dtype=float)
        jitter = np.linspace(-0.15, 0.15, len(diffs)) if len(diffs) > 1 else np.zeros(len(diffs))
        ax.scatter(diffs, y + jitter, s=12, color="grey", alpha=0.6, zorder=2,
                   label="one order" if y == 0 else None)
        if low is not None and high is not None and math.isfinite(low) and math.isfinite(high):
            ax.plot([low, high], [y, y], color="black", linewidth=2, zorder=3,
                    label=f"{confidence:.0%} interval (Student t)" if y == 0 else None)
        if mean is not None and math.isfinite(mean):
            ax.plot([mean], [y], marker="D", color="tab:red", markersize=6, zorder=4, linestyle="none",
                    label="mean" if y == 0 else None)
    ax.axvline(0.0, color="black", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"ACC − ACC of {reference} on the same order (points)")
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=7, loc="best")
    return _save(fig, path)
