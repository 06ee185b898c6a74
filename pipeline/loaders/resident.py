"""The resident loader: decode the whole split once into one uint8 tensor on the device.

For datasets whose decoded pixels fit a memory budget (CIFAR: 50k x 32 x 32 x 3 = 150 MiB), the
airbench approach: after a one-time decode, a training step is a handful of batched tensor ops on
the device, with no workers and no host work beyond drawing the indices and crop parameters.

Train data is stored already zero-padded for pad_crop, so selecting the batch, cropping and
flipping are one gather (`pipeline.augment.crop_flip_gather`). rrc is supported too (gather, then
one `grid_sample` crop-resize; no antialiasing when a crop is shrunk, unlike the reference
loader's Pillow resize), which suits small stored images; large ones do not fit the budget anyway.
Pixels are kept in memory only (nothing is cached next to the dataset).
"""
from __future__ import annotations

import struct
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np
import simplejpeg
import torch

from pipeline import codecs
from pipeline.augment import (STREAM_CLASS_AWARE, STREAM_UNIFORM, color_jitter, crop_flip_gather,
                              draw_params, nchw, resized_crop, step_generator, to_u8)
from pipeline.dataset import ShardedSplit
from pipeline.device import is_cuda, upload
from pipeline.errors import DataError
from pipeline.loaders.base import AugmentSpec, Batch, EvalLoader, EvalSpec, TrainLoader
from pipeline.loaders.reference import decode_or_replace, eval_transform, try_decode
from pipeline.progress import progress
from pipeline.samplers import ClassAwareSampler, UniformSampler, eval_indices, step_indices

DEFAULT_BUDGET_BYTES = 2 << 30  # decoded pixels held on the device (or in host memory on the CPU)
_GPU_SHARE = 8  # at most 1/8 of a GPU's memory: the model and its activations need the rest
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHUNK = 256  # images per decode task: large enough to amortise scheduling, small for a smooth bar


