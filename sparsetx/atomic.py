"""Whole-or-nothing writes: a reader sees the old file or folder or the complete new one, never a half."""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_RENAME_EXCHANGE = 2   # linux/fs.h


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic rename (Linux renameat2 RENAME_EXCHANGE); False where the
    system or file system cannot (the caller then falls back to two renames)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    if ctypes.get_errno() in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(ctypes.get_errno(), f"cannot swap {a} and {b}: {os.strerror(ctypes.get_errno())}")


class FolderInUse(OSError):
    """Another process is writing the same output folder."""


@contextmanager
def out_lock(folder: str | os.PathLike) -> Iterator[None]:
    """Hold ``folder``'s writer lock (``.NAME.lock`` beside it, an exclusive ``flock``) for the
    block; a second process asking for it gets :class:`FolderInUse` at once instead of writing
    into the same folder. The kernel drops the lock when the holder dies: no stale locks."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    lock = folder.with_name(f".{folder.name}.lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise FolderInUse(f"{folder} is being written by another sparsetx process (pid {holder}); "
                              "wait for it or pick another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)   # releases the lock; the empty lock file stays (removing it would race)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` (same suffix, so writers that go by it still do) that
    replaces ``path`` when the block completes; on an error nothing is left behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb") as fh:   # on disk before it takes the name
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for f in folder.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(folder)


def recover_dir(folder: str | os.PathLike) -> None:
    """Tidy up after :func:`atomic_dir` writes of ``folder`` that were killed: a kill between its
    two renames leaves the previous folder moved aside, which is put back; unfinished temporaries
    and old copies are deleted. Afterwards ``folder`` is the last complete write (or absent)."""
    folder = Path(folder)
    if not folder.parent.exists():
        return
    olds = sorted(folder.parent.glob(f".{folder.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if not folder.exists() and olds:
        os.replace(olds.pop(), folder)
    for leftover in [*olds, *folder.parent.glob(f".{folder.name}.tmp-*")]:
        shutil.rmtree(leftover, ignore_errors=True)


@contextmanager
def atomic_dir(folder: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder beside ``folder`` to fill; when the block completes its files are
    fsync'd and it takes ``folder``'s place: swapped with an existing folder in one atomic rename
    (:func:`exchange`), or where the file system cannot, by two renames (the old folder moved
    aside, then deleted). On an error ``folder`` is as it was and the temporary is removed; after
    a kill, :func:`recover_dir` restores the last complete folder and deletes the leftovers."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            f.chmod(0o755 if f.is_dir() else 0o644)
        tmp.chmod(0o755)
        _fsync_tree(tmp)
        if folder.exists() and exchange(tmp, folder):   # one atomic swap; tmp now holds the old folder
            _fsync_dir(folder.parent)
        elif folder.exists():
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
            _fsync_dir(folder.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
