"""The reference loader: `torch.utils.data.DataLoader`, Pillow decode, per-sample augmentation.

Deliberately the plain baseline every benchmark compares with, and the portable fallback. It also
defines the per-image semantics of AugmentSpec and EvalSpec on host arrays (the resident loader
uses `eval_transform` and `decode_or_replace` from here).

One DataLoader item is one whole step: the main process draws the step's indices from the
samplers and hands (epoch, step, indices) to a worker as the dataset key, so sampling logic never
runs in workers and any step can be produced on its own (resume). Augmentation parameters come
from `pipeline.augment.draw_params` with the step's generator: the same crops and flips as the
batched loaders for the same (seed, epoch, step, rank).
"""
from __future__ import annotations

import gc
import io
from typing import Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline.augment import STREAM_CLASS_AWARE, STREAM_UNIFORM, draw_params, resized_shape, step_generator
from pipeline.dataset import ShardedSplit
from pipeline.device import is_cuda
from pipeline.errors import DataError
from pipeline.loaders.base import AugmentSpec, Batch, EvalLoader, EvalSpec, TrainLoader
from pipeline.loaders.corrupt import stand_in
from pipeline.samplers import ClassAwareSampler, UniformSampler, eval_indices, step_indices

DEFAULT_TIMEOUT_S = 300.0  # a worker silent this long is stuck: fail instead of hanging a run


