"""Seeded task orders: the shuffled sequences a continual method is run over (the paper uses 10)."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from cmerge.errors import CmergeError


def shuffled_orders(tasks: Sequence[str], n_orders: int = 10, seed: int = 0) -> list[list[str]]:
    """``n_orders`` random permutations of ``tasks``, reproducible from ``seed``.

    Orders are distinct while there are enough permutations (n_orders ≤ T!); beyond that
    every permutation appears and the rest repeat.
    """
    tasks = list(tasks)
    if n_orders < 1:
        raise CmergeError(f"n_orders must be at least 1, got {n_orders}.")
    if len(set(tasks)) != len(tasks):
        raise CmergeError("task names must be unique to shuffle them into orders.")
    rng = np.random.default_rng(seed)
    n_distinct = math.factorial(len(tasks)) if len(tasks) <= 12 else n_orders
    orders: list[list[str]] = []
    seen: set[tuple[str, ...]] = set()
    while len(orders) < n_orders:
        order = [tasks[i] for i in rng.permutation(len(tasks))]
        if tuple(order) in seen and len(seen) < n_distinct:
            continue
        seen.add(tuple(order))
        orders.append(order)
    return orders


def check_orders(orders: Sequence[Sequence[str]], tasks: Sequence[str]) -> list[list[str]]:
    """Validate user-given orders: each names known tasks, each task at most once."""
    known = set(tasks)
    checked = []
    for k, order in enumerate(orders):
        order = list(order)
        unknown = [t for t in order if t not in known]
        if unknown:
            raise CmergeError(f"order {k} names unknown task {unknown[0]!r}; known tasks are {sorted(known)}.")
        if len(set(order)) != len(order) or not order:
            raise CmergeError(f"order {k} must name at least one task and each task at most once, got {order}.")
        checked.append(order)
    if not checked:
        raise CmergeError("give at least one task order.")
    return checked
