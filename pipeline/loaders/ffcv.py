"""FFCV loaders: the split's `.beton` (fields `image`, `label`) read in our samplers' order.

One FFCV `Loader` serves both streams: its traversal order (`_StepOrder`) is, step after step, the
uniform stream's indices followed by the class-aware stream's, and its batch is both together,
so every FFCV batch is exactly one training step, split in two on the way out. One loader means
one pool of `workers` JIT-compiled threads gets the whole CPU budget (two loaders would compete
for the cores), and the two halves of a step can never drift apart.

Augmentation:
- pad_crop (32-px data): FFCV hands out the stored pixels (`SimpleRGBImageDecoder`); the crop and
  flip are `pipeline.augment.pad_crop_flip` with the step's generator, so the crops and flips are
  those of every other loader and are reproduced exactly on resume. (FFCV's `RandomTranslate`
  would do the same job with its own, unseeded randomness, and only for crop size = image size.)
- rrc: FFCV's `RandomResizedCropRGBImageDecoder` (torchvision's box rule; full decode, OpenCV
  area resize), then `FlipJitter`: flip and, with jitter, brightness / contrast / saturation
  factors in [1 - jitter, 1 + jitter] with torchvision's blends, fused in one in-place pass
  (FFCV's own flip and jitter operations copy each image per operation: 2-3x slower here).
  These draw from numba's unseeded generator inside FFCV's threads: the sample ORDER is resumed
  exactly, the crops, flips and jitter are not (FFCV's operations see no step number to seed by).

The `.beton` is written from decoded pixels (`pipeline.ffcv_writer`), so it holds no undecodable
image: `skipped` stays 0. Batches are copied out of FFCV's buffers, which it reuses as soon as the
next batch is requested, so the caller owns what it gets, as with every other loader.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

import numpy as np
import torch
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import (CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder,
                                   SimpleRGBImageDecoder)
from ffcv.loader import Loader, OrderOption
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.state import State
from ffcv.transforms import ToDevice, ToTensor, ToTorchImage
from ffcv.traversal_order.base import TraversalOrder

from pipeline.augment import (STREAM_CLASS_AWARE, STREAM_UNIFORM, pad_crop_flip, sampler_streams,
                              step_generator)
from pipeline.dataset import ShardedSplit
from pipeline.errors import DataError
from pipeline.format import beton_name
from pipeline.loaders.base import AugmentSpec, Batch, EvalLoader, EvalSpec, TrainLoader
from pipeline.samplers import ClassAwareSampler, UniformSampler, eval_indices

PREFETCH = 2  # batches FFCV prepares while the trainer works on the current one
# The JIT-compiled code of every FFCV loader made in this process. numba's finaliser fails (a
# KeyError, which on CPython 3.11 can even surface as a SystemError in unrelated code) when it
# frees a function FFCV compiled more than once, as every loader recompiles its decoder; numba
# does not give the memory back anyway, so keeping the code costs nothing measurable.
_COMPILED: list = []


def beton_path(split: ShardedSplit):
    """The split's FFCV file, with a clear error (and the fix) when it was not written."""
    path = split.root / beton_name(split.split)
    if not path.is_file():
        raise DataError(f"{path}: no FFCV file for split {split.split!r}. Rerun the same "
                        f"`iccl convert ... --ffcv` to add it, or choose another --loader.")
    return path


class _StepOrder(TraversalOrder):
    """Our samplers as an FFCV traversal order: for each step from `start`, the indices of each
    stream in turn, so that FFCV batches of (streams x per-rank batch) are the training steps.

    FFCV (1.0.2) instantiates a custom order by calling it with the loader, `order(loader)`, so
    an instance binds itself here. FFCV also sizes `len(loader)` from the order it sees at
    construction; `start` is 0 then, so that is the full epoch and later, shorter (resumed)
    orders are never truncated."""

    def __init__(self, streams: list, steps: int):
        self.streams, self.steps, self.start = streams, steps, 0

    def __call__(self, loader) -> "_StepOrder":
        super().__init__(loader)
        return self

    def sample_order(self, epoch: int) -> np.ndarray:
        return np.concatenate([s.batch(epoch, step) for step in range(self.start, self.steps)
                               for s in self.streams]).astype(np.uint64)


