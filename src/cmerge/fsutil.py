"""File-system helpers every writer of cmerge shares: atomic replacement and locks.

- :func:`atomic_write` replaces a file by writing a unique temporary file beside it,
  fsyncing it and renaming it over the target, then fsyncing the folder: a reader sees
  the old file or the new one, never a part, whatever instant the process is killed.
- :func:`locked` takes a lock on a lock file with ``filelock`` (``exclusive`` or shared),
  either failing at once with one sentence or waiting.
- :func:`new_folder` builds a new folder in ``FOLDER.partial`` and renames it into place, so
  the folder is absent or complete at any instant.
- :func:`cached_folder` does the same for a cache entry that several processes may ask for at
  once: one builds it, the others wait for it and then use it.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

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


def check_new_folder(folder: Path, what: str = "output folder") -> None:
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise CmergeError(f"{folder} already exists and is not empty; choose a new {what}.")


@contextmanager
def new_folder(folder: str | os.PathLike, busy: str, what: str = "output folder") -> Iterator[Path]:
    """Build ``folder`` in ``FOLDER.partial`` (yielded) and rename it into place when the block ends.

    One process at a time (a lock beside the folder; ``busy`` is the sentence for the others);
    the ``.partial`` folder of a killed predecessor is removed first; if the block raises, the
    partial folder is removed and ``folder`` stays absent. A killed process leaves ``folder``
    absent or whole.
    """
    folder = Path(folder)
    check_new_folder(folder, what)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with locked(folder.parent / f".{folder.name}.cmerge-lock", busy):
        check_new_folder(folder, what)  # again under the lock: a concurrent writer may have just finished
        tmp = folder.with_name(folder.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)  # a killed writer's (we hold the lock, so none is running)
        tmp.mkdir()
        try:
            yield tmp
            fsync_dir(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if folder.exists():
            folder.rmdir()
        os.replace(tmp, folder)
        fsync_dir(folder.parent)


def cached_folder(folder: str | os.PathLike, build: Callable[[Path], None], ready: Callable[[Path], bool]) -> Path:
    """The cache entry ``folder``: returned as it is if ``ready(folder)``, else built once.

    ``build(tmp)`` fills ``FOLDER.partial``, which is renamed into place. Processes asking for
    the same entry wait on a lock beside it, and the ones that waited find it ready. A killed
    builder leaves no ``folder`` (its ``.partial`` is removed by the next one); an entry that is
    there but not ready (an older format) is removed and built again.
    """
    folder = Path(folder)
    if ready(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with locked(folder.parent / f".{folder.name}.cmerge-lock", "", wait=True):
        if ready(folder):  # built by the process this one waited for
            return folder
        shutil.rmtree(folder, ignore_errors=True)
        tmp = folder.with_name(folder.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            build(tmp)
            fsync_dir(tmp)
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        fsync_dir(folder.parent)
    return folder
