"""A bench row's orders shared between runs: each order claimed on its own, recorded in sequence.

A row of a bench folder (``results["methods"][label]``) holds its orders as a prefix of the
folder's orders, and a row grows one order at a time (:func:`record_order`). Runs on one folder
claim each (row, order) pair with a lock (``.locks/``, :func:`claims.claim_each`), so two
runs of the same command split even a single row's orders between them.

An order that finishes before an earlier order of its row (still running elsewhere) waits in
``.orders/`` beside ``results.json``; whichever run records the missing order appends every
waiting order that now follows, all under the results lock. A run killed at any moment
leaves ``results.json`` a valid prefix: the order it held is taken over by a run waiting for
it, and a waiting order is used later (or deleted once its row holds that order).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Iterator, Sequence

from cmerge.errors import CmergeError
from cmerge.evaluation.results import add_method, extend_entry, load_results, to_jsonable
from cmerge.fsutil import atomic_write_json
from cmerge.suites.claims import claim_each

__all__ = ["claim_orders", "done_orders", "order_lock", "record_order"]

LOCKS = ".locks"
WAITING = ".orders"


def _key(label: str, index: int) -> str:
    return f"{hashlib.sha256(label.encode()).hexdigest()[:16]}-{index}"


def order_lock(out_dir: Path, label: str, index: int) -> Path:
    """The lock file a run holds while it runs order ``index`` (0-based) of row ``label``."""
    return Path(out_dir) / LOCKS / f"order-{_key(label, index)}.lock"


def _waiting(out_dir: Path, label: str, index: int) -> Path:
    return Path(out_dir) / WAITING / f"{_key(label, index)}.json"


def done_orders(results: dict, out_dir: Path, label: str) -> set[int]:
    """The orders of row ``label`` that are recorded in ``results`` or finished and waiting to be."""
    row = results["methods"].get(label)
    n = 0 if row is None else len(row["orders"])
    return set(range(n)) | {i for i in range(n, len(results["orders"])) if _waiting(out_dir, label, i).is_file()}


def claim_orders(
    out_dir: Path, results_path: Path, labels: Sequence[str], first_pending: Callable[[dict, str], int], *,
    wait: bool = True,
) -> Iterator[tuple[str, int]]:
    """Yield each (row label, order index) still to run, once, while holding its lock.

    ``first_pending(results, label)`` is the first order the row lacks (it raises where the
    row's orders are not the folder's). Each claimed pair is checked again under its lock
    against ``results.json`` and the waiting orders, so an order another run finished
    meanwhile is skipped. ``wait=False`` skips the orders another run holds.
    """
    (Path(out_dir) / LOCKS).mkdir(exist_ok=True)
    results = load_results(results_path)
    items = [(label, i) for label in labels for i in range(first_pending(results, label), len(results["orders"]))]
    for label, index in claim_each(items, lambda item: order_lock(out_dir, *item), wait=wait):
        if index not in done_orders(load_results(results_path), out_dir, label):
            yield label, index


def record_order(results: dict, out_dir: Path, label: str, index: int, entry: dict) -> list[Path]:
    """Record order ``index`` of row ``label`` (``entry``, one order) in ``results``, in place; call it under
    the results lock.

    The row's next order is appended together with every waiting order that follows it; a
    later order is written to ``.orders/`` to wait. Returns the waiting files now recorded:
    delete them after ``results`` is saved (a kill in between leaves them for a later call
    to skip).
    """
    if entry["orders"] != [results["orders"][index]]:
        raise CmergeError(f"row {label!r}: the entry for order {index + 1} ran other task orders than the folder's.")
    row = results["methods"].get(label)
    n = 0 if row is None else len(row["orders"])
    if index > n:
        _write_waiting(_waiting(out_dir, label, index), entry)
        return []
    used = []
    if index == n:
        while True:
            if row is None:
                add_method(results, label, entry)
            else:
                results["methods"][label] = extend_entry(row, entry)
            row, n = results["methods"][label], n + 1
            following = _waiting(out_dir, label, n)
            if not following.is_file():
                break
            entry = json.loads(following.read_text())
            used.append(following)
    for i in range(n):  # left by a run killed between saving the results and deleting them
        stale = _waiting(out_dir, label, i)
        if stale.is_file() and stale not in used:
            used.append(stale)
    return used


def _write_waiting(path: Path, entry: dict) -> None:
    path.parent.mkdir(exist_ok=True)
    atomic_write_json(path, to_jsonable(entry))