def _contrast_lut(counts, bright, contrast, num_pixels):
    """Brightness then contrast of one image as a 256-entry table (both act on each channel value
    alone, once the mean is known): v -> clamp(m + contrast * (min(v * bright, 255) - m)), with m
    the mean grey level of the brightened image, computed from per-channel histograms `counts`."""
    mean = 0.0
    for v in range(256):
        mean += min(v * bright, 255.0) * (0.299 * counts[0, v] + 0.587 * counts[1, v] + 0.114 * counts[2, v])
    mean /= num_pixels
    lut = np.empty(256, np.float32)
    for v in range(256):
        lut[v] = min(max(mean + contrast * (min(v * bright, 255.0) - mean), 0.0), 255.0)
    return lut


def _saturate(r, g, b, saturation):
    """Saturation about the pixel's ITU-601 grey, clamped and rounded."""
    grey = np.float32(0.299) * r + np.float32(0.587) * g + np.float32(0.114) * b
    return (np.uint8(min(max(grey + saturation * (r - grey), 0.0), 255.0) + 0.5),
            np.uint8(min(max(grey + saturation * (g - grey), 0.0), 255.0) + 0.5),
            np.uint8(min(max(grey + saturation * (b - grey), 0.0), 255.0) + 0.5))


class FlipJitter(Operation):
    """Horizontal flip (p = 0.5) and colour jitter, fused and in place, in FFCV's threads.

    FFCV's RandomHorizontalFlip and Random{Brightness,Contrast,Saturation} each copy every image
    into a new buffer, with float temporaries, and together cost more than the decode of a 224-px
    crop. This does torchvision's blends (brightness, contrast about the mean grey level,
    saturation about each pixel's grey, clamped after each) in the decoder's buffer: a histogram
    pass gives the mean, brightness and contrast become a lookup table, and pixels are taken in
    mirrored pairs so the flip costs nothing extra; an image neither flipped nor jittered is not
    touched. Flips and factors come from numba's generator, as in FFCV's own operations."""

    def __init__(self, flip: bool, jitter: float):
        super().__init__()
        self.flip, self.jitter = flip, jitter

    def generate_code(self):
        my_range = Compiler.get_iterator()
        contrast_lut, saturate = Compiler.compile(_contrast_lut), Compiler.compile(_saturate)
        flip, jitter = self.flip, self.jitter > 0
        low, high = max(0.0, 1 - self.jitter), 1 + self.jitter

        def flip_jitter(images, _):
            n, h, w, _c = images.shape
            flips = np.random.rand(n) < (0.5 if flip else 0.0)
            factors = np.random.uniform(low, high, (n, 3))
            for i in my_range(n):
                if not (jitter or flips[i]):
                    continue
                lut = np.arange(256).astype(np.float32)
                saturation = np.float32(factors[i, 2])
                if jitter:
                    counts = np.zeros((3, 256), np.int64)
                    for y in range(h):
                        for x in range(w):
                            for ch in range(3):
                                counts[ch, images[i, y, x, ch]] += 1
                    lut = contrast_lut(counts, factors[i, 0], factors[i, 1], h * w)
                for y in range(h):
                    for x in range((w + 1) // 2):
                        m = w - 1 - x  # the mirrored column
                        p0, p1, p2 = images[i, y, x, 0], images[i, y, x, 1], images[i, y, x, 2]
                        q0, q1, q2 = images[i, y, m, 0], images[i, y, m, 1], images[i, y, m, 2]
                        if jitter:
                            p0, p1, p2 = saturate(lut[p0], lut[p1], lut[p2], saturation)
                            q0, q1, q2 = saturate(lut[q0], lut[q1], lut[q2], saturation)
                        if flips[i]:
                            p0, p1, p2, q0, q1, q2 = q0, q1, q2, p0, p1, p2
                        images[i, y, x, 0], images[i, y, x, 1], images[i, y, x, 2] = p0, p1, p2
                        images[i, y, m, 0], images[i, y, m, 1], images[i, y, m, 2] = q0, q1, q2
            return images

        flip_jitter.is_parallel = True
        return flip_jitter

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, None]:
        return replace(previous_state, jit_mode=True), None


def _image_ops(spec: Optional[AugmentSpec], device: torch.device, eval_spec: Optional[EvalSpec] = None):
    """FFCV's image pipeline: decode (+ crop / resize / flip / jitter), to a torch NCHW view of
    the NHWC buffer (channels_last), on `device`."""
    if eval_spec is not None:
        ops = [CenterCropRGBImageDecoder((eval_spec.size, eval_spec.size), eval_spec.size / eval_spec.resize)]
    elif spec.kind == "pad_crop":
        ops = [SimpleRGBImageDecoder()]  # crop and flip follow in torch (module docstring)
    else:
        ops = [RandomResizedCropRGBImageDecoder((spec.size, spec.size), spec.scale, spec.ratio)]
        if spec.flip or spec.jitter > 0:
            ops.append(FlipJitter(spec.flip, spec.jitter))
    ops.append(ToTensor())
    if device.type == "cuda":
        ops.append(ToDevice(device, non_blocking=True))
    return ops + [ToTorchImage(channels_last=True, convert_back_int16=False)]


