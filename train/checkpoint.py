"""Checkpoints: written atomically, loadable with `torch.load(weights_only=True)`; and the stop
signals that make the trainer save one before it exits.

A checkpoint holds only tensors and plain Python values (the config as a dict), so loading never
executes code from the file.

`stop_signals()` turns SIGINT (Ctrl-C) and SIGTERM (`kill`, a batch scheduler's time limit,
torchrun stopping its workers) into a request that the training loop sees after the step in
flight: it saves that step, then raises `TrainingInterrupted`, so an interrupted run loses
nothing and its rerun resumes from the step it stopped at. A second signal stops at once.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
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


class TrainingInterrupted(KeyboardInterrupt):
    """Raised by the training loop after saving, when a stop signal arrived."""


_stop_signal: str | None = None


def stop_requested() -> str | None:
    """The name of the stop signal received ('SIGINT', 'SIGTERM'), or None."""
    return _stop_signal


@contextmanager
def stop_signals():
    """Within this block SIGINT / SIGTERM request a stop instead of killing the process (see the
    module docstring). Only the main thread may install signal handlers; elsewhere it does nothing."""
    global _stop_signal
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def request(signum, frame):
        global _stop_signal
        if _stop_signal is not None:  # the second signal: stop now, without saving
            raise KeyboardInterrupt
        _stop_signal = signal.Signals(signum).name

    previous = {sig: signal.signal(sig, request) for sig in (signal.SIGINT, signal.SIGTERM)}
    _stop_signal = None
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _stop_signal = None
