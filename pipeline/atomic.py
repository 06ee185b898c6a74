"""Atomic file writes: write to a temporary name in the same folder, fsync, then rename.

A crash at any moment leaves either the old complete file or the new complete file, never a
half-written one that looks complete.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

from pipeline.errors import DataError


def tmp_name(path: Path) -> Path:
    """The temporary name a file is written under before it is renamed into place."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary name for a writer that takes a file name (torch.save, FFCV's writer): write the
    file there inside the block; on a clean exit it is fsynced and renamed to `path`, on an error
    removed. The one implementation of atomic writes in the project."""
    path = Path(path)
    tmp = tmp_name(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open `path` for writing so that it only appears, complete, when the block exits cleanly."""
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f


def output_dir(path: str | os.PathLike, flag: str = "--out", probe: bool = True) -> Path:
    """Create folder `path` (and its parents) for output and, with `probe`, check that a file can
    be written in it. DataError naming `flag`, the path and the fix when it cannot: an existing
    file in the way, a read-only filesystem, missing permissions."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DataError(f"{flag} {path}: is a file, not a folder. Choose a new or existing folder.")
    try:
        path.mkdir(parents=True, exist_ok=True)
        if probe:  # one name per process: the ranks of a multi-process run probe the same folder
            with atomic_open(path / f".write-probe-{os.getpid()}"):
                pass
            (path / f".write-probe-{os.getpid()}").unlink()
    except OSError as e:
        raise DataError(f"{flag} {path}: cannot write there ({e.strerror or e}). Choose a folder on a "
                        f"writable filesystem where you have write permission.") from e
    return path


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


def remove_stale_tmp(folder: Path) -> None:
    """Delete temporary files a killed process left behind (they are never complete)."""
    for p in folder.glob(".*.tmp-*"):
        p.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `path` to fill; when the block exits cleanly it is renamed to
    `path`, so `path` only ever holds a complete set of files. An existing `path` must be empty
    unless `replace` (then the old folder is removed once the new one is in place). On an error
    the temporary folder is removed and `path` is left as it was."""
    import shutil
    path = Path(path)
    tmp = tmp_name(path)
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for f in tmp.rglob("*"):  # on disk before the rename makes them visible
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if path.exists() and replace and any(path.iterdir()):
            os.replace(path, old)
        os.replace(tmp, path)  # onto a missing or empty folder: one atomic rename
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
