"""File-system helpers every writer of cmerge shares: atomic replacement and locks.

- :func:`atomic_write` replaces a file by writing a unique temporary file beside it,
  fsyncing it and renaming it over the target, then fsyncing the folder: a reader sees
  the old file or the new one, never a part, whatever instant the process is killed.
- :func:`locked` takes a lock on a lock file with ``filelock`` (``exclusive`` or shared),
  either failing at once with one sentence or waiting.
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import filelock

from .errors import CmergeError


def fsync_dir(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    """Replace ``path`` with ``data`` atomically (unique temporary file, fsync, rename, fsync of the folder)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write(path, json.dumps(data, indent=2) + "\n")


def is_temporary(path: Path, target_name: str) -> bool:
    """Whether ``path`` is a temporary file :func:`atomic_write` left for ``target_name`` (killed mid-write)."""
    return path.name.startswith(f".{target_name}.") and path.name.endswith(".tmp")


@contextmanager
def locked(lock_file: str | os.PathLike, busy: str, *, exclusive: bool = True,
           wait: bool = False) -> Iterator[None]:
    """Hold a lock on ``lock_file`` for the block: exclusive (a writer) or shared (readers together).

    Readers share the lock with each other and exclude writers. If it is taken, wait
    (``wait=True``) or raise CmergeError with the sentence ``busy``.
    """
    lock = filelock.ReadWriteLock(str(lock_file), is_singleton=False)
    try:
        acquire = lock.acquire_write if exclusive else lock.acquire_read
        try:
            acquire(blocking=wait, timeout=-1 if wait else 0)
        except filelock.Timeout:
            raise CmergeError(busy) from None
        try:
            yield
        finally:
            lock.release()
    finally:
        lock.close()