# --- per-image semantics ---------------------------------------------------------------------
def pil_decode(data, ext: str = "") -> np.ndarray:
    """Encoded bytes -> (H, W, 3) uint8 RGB with Pillow (the baseline's decoder: any format, so
    `ext` is not needed; it is accepted to share the signature of `pipeline.codecs.decode`)."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def try_decode(split: ShardedSplit, i: int, decode) -> Optional[np.ndarray]:
    """Pixels of sample i, or None when its image is corrupt.

    A missing or truncated shard is not a corrupt image: `split.encoded` raises DataError for it,
    which propagates, since every sample of that shard would fail.
    """
    data = split.encoded(i)
    try:
        return decode(data, split.ext(i))
    except Exception:  # any decoder failure means a corrupt image; never crash a long run
        return None


def decode_or_replace(split: ShardedSplit, i: int, decode) -> tuple[np.ndarray, int, int]:
    """(pixels, label, number of corrupt images met) for sample i; a corrupt sample is replaced by
    the first decodable stand-in (`pipeline.loaders.corrupt.stand_in`, which raises DataError when
    there is none)."""
    img = try_decode(split, i, decode)
    if img is not None:
        return img, int(split.labels[i]), 0
    found = {}

    def decodes(j: int) -> bool:
        found["img"] = try_decode(split, j, decode)
        return found["img"] is not None

    j, rejected = stand_in(split, i, decodes)
    return found["img"], int(split.labels[j]), 1 + rejected


def color_jitter_np(x: np.ndarray, f: np.ndarray) -> np.ndarray:
    """`pipeline.augment.color_jitter` for one float HWC image: brightness, contrast, saturation."""
    weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    x = np.clip(x * f[0], 0, 255)
    mean = (x @ weights).mean()
    x = np.clip(mean + f[1] * (x - mean), 0, 255)
    grey = (x @ weights)[:, :, None]
    return np.clip(grey + f[2] * (x - grey), 0, 255)


def augment_one(img: np.ndarray, spec: AugmentSpec, params, b: int) -> np.ndarray:
    """Sample b of a batch: the per-image version of the batched ops in `pipeline.augment`."""
    if spec.kind == "pad_crop":
        top, left = (int(v) for v in params.offsets[b])
        padded = np.pad(img, ((spec.pad, spec.pad), (spec.pad, spec.pad), (0, 0)))
        out = padded[top:top + spec.size, left:left + spec.size]
    else:
        top, left, h, w = (int(v) for v in params.boxes[b])
        out = np.asarray(Image.fromarray(img).resize((spec.size, spec.size), Image.BILINEAR,
                                                     box=(left, top, left + w, top + h)))
    if params.flip[b]:
        out = out[:, ::-1]
    if params.jitter is not None:
        out = color_jitter_np(out.astype(np.float32), params.jitter[b].numpy())
        out = np.clip(np.round(out), 0, 255).astype(np.uint8)
    return out


def eval_transform(img: np.ndarray, spec: EvalSpec) -> np.ndarray:
    """Resize the shorter side to `spec.resize` (bilinear), centre crop `spec.size`; the image
    itself when it already is size x size and resize == size."""
    h, w = img.shape[:2]
    if min(h, w) != spec.resize:
        nh, nw = resized_shape(h, w, spec.resize)
        img = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BILINEAR))
        h, w = nh, nw
    top, left = (h - spec.size) // 2, (w - spec.size) // 2
    if top < 0 or left < 0:
        raise DataError(f"eval crop {spec.size} is larger than the resized image {h}x{w}; "
                        f"set the eval resize >= size")
    return img[top:top + spec.size, left:left + spec.size]


# --- the DataLoader plumbing -----------------------------------------------------------------
class _StepKeys(Sampler):
    """Yields one key per step, (epoch, step, uniform indices, class-aware indices), in the main
    process; `epoch` and `start` are set before each pass."""

    def __init__(self, uniform, class_aware, steps: int):
        self.uniform, self.class_aware, self.steps = uniform, class_aware, steps
        self.epoch, self.start = 0, 0

    def __iter__(self):
        for step in range(self.start, self.steps):
            yield (self.epoch, step) + step_indices(self.uniform, self.class_aware, self.epoch, step)

    def __len__(self) -> int:
        return self.steps - self.start


class _TrainSteps(Dataset):
    """Key -> the step's two streams as uint8 NHWC tensors (runs in workers)."""

    def __init__(self, split: ShardedSplit, augment: AugmentSpec, seed: int, rank: int):
        self.split, self.augment, self.seed, self.rank = split, augment, seed, rank

    def _stream(self, epoch: int, step: int, idx: np.ndarray, stream: int):
        decoded = [decode_or_replace(self.split, int(i), pil_decode) for i in idx]
        imgs = [d[0] for d in decoded]
        h = torch.tensor([im.shape[0] for im in imgs])
        w = torch.tensor([im.shape[1] for im in imgs])
        params = draw_params(self.augment, len(imgs), h, w,
                             step_generator(self.seed, epoch, step, self.rank, stream))
        x = np.stack([augment_one(im, self.augment, params, b) for b, im in enumerate(imgs)])
        y = torch.tensor([d[1] for d in decoded], dtype=torch.int64)
        return torch.from_numpy(x), y, sum(d[2] for d in decoded)

    def __getitem__(self, key):
        epoch, step, idx_a, idx_c = key
        out = {"skipped": 0}
        try:
            for name, idx, stream in (("a", idx_a, STREAM_UNIFORM), ("c", idx_c, STREAM_CLASS_AWARE)):
                if idx is not None:
                    out["x_" + name], out["y_" + name], bad = self._stream(epoch, step, idx, stream)
                    out["skipped"] += bad
        except DataError as e:  # hand the message to the main process intact (no worker traceback)
            return {"error": str(e)}
        return out


def _data_loader(dataset, sampler, workers: int, device, timeout_s: float) -> DataLoader:
    return DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=workers,
                      persistent_workers=workers > 0, pin_memory=is_cuda(device),
                      timeout=timeout_s if workers > 0 else 0)


def _to_device(x: torch.Tensor, device) -> torch.Tensor:
    """uint8 NHWC host tensor -> uint8 NCHW channels_last view on the device."""
    return x.to(device, non_blocking=True).permute(0, 3, 1, 2)


