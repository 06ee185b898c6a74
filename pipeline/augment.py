"""Training augmentation as batched tensor ops, and the random parameters every loader shares.

Randomness: the parameters of one step (crop offsets or boxes, flips, jitter factors) are drawn
for the whole batch at once from `step_generator(seed, epoch, step, rank, stream)`, a CPU
generator, in a fixed order (see `draw_params`). Loaders that apply them differently (batched on
the device here, per sample with Pillow in the reference loader) therefore crop and flip every
image identically, and a resumed run redraws exactly the same parameters.

Images are uint8 (N, 3, H, W) in channels_last memory, i.e. NHWC buffers; the ops index the NHWC
view directly so that results stay channels_last without a copy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.device import upload
from pipeline.loaders.base import AugmentSpec

# Stream ids of `step_generator`: the two image streams never share random numbers, so adding
# or dropping one stream leaves the other's crops and flips unchanged.
STREAM_UNIFORM = 0
STREAM_CLASS_AWARE = 1

def sampler_streams(owner: str, augment: AugmentSpec, uniform, class_aware) -> list:
    """[(sampler, stream id)] of the streams a loader was asked for, checked: at least one, and an
    augmentation kind every loader implements."""
    if augment.kind not in ("pad_crop", "rrc"):
        raise ValueError(f"unknown augmentation kind {augment.kind!r} (pad_crop or rrc)")
    streams = [(s, k) for s, k in ((uniform, STREAM_UNIFORM), (class_aware, STREAM_CLASS_AWARE))
               if s is not None]
    if not streams:
        raise ValueError(f"{owner} needs at least one of the uniform / class-aware samplers")
    return streams


_RRC_TRIES = 10  # torchvision's RandomResizedCrop attempts before its centre-crop fallback


def step_generator(seed: int, epoch: int, step: int, rank: int, stream: int,
                   device: str | torch.device = "cpu") -> torch.Generator:
    """A generator seeded by (seed, stream, epoch, step, rank) through numpy's SeedSequence, which
    decorrelates neighbouring tuples (a plain sum or hash of the ints would not)."""
    state = np.random.SeedSequence([seed, 1000 + stream, epoch, step, rank]).generate_state(1, np.uint64)
    g = torch.Generator(device=device)
    g.manual_seed(int(state[0]))
    return g


@dataclass
class AugmentParams:
    """The random choices of one batch (CPU tensors). `offsets` (N, 2) = (top, left) in the padded
    image for pad_crop; `boxes` (N, 4) = (top, left, height, width) for rrc; `jitter` (N, 3) =
    brightness, contrast, saturation factors, or None when jitter is off."""
    flip: torch.Tensor
    offsets: Optional[torch.Tensor] = None
    boxes: Optional[torch.Tensor] = None
    jitter: Optional[torch.Tensor] = None


def _uniform(shape, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)


def random_resized_crop_params(n: int, h, w, scale: tuple[float, float], ratio: tuple[float, float],
                               generator: torch.Generator) -> torch.Tensor:
    """torchvision's RandomResizedCrop boxes for n images, vectorised: (N, 4) int64
    (top, left, height, width).

    Per image: up to 10 tries of area fraction ~ U(scale) and log aspect ratio ~ U(log ratio); the
    first box that fits wins, else the centre crop clamped to the ratio range. All 10 tries are
    drawn for every image (a fixed amount of randomness per image keeps the stream aligned).
    `h`, `w`: ints, or (N,) tensors for images of different sizes.
    """
    h = torch.as_tensor(h, dtype=torch.float64).expand(n)
    w = torch.as_tensor(w, dtype=torch.float64).expand(n)
    area = (h * w)[:, None]
    target = area * _uniform((n, _RRC_TRIES), scale[0], scale[1], generator)
    log_r = _uniform((n, _RRC_TRIES), math.log(ratio[0]), math.log(ratio[1]), generator)
    aspect = torch.exp(log_r)
    cw = torch.round(torch.sqrt(target * aspect))
    ch = torch.round(torch.sqrt(target / aspect))
    fits = (cw > 0) & (cw <= w[:, None]) & (ch > 0) & (ch <= h[:, None])
    first = fits.to(torch.int8).argmax(dim=1, keepdim=True)
    found = fits.any(dim=1)
    bw = torch.gather(cw, 1, first)[:, 0]
    bh = torch.gather(ch, 1, first)[:, 0]
    # Fallback: the whole image, cut down to the nearest allowed aspect ratio.
    in_ratio = w / h
    fw = torch.where(in_ratio > ratio[1], torch.round(h * ratio[1]), w)
    fh = torch.where(in_ratio < ratio[0], torch.round(w / ratio[0]), h)
    bw, bh = torch.where(found, bw, fw), torch.where(found, bh, fh)
    u = torch.rand((n, 2), generator=generator, dtype=torch.float64)
    top = torch.where(found, torch.floor(u[:, 0] * (h - bh + 1)), torch.floor((h - bh) / 2))
    left = torch.where(found, torch.floor(u[:, 1] * (w - bw + 1)), torch.floor((w - bw) / 2))
    return torch.stack([top, left, bh, bw], dim=1).to(torch.int64)


def draw_params(spec: AugmentSpec, n: int, h, w, generator: torch.Generator) -> AugmentParams:
    """All random choices of one batch, in a fixed order: crop, then flip, then jitter."""
    if spec.kind == "pad_crop":
        span_h = torch.as_tensor(h).expand(n) + 2 * spec.pad - spec.size + 1
        span_w = torch.as_tensor(w).expand(n) + 2 * spec.pad - spec.size + 1
        if (span_h < 1).any() or (span_w < 1).any():
            raise ValueError(f"pad_crop: a {spec.size}-px crop does not fit images of {h}x{w} "
                             f"padded by {spec.pad}")
        u = torch.rand((n, 2), generator=generator, dtype=torch.float64)
        offsets = torch.stack([u[:, 0] * span_h, u[:, 1] * span_w], 1).floor().to(torch.int64)
        params = AugmentParams(flip=torch.zeros(n, dtype=torch.bool), offsets=offsets)
    elif spec.kind == "rrc":
        boxes = random_resized_crop_params(n, h, w, spec.scale, spec.ratio, generator)
        params = AugmentParams(flip=torch.zeros(n, dtype=torch.bool), boxes=boxes)
    else:
        raise ValueError(f"unknown augmentation kind {spec.kind!r} (pad_crop or rrc)")
    # Drawn even when flips are off, so that jitter factors do not depend on the flip setting.
    flip_u = torch.rand(n, generator=generator)
    if spec.flip:
        params.flip = flip_u < 0.5
    if spec.kind == "rrc" and spec.jitter > 0:
        low = max(0.0, 1 - spec.jitter)
        params.jitter = _uniform((n, 3), low, 1 + spec.jitter, generator).to(torch.float32)
    return params


# --- batched ops on NHWC uint8 ---------------------------------------------------------------
def nhwc(x: torch.Tensor) -> torch.Tensor:
    """The NHWC view of a channels_last NCHW tensor (no copy)."""
    return x.permute(0, 2, 3, 1)


def nchw(x: torch.Tensor) -> torch.Tensor:
    """The channels_last NCHW view of a contiguous NHWC tensor (no copy)."""
    return x.permute(0, 3, 1, 2)


def pad_nhwc(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Zero-pad H and W of an NHWC tensor by `pad` on each side."""
    return F.pad(x, (0, 0, pad, pad, pad, pad)) if pad else x


