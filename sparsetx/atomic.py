"""Whole-or-nothing writes: a reader sees the old file or folder or the complete new one, never a half."""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` (same suffix, so writers that go by it still do) that
    replaces ``path`` when the block completes; on an error nothing is left behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_tree(folder: Path) -> None:
    for f in folder.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    fsync'd and it takes ``folder``'s place by renames (an existing folder is first moved aside,
    then deleted). On an error ``folder`` is as it was and the temporary is removed; after a kill,
    :func:`recover_dir` restores the last complete folder."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            f.chmod(0o755 if f.is_dir() else 0o644)
        tmp.chmod(0o755)
        _fsync_tree(tmp)
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
