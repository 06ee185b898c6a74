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
