"""Metrics as JSON lines in the run directory (one object per line, appended; only rank 0 writes),
and optionally (`--set tensorboard=true`) the same numbers as TensorBoard events in RUN/tensorboard.

TensorBoard tags and x-axes (its steps are integers):
    STAGE/loss, STAGE/lr, STAGE/images_per_s   per logged step; x = optimiser steps in the stage
                                               (epoch · steps per epoch + step)
    STAGE/epoch_loss                           x = epochs completed in the stage
    STAGE/eval/top1, .../many, /medium, /few   x = epochs completed in the stage
"""
from __future__ import annotations

import importlib.util
import json
import math
import time
from pathlib import Path

from pipeline.errors import DataError

_STEP_SCALARS = ("loss", "lr", "images_per_s")
_EVAL_SCALARS = ("top1", "many", "medium", "few")


class MetricsLog:
    def __init__(self, path: Path, enabled: bool = True, tensorboard_dir: Path | None = None):
        self.path, self.enabled = path, enabled
        self.tensorboard_dir = tensorboard_dir
        self._writer = None
        if enabled and tensorboard_dir is not None and importlib.util.find_spec("tensorboard") is None:
            raise DataError("--set tensorboard=true needs the tensorboard package: `pip install tensorboard` "
                            "(or `pip install -e .` in this project), or drop the setting.")

    def write(self, **record) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=_plain) + "\n")
        if self.tensorboard_dir is not None:
            self._write_events(record)

    def _write_events(self, record: dict) -> None:
        stage, epoch = record.get("stage", "run"), record.get("epoch")
        if epoch is None:
            return  # bookkeeping lines (e.g. the centroid check) have no place on a curve
        event = record.get("event")
        if event is None and "step" in record:
            scalars = {f"{stage}/{k}": record[k] for k in _STEP_SCALARS if k in record}
            x = epoch * int(record.get("steps", 0)) + int(record["step"])
        elif event == "epoch":
            scalars, x = {f"{stage}/epoch_loss": record.get("loss")}, epoch + 1
        elif event == "eval":
            scalars = {f"{stage}/eval/{k}": record.get(k) for k in _EVAL_SCALARS}
            x = epoch + 1
        else:
            return
        writer = self._tensorboard()
        for tag, value in scalars.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                writer.add_scalar(tag, value, global_step=x, walltime=record["time"])
        if event is not None:  # epoch ends and evaluations are rare: make them visible at once
            writer.flush()

    def _tensorboard(self):
        if self._writer is None:
            # Imported on first use: tensorboard is only needed when the setting is on.
            from torch.utils.tensorboard import SummaryWriter
            self._writer = SummaryWriter(log_dir=str(self.tensorboard_dir))
        return self._writer

    def close(self) -> None:
        """Flush and close the TensorBoard writer, if any (the JSON lines need nothing)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _plain(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if hasattr(v, "tolist"):
        return v.tolist()
    return str(v)


def read(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
