"""The work every training loader must do, done as cheaply as this machine allows: the "floor" of
`iccl bench pipeline`.

Per image: decode with the fastest decoder for the format (simplejpeg for JPEG, `pipeline.codecs`
for PNG), then the same augmentation the loaders apply, with OpenCV on uint8 and no framework:
  rrc       the crop box (`pipeline.augment.draw_params`, the loaders' own distribution), one
            `cv2.resize` of the crop view to size x size (INTER_AREA when the crop has more pixels
            than the output, else INTER_LINEAR: every loader's resize is antialiased -- Pillow's reducing bilinear,
            DALI's antialiased linear, FFCV's INTER_AREA -- and a plain bilinear one, 3x cheaper
            here, would be a floor below the work), `cv2.flip`, and
            colour jitter as three plain passes: per-channel histograms (`cv2.calcHist`) give the
            mean grey level, so brightness then contrast is one 256-entry `cv2.LUT`; saturation is
            `cv2.cvtColor` to grey and back, then `cv2.addWeighted` (saturating, i.e. clipped)
  pad_crop  `cv2.copyMakeBorder` (zeros), a crop view, `cv2.flip`
then a copy into the step's batch array, as a loader must deliver one. `workers` processes share
the images, each with one OpenCV thread. OpenCV is used because it is the fastest widely used
CPU image library; this is a measurement, not a loader (no ordering, no two streams, no device
transfer), so a loader's fraction of this rate says how much of its time goes to its own
machinery. Only a loader that decodes less than the whole image (region-of-interest decoding of
the crop) could exceed it.
"""
from __future__ import annotations

import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Optional

import numpy as np

from pipeline.dataset import ShardedSplit
from pipeline.loaders.base import AugmentSpec

_LUMA = np.array([0.299, 0.587, 0.114])
_split: Optional[ShardedSplit] = None


def jitter_u8(img: np.ndarray, bright: float, contrast: float, saturation: float) -> np.ndarray:
    """Brightness, contrast, saturation of one uint8 RGB image in three OpenCV passes (module
    docstring); `pipeline.augment.color_jitter` up to the rounding between passes."""
    import cv2

    counts = np.stack([cv2.calcHist([img], [c], None, [256], [0, 256]).ravel() for c in range(3)])
    v = np.minimum(np.arange(256) * bright, 255.0)
    mean = float(v @ (_LUMA @ counts)) / (img.shape[0] * img.shape[1])
    lut = np.clip(np.rint(mean + contrast * (v - mean)), 0, 255).astype(np.uint8)
    img = cv2.LUT(img, lut)
    grey = cv2.cvtColor(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    return cv2.addWeighted(img, saturation, grey, 1.0 - saturation, 0.0)


def _sizes(split: ShardedSplit, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from pipeline.loaders.resident import stored_size

    hw = np.array([stored_size(split, int(i)) or (0, 0) for i in idx])
    return hw[:, 0], hw[:, 1]


def _chunk(root: str, split_name: str, idx: np.ndarray, spec: AugmentSpec, seed: int) -> int:
    """Decode + augment samples `idx` into one batch array (in a pool worker)."""
    import cv2
    import torch

    from pipeline import codecs
    from pipeline.augment import draw_params

    global _split
    if len(idx) == 0:
        return 0
    if _split is None or _split.root != Path(root) or _split.split != split_name:
        _split = ShardedSplit(root, split_name)
        cv2.setNumThreads(1)
    h, w = _sizes(_split, idx)
    params = draw_params(spec, len(idx), torch.from_numpy(h), torch.from_numpy(w),
                         torch.Generator().manual_seed(seed))
    s = spec.size
    batch = np.empty((len(idx), s, s, 3), np.uint8)
    boxes = None if params.boxes is None else params.boxes.numpy()
    offsets = None if params.offsets is None else params.offsets.numpy()
    jitter = None if params.jitter is None else params.jitter.numpy()
    flips = params.flip.numpy()
    for b, i in enumerate(idx):
        img = codecs.decode(_split.encoded(int(i)), _split.ext(int(i)))
        if spec.kind == "rrc":
            top, left, bh, bw = boxes[b]
            shrink = bh * bw > s * s
            out = cv2.resize(img[top:top + bh, left:left + bw], (s, s),
                             interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        else:
            p = spec.pad
            padded = cv2.copyMakeBorder(img, p, p, p, p, cv2.BORDER_CONSTANT, value=0)
            top, left = offsets[b]
            out = padded[top:top + s, left:left + s]
        if flips[b]:
            out = cv2.flip(out, 1)
        if jitter is not None:
            out = jitter_u8(np.ascontiguousarray(out), *jitter[b])
        batch[b] = out
    return len(idx)


_barrier = None


def _init(barrier) -> None:
    global _barrier
    _barrier = barrier


def _warm(root: str, split_name: str, idx: np.ndarray, spec: AugmentSpec) -> int:
    """A first chunk (imports, maps, caches), then wait for every other worker to be warm too:
    each of the pool's processes takes exactly one of these."""
    n = _chunk(root, split_name, idx, spec, seed=0)
    _barrier.wait(timeout=600)
    return n


def floor_rate(split: ShardedSplit, idx: np.ndarray, spec: AugmentSpec, workers: int,
               chunk: int = 64) -> float:
    """Images per second of decode + `spec` over samples `idx` in `workers` spawned processes;
    process start-up and a first chunk in every worker are outside the clock."""
    chunks = np.array_split(idx, max(1, len(idx) // chunk))
    roots, names = [str(split.root)] * len(chunks), [split.split] * len(chunks)
    # spawn, not fork: the caller may already run threads (DALI's, numba's, torch's) that a
    # forked child would inherit in a broken state; start-up is outside the clock anyway
    ctx = get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init, initargs=(ctx.Barrier(workers),)) as pool:
        warm = np.array_split(idx[:chunk * workers], workers)
        list(pool.map(_warm, [str(split.root)] * workers, [split.split] * workers, warm, [spec] * workers))
        t0 = time.perf_counter()
        n = sum(pool.map(_chunk, roots, names, chunks, [spec] * len(chunks), range(len(chunks))))
        return n / (time.perf_counter() - t0)
