"""On-device interpolation of the two streams (docs/METHOD.md, Eq. 3), fused with normalisation.

x̃ = λ·x^a + (1 − λ)·x^c with one λ ~ Beta(a, b) per sample (a = b = 1 by default). The loaders deliver uint8 images;
here they become normalised float tensors, channels_last, in as few passes as eager mode allows:
normalisation is affine per channel and λ + (1 − λ) = 1, so mixing the raw pixels and then
normalising equals normalising each stream (one multiply-add fused with the uint8 → float
conversion) and mixing the results (one lerp). Three kernels, each reading uint8 inputs once;
under `torch.compile` (nothing here branches on data) they fuse into one.
"""
from __future__ import annotations

from typing import Sequence

import torch

# ImageNet statistics in 0..1 units, the convention of torchvision and timm.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def sample_lambda(n: int, alpha: float, generator: torch.Generator,
                  device: str | torch.device = "cpu", b: float | None = None) -> torch.Tensor:
    """n draws of Beta(α, b) as float32 on `device` (b = α when None), a pure function of the
    generator's state. Mean α / (α + b): λ weighs the class-agnostic image x^a.

    Beta(α, b) = G1 / (G1 + G2) with G1 ~ Gamma(α, 1), G2 ~ Gamma(b, 1), drawn by
    `torch._standard_gamma` (the public `torch.distributions` cannot take a generator) on the
    generator's device, in float64: for small α (0.2) float32 Gamma draws underflow to 0 often
    enough to give 0/0.

    Raises ValueError when α or b is not positive.
    """
    b = alpha if b is None else b
    if alpha <= 0 or b <= 0:
        raise ValueError(f"mixing Beta parameters must be positive, got ({alpha}, {b})")
    conc = torch.tensor([[float(alpha)], [float(b)]], dtype=torch.float64,
                        device=generator.device).expand(2, n).contiguous()
    g = torch._standard_gamma(conc, generator=generator)
    lam = g[0] / (g[0] + g[1])
    return lam.to(device=device, dtype=torch.float32, non_blocking=True)


# (mean, std, device) -> (scale, shift). A plain dict rather than functools.lru_cache, which
# torch.compile would trace through (with a warning) instead of treating it as a cache.
_AFFINE: dict = {}


def _affine(mean: Sequence[float], std: Sequence[float], device: torch.device):
    """Per-channel (scale, shift) with (x/255 − mean)/std = x·scale + shift, cached per device so
    that a training step copies no constants to the device (a pageable host-to-GPU copy would
    wait for the GPU's queue)."""
    key = (tuple(float(v) for v in mean), tuple(float(v) for v in std), str(device))
    if key not in _AFFINE:
        m = torch.tensor(key[0], dtype=torch.float64)
        s = torch.tensor(key[1], dtype=torch.float64)
        scale = (1.0 / (255.0 * s)).to(torch.float32).view(1, -1, 1, 1).to(device)
        shift = (-m / s).to(torch.float32).view(1, -1, 1, 1).to(device)
        _AFFINE[key] = (scale, shift)
    return _AFFINE[key]


def normalize(x_u8: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(x/255 − mean)/std of a uint8 NCHW batch, as one multiply-add; channels_last out."""
    scale, shift = _affine(mean, std, x_u8.device)
    out = torch.addcmul(shift, x_u8, scale).contiguous(memory_format=torch.channels_last)
    return out if dtype == torch.float32 else out.to(dtype)


def mix_normalize(x_a_u8: torch.Tensor, x_c_u8: torch.Tensor, lam: torch.Tensor,
                  mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised x^a, normalised λ·x^a + (1 − λ)·x^c), both channels_last in `dtype`.

    `lam` is (N,) float32 on the images' device; arithmetic is float32 whatever `dtype` is.
    """
    scale, shift = _affine(mean, std, x_a_u8.device)
    x_a = torch.addcmul(shift, x_a_u8, scale).contiguous(memory_format=torch.channels_last)
    x_c = torch.addcmul(shift, x_c_u8, scale).contiguous(memory_format=torch.channels_last)
    x_mix = torch.lerp(x_c, x_a, lam.to(torch.float32).view(-1, 1, 1, 1))
    if dtype != torch.float32:
        x_a, x_mix = x_a.to(dtype), x_mix.to(dtype)
    return x_a, x_mix
