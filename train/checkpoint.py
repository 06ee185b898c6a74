"""Checkpoints: written atomically, loadable with `torch.load(weights_only=True)`.

A checkpoint holds only tensors and plain Python values (the config as a dict), so loading never
executes code from the file.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from pipeline.atomic import tmp_name
from pipeline.errors import DataError


def save(path: Path, state: dict) -> None:
    tmp = tmp_name(path)
    try:
        torch.save(state, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path}: no such checkpoint. Pass a run directory made by `iccl train`.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types; all mean the same to the user
        raise DataError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e}). "
                        f"It may be truncated; an earlier one may still be in the run directory.") from e