def crop_flip_gather(source: torch.Tensor, idx: torch.Tensor, offsets: torch.Tensor,
                     flip: torch.Tensor, size: int) -> torch.Tensor:
    """out[b] = source[idx[b]] cropped at `offsets[b]` (top, left) to size x size, mirrored where
    `flip[b]`: one gather from the NHWC `source` (the whole resident dataset, already padded), so
    selecting the batch, cropping and flipping cost a single pass over the output.
    Returns uint8 (N, 3, size, size) channels_last."""
    ar = torch.arange(size, device=source.device)
    rows = offsets[:, :1] + ar  # (N, S)
    cols = offsets[:, 1:] + torch.where(flip[:, None], size - 1 - ar, ar)
    out = source[idx[:, None, None], rows[:, :, None], cols[:, None, :]]  # (N, S, S, 3)
    return nchw(out)


def pad_crop_flip(x_u8: torch.Tensor, pad: int, generator: torch.Generator, size: Optional[int] = None,
                  flip: bool = True) -> torch.Tensor:
    """Random `size` crop (default: the input size) after zero padding by `pad`, and a horizontal
    flip with p = 0.5 when `flip`, per sample, on a channels_last uint8 batch."""
    n, _, h, w = x_u8.shape
    spec = AugmentSpec(kind="pad_crop", size=size or h, pad=pad, flip=flip)
    p = draw_params(spec, n, h, w, generator)
    dev = x_u8.device
    # Offsets and flips travel as one small copy, from pinned memory on CUDA (`upload`).
    params = upload(torch.cat([p.offsets, p.flip[:, None].long()], 1), dev)
    return crop_flip_gather(pad_nhwc(nhwc(x_u8), pad), torch.arange(n, device=dev),
                            params[:, :2], params[:, 2].bool(), spec.size)


