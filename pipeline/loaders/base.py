"""The interface every loader implements: two index streams in, device batches of uint8 images out.

Images leave a loader as uint8, shape (N, 3, H, W) in channels_last memory (an NHWC buffer viewed
as NCHW), on the training device; conversion to float, normalisation and mixing happen on the
device in `pipeline.mixing`, fused, so the host never touches float pixels.

Randomness (sample order, class-aware draws, crops, flips) is a pure function of
(seed, epoch, step, rank), so a run resumed mid-epoch sees exactly the batches it would have seen.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, NamedTuple, Optional

import torch


class Batch(NamedTuple):
    """One training step's data on the device. A stream that was not requested is None."""
    x_a: Optional[torch.Tensor]  # uniform (class-agnostic) stream, uint8 (N, 3, H, W) channels_last
    y_a: Optional[torch.Tensor]  # int64 (N,)
    x_c: Optional[torch.Tensor]  # class-aware stream
    y_c: Optional[torch.Tensor]


@dataclass(frozen=True)
class AugmentSpec:
    """Training augmentation, identical in meaning for every loader.

    kind "pad_crop" (32-px data, the CIFAR recipe): pad `pad` pixels (zeros) on each side, random
    `size` x `size` crop, horizontal flip with p = 0.5.
    kind "rrc" (larger images, the ImageNet recipe): random resized crop with `scale` and `ratio`
    ranges to `size` x `size` (bilinear), horizontal flip with p = 0.5, then colour jitter of
    brightness / contrast / saturation by factors drawn uniformly in [1 - jitter, 1 + jitter]
    when `jitter` > 0.
    """
    kind: str = "pad_crop"
    size: int = 32
    pad: int = 4
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    jitter: float = 0.0


@dataclass(frozen=True)
class EvalSpec:
    """Deterministic evaluation transform: resize the shorter side to `resize`, centre crop `size`
    (for 32-px data: `resize` = `size` = 32, i.e. the image as stored)."""
    size: int = 32
    resize: int = 32


class TrainLoader:
    """Base of all training loaders (see module docstring). Subclasses implement `_batches`."""

    name = "base"

    def __init__(self, *, steps_per_epoch: int):
        self.steps_per_epoch = steps_per_epoch
        self.epoch = 0
        self.start_step = 0
        self.skipped = 0  # corrupt images met and replaced (never crash a long run)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.start_step, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        """Resume: the next iteration starts at (epoch, step)."""
        self.epoch, self.start_step = int(state["epoch"]), int(state["step"])
        self.skipped = int(state.get("skipped", 0))

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[Batch]:
        start, self.start_step = self.start_step, 0
        return self._batches(start)

    def _batches(self, start_step: int) -> Iterator[Batch]:
        raise NotImplementedError

    def close(self) -> None:
        """Release workers / pipelines. Safe to call twice."""


class EvalLoader:
    """Base of evaluation loaders: every sample of this rank's shard (`indices`, from
    `pipeline.samplers.eval_indices`) exactly once, in that order, as
    Batch(x_a=images, y_a=labels, x_c=None, y_c=None) with images transformed by an EvalSpec.
    Subclasses implement `__iter__`."""

    name = "base"

    def __init__(self, *, indices, batch_size: int):
        self.indices = indices
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        raise NotImplementedError

    def close(self) -> None:
        """Release workers / pipelines. Safe to call twice."""
