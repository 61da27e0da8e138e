"""Atomic, durable writes: every stage output appears whole or not at all, and stays.

A file is written to a temporary sibling and renamed over the target (rename is
atomic on POSIX within a filesystem). A folder is built in a temporary sibling and
swapped in, so a reader never sees a half-built folder and a failed stage leaves the
previous state (or nothing) behind.

Rename alone is atomic but not durable: after a power loss or a kernel crash the
rename can be on disk while the renamed file's data is not (an empty or zero-filled
file under the final name), or the rename itself can be lost. So the temporary file
(every file and folder of a temporary tree) is fsynced before the rename, and the
parent folder after it (POSIX: the rename is recorded in the folder). `fsync_file`,
`fsync_dir` and `fsync_tree` are the helpers for code that renames things itself.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipelines.errors import DataError


def fsync_file(path: Path | str) -> None:
    """Flush a file's data and metadata to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path | str) -> None:
    """Flush a folder's entries (the names created, renamed or removed in it) to disk."""
    if os.name != "posix":  # folders cannot be opened for fsync elsewhere; NTFS journals renames
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as error:
        # a few filesystems (some FUSE and network mounts) cannot sync a folder; the data is synced
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def fsync_tree(path: Path | str) -> None:
    """fsync a file, or every file and folder under a folder (deepest first), symlinks excluded."""
    path = Path(path)
    if path.is_symlink():
        return
    if not path.is_dir():
        fsync_file(path)
        return
    for root, dirs, files in os.walk(path, topdown=False):
        for name in files:
            child = os.path.join(root, name)
            if not os.path.islink(child):
                fsync_file(child)
        for name in dirs:
            child = os.path.join(root, name)
            if not os.path.islink(child):
                fsync_dir(child)
    fsync_dir(path)


@contextlib.contextmanager
def atomic_path(target: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it is renamed to `target`.

    Works for files and folders alike: the caller creates whatever it likes at the
    yielded path. What was written there is fsynced before the rename and the parent
    folder after it. On an exception the temporary path is removed and `target` is
    left untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    tmp = tmp_dir / target.name
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written to {tmp} for {target}")
        fsync_tree(tmp)
        if tmp.is_dir():
            _swap_dir(tmp, target)
        else:
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(tmp, target)
        fsync_dir(target.parent)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _swap_dir(new: Path, target: Path) -> None:
    old = None
    if target.exists() or target.is_symlink():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path | str, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: Path | str, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def atomic_copy(source: Path | str, target: Path | str) -> None:
    """Copy a file (with its mode and times) so that `target` is replaced whole."""
    with atomic_path(target) as tmp:
        shutil.copy2(source, tmp)


def remove_outputs(*paths: Path | str) -> None:
    """Delete stage outputs (files or folders) so a failed stage leaves none behind."""
    for path in map(Path, paths):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def write_parquet(frame: Any, path: Path | str) -> None:
    """Write a pandas DataFrame to Parquet atomically."""
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


def read_parquet(path: Path | str, produced_by: str) -> Any:
    """Read a stage output, or say which stage makes it when it is missing."""
    import pandas as pd


    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} not found; run `llmops {produced_by}` (or `dvc repro {produced_by}`) first")
    return pd.read_parquet(path)