def resized_crop(x_u8: torch.Tensor, boxes: torch.Tensor, size: int, flip: torch.Tensor) -> torch.Tensor:
    """Crop each image to its box (top, left, height, width) and resize it to size x size
    (bilinear, pixel centres aligned as in Pillow/torchvision, no antialiasing), mirrored where
    `flip`. One `grid_sample` for the batch. Returns float32 (N, 3, size, size) channels_last in
    the 0..255 range (rounding back to uint8 is left to the caller, after jitter)."""
    n, _, h, w = x_u8.shape
    dev = x_u8.device
    b = boxes.to(dev, torch.float32)
    t = (torch.arange(size, device=dev, dtype=torch.float32) + 0.5) / size  # output pixel centres
    tx = torch.where(flip.to(dev)[:, None], 1 - t, t)
    xs = b[:, 1:2] + tx * b[:, 3:4]  # source x in pixels, (N, S)
    ys = b[:, 0:1] + t * b[:, 2:3]
    gx = (2 * xs / w - 1)[:, None, :].expand(n, size, size)
    gy = (2 * ys / h - 1)[:, :, None].expand(n, size, size)
    grid = torch.stack([gx, gy], dim=-1)
    src = x_u8.to(torch.float32).contiguous(memory_format=torch.channels_last)
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.contiguous(memory_format=torch.channels_last)


def color_jitter(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Brightness, then contrast, then saturation (fixed order), each a blend with its degenerate
    image as in torchvision: black, the image's mean grey level, its greyscale. `x` float 0..255
    NCHW, `factors` (N, 3)."""
    f = factors.to(x.device, x.dtype)[:, :, None, None, None]  # f[:, j] broadcasts as (N, 1, 1, 1)
    x = (x * f[:, 0]).clamp(0, 255)
    mean = _grey(x).mean(dim=(2, 3), keepdim=True)
    x = (mean + f[:, 1] * (x - mean)).clamp_(0, 255)
    grey = _grey(x)
    return (grey + f[:, 2] * (x - grey)).clamp_(0, 255)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma, (N, 1, H, W), the weights torchvision and Pillow use."""
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def to_u8(x: torch.Tensor) -> torch.Tensor:
    """Round a 0..255 float image back to uint8, keeping channels_last."""
    return x.round_().clamp_(0, 255).to(torch.uint8).contiguous(memory_format=torch.channels_last)


def resized_shape(h: int, w: int, resize: int) -> tuple[int, int]:
    """(height, width) after scaling the shorter side to `resize` (torchvision's rounding)."""
    if h <= w:
        return resize, int(resize * w / h)
    return int(resize * h / w), resize


def center_crop_resize(x_u8: torch.Tensor, size: int, resize: int) -> torch.Tensor:
    """Eval transform on a batch: resize the shorter side to `resize` (bilinear, antialiased),
    then centre crop `size`. The identity when the images already are `size` x `size` and
    `resize` == `size`."""
    n, _, h, w = x_u8.shape
    if min(h, w) != resize:
        nh, nw = resized_shape(h, w, resize)
        x = F.interpolate(x_u8.float(), size=(nh, nw), mode="bilinear", antialias=True,
                          align_corners=False)
        x_u8 = to_u8(x)
        h, w = nh, nw
    top, left = (h - size) // 2, (w - size) // 2
    if top < 0 or left < 0:
        raise ValueError(f"centre crop {size} is larger than the resized image {h}x{w}")
    return x_u8[:, :, top:top + size, left:left + size].contiguous(memory_format=torch.channels_last)