def resident_budget(device) -> int:
    """Bytes of decoded pixels the resident loaders may hold on `device` by default."""
    device = torch.device(device)
    if is_cuda(device):
        return min(DEFAULT_BUDGET_BYTES, torch.cuda.get_device_properties(device).total_memory // _GPU_SHARE)
    return DEFAULT_BUDGET_BYTES


def stored_size(split: ShardedSplit, i: int) -> Optional[tuple[int, int]]:
    """(height, width) of sample i from its header alone, without decoding; None when the header
    is unreadable (a corrupt image, which decoding will replace)."""
    data = split.encoded(i)
    if split.ext(i) == "png":
        if bytes(data[:8]) != _PNG_SIGNATURE or bytes(data[12:16]) != b"IHDR":
            return None
        width, height = struct.unpack(">II", bytes(data[16:24]))  # IHDR follows the signature
        return int(height), int(width)
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    return int(height), int(width)


def common_size(split: ShardedSplit, pad: int = 0,
                budget_bytes: int = DEFAULT_BUDGET_BYTES) -> Optional[tuple[int, int]]:
    """The (height, width) every readable image of `split` shares when their decoded pixels
    (padded by `pad`) fit `budget_bytes`; None otherwise. The budget is checked at the first
    readable image, so a large dataset is rejected without reading every header."""
    size = None
    for i in range(len(split)):
        s = stored_size(split, i)
        if s is None:
            continue
        if size is None:
            size = s
            if len(split) * (s[0] + 2 * pad) * (s[1] + 2 * pad) * 3 > budget_bytes:
                return None
        elif s != size:
            return None
    return size


def _decode_all(split: ShardedSplit, indices: np.ndarray, out: np.ndarray, transform, workers: int,
                desc: str, replace: bool) -> tuple[np.ndarray, np.ndarray]:
    """Decode samples `indices` into `out[k]` with threads (the decoders release the GIL).

    A corrupt image is replaced by `decode_or_replace` when `replace` (training), else left out
    (evaluation). Returns (labels of what was stored, number of corrupt images per slot)."""
    labels = np.zeros(len(indices), dtype=np.int64)
    corrupt = np.zeros(len(indices), dtype=np.int64)

    def run(start: int) -> int:
        stop = min(start + _CHUNK, len(indices))
        for k in range(start, stop):
            i = int(indices[k])
            if replace:
                img, labels[k], corrupt[k] = decode_or_replace(split, i, codecs.decode)
            else:
                img, labels[k] = try_decode(split, i, codecs.decode), split.labels[i]
                if img is None:
                    corrupt[k] = 1
                    continue
            out[k] = transform(img)
        return stop - start

    with progress(len(indices), desc, unit="images") as task, \
            ThreadPoolExecutor(max(1, workers)) as pool:
        for n in pool.map(run, range(0, len(indices), _CHUNK)):
            task.advance(n)
    return labels, corrupt


class ResidentLoader(TrainLoader):
    """Training loader over a split decoded once into device memory (see the module docstring)."""

    name = "resident"

    def __init__(self, split: ShardedSplit, *, uniform: Optional[UniformSampler],
                 class_aware: Optional[ClassAwareSampler], augment: AugmentSpec, seed: int,
                 steps_per_epoch: int, rank: int = 0, world_size: int = 1, device="cpu",
                 workers: int = 2, budget_bytes: Optional[int] = None):
        super().__init__(steps_per_epoch=steps_per_epoch)
        budget_bytes = budget_bytes or resident_budget(device)
        pad = augment.pad if augment.kind == "pad_crop" else 0
        size = common_size(split, pad, budget_bytes)
        if size is None:
            raise DataError(f"{split.dir}: the resident loader needs images of one size whose decoded "
                            f"pixels fit {budget_bytes / 2**30:.1f} GiB; use --loader dali or reference")
        self.uniform, self.class_aware, self.augment = uniform, class_aware, augment
        self.seed, self.rank, self.device = seed, rank, torch.device(device)
        self.height, self.width = size
        # Decode straight into the centre of a zero array: padding costs no extra copy.
        host = np.zeros((len(split), self.height + 2 * pad, self.width + 2 * pad, 3), np.uint8)
        centre = host[:, pad:pad + self.height, pad:pad + self.width] if pad else host
        labels, corrupt = _decode_all(split, np.arange(len(split)), centre, lambda im: im, workers,
                                      f"decoding {split.split} into memory", replace=True)
        self.skipped = int(corrupt.sum())
        self.images = torch.from_numpy(host).to(self.device)  # NHWC, padded for pad_crop
        self.labels = torch.from_numpy(labels).to(self.device)

    def _stream(self, idx: np.ndarray, step: int, stream: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = step_generator(self.seed, self.epoch, step, self.rank, stream)
        p = draw_params(self.augment, len(idx), self.height, self.width, g)
        # Indices, crop geometry and flips travel to the device as one small copy.
        geometry = p.offsets if self.augment.kind == "pad_crop" else p.boxes
        host = torch.cat([torch.from_numpy(idx)[:, None], geometry, p.flip[:, None].long()], 1)
        dev = upload(host, self.device)
        i, flip = dev[:, 0], dev[:, -1].bool()
        if self.augment.kind == "pad_crop":
            return crop_flip_gather(self.images, i, dev[:, 1:3], flip, self.augment.size), self.labels[i]
        x = resized_crop(nchw(self.images[i]), dev[:, 1:5], self.augment.size, flip)
        if p.jitter is not None:
            x = color_jitter(x, upload(p.jitter, self.device))
        return to_u8(x), self.labels[i]

    def _batches(self, start_step: int):
        for step in range(start_step, self.steps_per_epoch):
            idx_a, idx_c = step_indices(self.uniform, self.class_aware, self.epoch, step)
            a = self._stream(idx_a, step, STREAM_UNIFORM) if idx_a is not None else (None, None)
            c = self._stream(idx_c, step, STREAM_CLASS_AWARE) if idx_c is not None else (None, None)
            yield Batch(*a, *c)

    def close(self) -> None:
        self.images = self.labels = None


class ResidentEvalLoader(EvalLoader):
    """Evaluation over this rank's shard, decoded and transformed (EvalSpec, per image, so images of
    any size work) once into device memory; every later pass costs only slicing."""

    name = "resident"

    def __init__(self, split: ShardedSplit, *, spec: EvalSpec, batch_size: int, rank: int = 0,
                 world_size: int = 1, device="cpu", workers: int = 2,
                 budget_bytes: Optional[int] = None):
        super().__init__(indices=eval_indices(len(split), rank, world_size), batch_size=batch_size)
        budget_bytes = budget_bytes or resident_budget(device)
        if len(self.indices) * spec.size * spec.size * 3 > budget_bytes:
            raise DataError(f"{split.dir}: the eval images do not fit {budget_bytes / 2**30:.1f} GiB; "
                            f"use --loader dali or reference")
        self.device = torch.device(device)
        host = np.empty((len(self.indices), spec.size, spec.size, 3), np.uint8)
        labels, corrupt = _decode_all(split, self.indices, host, lambda im: eval_transform(im, spec),
                                      workers, f"decoding {split.split} into memory", replace=False)
        keep = corrupt == 0  # corrupt test images are dropped and counted, never replaced
        self.skipped = int(corrupt.sum())
        self.images = torch.from_numpy(host[keep] if self.skipped else host).to(self.device)
        self.labels = torch.from_numpy(labels[keep]).to(self.device)

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)  # corrupt images were dropped at decode

    def __iter__(self):
        for s in range(0, len(self.labels), self.batch_size):
            yield Batch(nchw(self.images[s:s + self.batch_size]), self.labels[s:s + self.batch_size],
                        None, None)