def _ffcv_loader(path, **kwargs) -> Loader:
    """An FFCV Loader whose compiled code is kept (see `_COMPILED`). Note that FFCV also sets
    torch's intra-op thread count to its `num_workers`, process-wide, at every epoch."""
    loader = Loader(str(path), os_cache=True, batches_ahead=PREFETCH, **kwargs)
    _COMPILED.append(loader.code)
    return loader


def _label_ops(device: torch.device):
    return [IntDecoder(), ToTensor()] + ([ToDevice(device, non_blocking=True)] if device.type == "cuda" else [])


class FfcvLoader(TrainLoader):
    """Two-stream training loader on one FFCV `Loader` (see the module docstring)."""

    name = "ffcv"

    def __init__(self, split: ShardedSplit, *, uniform: Optional[UniformSampler],
                 class_aware: Optional[ClassAwareSampler], augment: AugmentSpec, seed: int,
                 steps_per_epoch: int, rank: int = 0, world_size: int = 1, device="cpu",
                 workers: int = 2):
        super().__init__(steps_per_epoch=steps_per_epoch)
        self._streams = sampler_streams("FfcvLoader", augment, uniform, class_aware)
        self.augment, self.seed, self.rank = augment, seed, rank
        self.device = torch.device(device)
        self._batch = self._streams[0][0].local_batch
        self._order = _StepOrder([s for s, _ in self._streams], steps_per_epoch)
        self._loader = _ffcv_loader(beton_path(split), batch_size=self._batch * len(self._streams),
                                    num_workers=max(1, workers), order=self._order, drop_last=True,
                                    seed=seed, pipelines={"image": _image_ops(augment, self.device),
                                                          "label": _label_ops(self.device)})

    def _batches(self, start_step: int):
        epoch = self.epoch
        self._order.start, self._loader.next_epoch = start_step, epoch
        for step, (x, y) in enumerate(self._loader, start=start_step):
            y, got = y.reshape(-1), {}
            for k, (_, stream) in enumerate(self._streams):
                part = slice(k * self._batch, (k + 1) * self._batch)
                got[stream] = (self._augment(x[part], epoch, step, stream), y[part].clone())
            x_a, y_a = got.get(STREAM_UNIFORM, (None, None))
            x_c, y_c = got.get(STREAM_CLASS_AWARE, (None, None))
            yield Batch(x_a, y_a, x_c, y_c)

    def _augment(self, x: torch.Tensor, epoch: int, step: int, stream: int) -> torch.Tensor:
        """pad_crop in torch with the step's generator (a new tensor); rrc was done by FFCV and
        only needs copying out of its buffer."""
        if self.augment.kind != "pad_crop":
            return x.clone(memory_format=torch.channels_last)
        gen = step_generator(self.seed, epoch, step, self.rank, stream)
        return pad_crop_flip(x, self.augment.pad, gen, size=self.augment.size, flip=self.augment.flip)

    def close(self) -> None:
        self._loader = None


class FfcvEvalLoader(EvalLoader):
    """Evaluation from the `.beton`: centre crop of side size/resize x the shorter side, resized
    to `size` (= resize the shorter side to `resize`, centre crop `size`); this rank's shard once,
    in order."""

    name = "ffcv"

    def __init__(self, split: ShardedSplit, *, spec: EvalSpec, batch_size: int, rank: int = 0,
                 world_size: int = 1, device="cpu", workers: int = 2):
        super().__init__(indices=eval_indices(len(split), rank, world_size), batch_size=batch_size)
        self.device = torch.device(device)
        self.skipped = 0
        self._loader = None
        if len(self.indices):  # FFCV cannot make a loader of no samples (a rank may have none)
            self._loader = _ffcv_loader(beton_path(split), batch_size=batch_size,
                                        num_workers=max(1, workers), order=OrderOption.SEQUENTIAL,
                                        indices=self.indices, drop_last=False,
                                        pipelines={"image": _image_ops(None, self.device, spec),
                                                   "label": _label_ops(self.device)})

    def __iter__(self):
        for x, y in self._loader or ():
            yield Batch(x.clone(memory_format=torch.channels_last), y.reshape(-1).clone(), None, None)

    def close(self) -> None:
        self._loader = None
