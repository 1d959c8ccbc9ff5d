"""Sharing benchmark work between processes: one lock file per unit of work.

Several ``cmerge bench`` runs on one folder (or one cache) split the sweeps, each row's
orders and the continual fine-tuning orders between them through :func:`claim_each`.
"""
from __future__ import annotations

import fcntl
from pathlib import Path
from typing import Callable, Iterator, Sequence, TypeVar

T = TypeVar("T")


def claim_each(items: Sequence[T], lock_path: Callable[[T], Path], *, wait: bool = True) -> Iterator[T]:
    """Yield each item once, while holding its lock file (``lock_path(item)``).

    First the items no other process holds (non-blocking), then, waiting, the rest: so
    runs started together split the work, and an item whose process died is taken over.
    ``wait=False`` stops after the first pass (the held items are not yielded). The
    caller re-checks under the claim whether the item is done already.
    """
    yielded: set[int] = set()
    for blocking in ((False, True) if wait else (False,)):
        for i, item in enumerate(items):
            if i in yielded:
                continue
            with open(lock_path(item), "a") as lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
                except BlockingIOError:
                    continue
                yielded.add(i)
                yield item
