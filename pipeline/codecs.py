"""Image bytes <-> uint8 RGB pixels (H, W, 3), the fastest decoder available for each format."""
from __future__ import annotations

import io

import numpy as np
import simplejpeg
from PIL import Image, ImageOps


def decode(data, ext: str) -> np.ndarray:
    """Decode stored sample bytes (`ext` 'jpg' or 'png') to a (H, W, 3) uint8 RGB array."""
    if ext == "jpg":
        # libjpeg-turbo through simplejpeg is ~2x Pillow on one core for the sizes we store.
        return simplejpeg.decode_jpeg(bytes(data) if isinstance(data, memoryview) else data,
                                      colorspace="RGB")
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def encode_png(pixels: np.ndarray) -> bytes:
    """Lossless; low compression because decode speed matters more than a few bytes."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def encode_jpeg(pixels: np.ndarray, quality: int) -> bytes:
    """Baseline (non-progressive) 4:2:0 JPEG, what GPU hardware decoders accept."""
    return simplejpeg.encode_jpeg(np.ascontiguousarray(pixels), quality=quality,
                                  colorspace="RGB", colorsubsampling="420")


def exif_upright(im: Image.Image) -> tuple[Image.Image, bool]:
    """`im` turned as its EXIF orientation tag says (Pillow's `ImageOps.exif_transpose`), and whether
    it was turned. Cameras store portrait photos sideways with that tag; viewers show them upright,
    and a model should be trained on what a person sees, so conversion applies it once."""
    if im.getexif().get(0x0112, 1) in (0, 1):  # absent, or "normal"
        return im, False
    return ImageOps.exif_transpose(im), True
