"""Checkpoints: written atomically, loadable with `torch.load(weights_only=True)`.

A checkpoint holds only tensors and plain Python values (the config as a dict), so loading never
executes code from the file.
"""
from __future__ import annotations

from pathlib import Path

import torch

from pipeline.atomic import atomic_path
from pipeline.errors import DataError


def save(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path}: no such checkpoint. Pass a run directory made by `iccl train`.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types; all mean the same to the user
        raise DataError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e}). "
                        f"It may be truncated; an earlier one may still be in the run directory.") from e
