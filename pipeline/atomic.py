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


def tmp_name(path: Path) -> Path:
    """The temporary name a file is written under before it is renamed into place."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open `path` for writing so that it only appears, complete, when the block exits cleanly."""
    path = Path(path)
    tmp = tmp_name(path)
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


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