class ReferenceLoader(TrainLoader):
    """DataLoader + Pillow training loader (see the module docstring)."""

    name = "reference"

    def __init__(self, split: ShardedSplit, *, uniform: Optional[UniformSampler],
                 class_aware: Optional[ClassAwareSampler], augment: AugmentSpec, seed: int,
                 steps_per_epoch: int, rank: int = 0, world_size: int = 1, device="cpu",
                 workers: int = 2, timeout_s: float = DEFAULT_TIMEOUT_S):
        super().__init__(steps_per_epoch=steps_per_epoch)
        self.device = torch.device(device)
        self._keys = _StepKeys(uniform, class_aware, steps_per_epoch)
        self._loader = _data_loader(_TrainSteps(split, augment, seed, rank), self._keys, workers,
                                    self.device, timeout_s)

    def _batches(self, start_step: int):
        self._keys.epoch, self._keys.start = self.epoch, start_step
        for item in self._loader:
            if "error" in item:
                raise DataError(item["error"])
            self.skipped += item["skipped"]
            yield Batch(*(self._move(item.get(k)) for k in ("x_a", "y_a", "x_c", "y_c")))

    def _move(self, t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if t is None:
            return None
        return _to_device(t, self.device) if t.dim() == 4 else t.to(self.device, non_blocking=True)

    def close(self) -> None:
        # The persistent workers belong to the DataLoader's iterator, which refers back to the
        # DataLoader: dropping the DataLoader leaves the pair to the cycle collector, so collect
        # now, stopping the workers here rather than at interpreter exit (where their shutdown
        # fails noisily in a pool process).
        if self._loader is not None:
            self._loader = None
            gc.collect()


class _EvalChunks(Dataset):
    """Key -> (images, labels, number skipped) of one eval batch; corrupt images are dropped and
    counted (never replaced: a swapped test image would falsify the accuracy)."""

    def __init__(self, split: ShardedSplit, spec: EvalSpec, chunks: list[np.ndarray]):
        self.split, self.spec, self.chunks = split, spec, chunks

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, k: int):
        imgs, labels = [], []
        try:
            for i in self.chunks[k]:
                img = try_decode(self.split, int(i), pil_decode)
                if img is not None:
                    imgs.append(eval_transform(img, self.spec))
                    labels.append(int(self.split.labels[i]))
        except DataError as e:
            return {"error": str(e)}
        x = np.stack(imgs) if imgs else np.zeros((0, self.spec.size, self.spec.size, 3), np.uint8)
        return {"x": torch.from_numpy(x), "y": torch.tensor(labels, dtype=torch.int64),
                "skipped": len(self.chunks[k]) - len(imgs)}


class ReferenceEvalLoader(EvalLoader):
    """DataLoader + Pillow evaluation over this rank's shard (`pipeline.samplers.eval_indices`)."""

    name = "reference"

    def __init__(self, split: ShardedSplit, *, spec: EvalSpec, batch_size: int, rank: int = 0,
                 world_size: int = 1, device="cpu", workers: int = 2,
                 timeout_s: float = DEFAULT_TIMEOUT_S):
        super().__init__(indices=eval_indices(len(split), rank, world_size), batch_size=batch_size)
        self.device = torch.device(device)
        self.skipped = 0
        chunks = [self.indices[s:s + batch_size] for s in range(0, len(self.indices), batch_size)]
        self._loader = DataLoader(_EvalChunks(split, spec, chunks), batch_size=None, shuffle=False,
                                  num_workers=workers, pin_memory=is_cuda(self.device),
                                  timeout=timeout_s if workers > 0 else 0)

    def __iter__(self):
        self.skipped = 0  # per pass: what this evaluation left out
        for item in self._loader:
            if "error" in item:
                raise DataError(item["error"])
            self.skipped += item["skipped"]
            if len(item["y"]):
                yield Batch(_to_device(item["x"], self.device), item["y"].to(self.device), None, None)
