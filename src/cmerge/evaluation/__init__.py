"""The OPCM paper's evaluation protocol for any model and any task suite.

    from cmerge.evaluation import run_continual, run_sweep, write_report
    results = run_continual("opcm", {"alpha": 0.5}, base, experts, evaluator, n_orders=10, seed=0)

Files: protocol.py (the Evaluator a suite implements), orders.py (seeded task orders),
runner.py (merge step by step, evaluate after each step), metrics.py (ACC, BWT, curves),
sweep.py (a grid over one parameter), similarity.py (task-vector cosines and norms,
streamed), results.py (the JSON document), plots.py and report.py (figures, tables,
CSVs), commands.py (``cmerge report`` and ``cmerge similarity``), toy.py (a tiny suite).

Names are imported on first use, so ``import cmerge.evaluation.commands`` stays cheap
(matplotlib loads only when a figure is drawn).
"""
from __future__ import annotations

import importlib
from typing import Any

from cmerge.evaluation.protocol import Evaluator, TaskResult

_EXPORTS = {
    "average_accuracy": "metrics", "backward_transfer": "metrics", "accuracy_curve": "metrics",
    "final_accuracy": "metrics", "mean_std": "metrics", "summarize": "metrics",
    "shuffled_orders": "orders",
    "run_continual": "runner", "run_method": "runner", "evaluate_reference": "runner", "similarity_block": "runner",
    "score": "runner", "materialize": "runner",
    "run_sweep": "sweep", "sweep_entry": "sweep",
    "cosine_similarity_matrix": "similarity", "task_vector_gram": "similarity", "delta_norm": "similarity",
    "method_entry": "results", "new_results": "results", "add_method": "results", "add_sweep": "results",
    "combine_results": "results", "save_results": "results", "load_results": "results",
    "validate_results": "results",
    "write_report": "report",
    "build_toy_suite": "toy", "ToySuite": "toy",
}

__all__ = ["Evaluator", "TaskResult", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
