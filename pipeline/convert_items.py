"""How one source item becomes the bytes stored in a shard.

    (H, W, 3) uint8 array                  -> PNG (lossless)
    JPEG file: 8-bit, 3 channels (YCbCr or RGB), baseline or progressive, decodes strictly
                                           -> the file's bytes, unchanged
    any other image file Pillow can read   -> RGB, baseline JPEG at `quality`
      (grayscale / CMYK / 12-bit / arithmetic-coded JPEG, GIF, BMP, TIFF, WebP, ...)
    PNG file                               -> RGB, PNG (lossless)
    PNG file named .jpg / .jpeg            -> RGB, baseline JPEG at `quality` (re-encoded, counted):
                                              a JPEG dataset stays all JPEG (ImageNet has such files)
    16-bit PNG, TIFF, PGM or PPM (grey, RGB, with or without alpha)
                                           -> scaled to 8 bits, round(v * 255 / maxval), then
                                              as above (PNG stays PNG); counted as converted
    32-bit integer or float pixels         -> refused: they have no standard range to map to 8 bits
    shorter side under MIN_SIDE pixels     -> refused (see below)

When the longer side exceeds `max_side`, the image is shrunk to it and stored as baseline JPEG at
`quality`, whatever it came as. The format is told by the file's first bytes, never by its name
(ImageNet has PNGs named .JPEG). An image with an EXIF orientation other than "normal" (a camera's
portrait photo stored sideways) is turned upright as a viewer shows it and re-encoded (JPEG at
`quality`; PNG stays PNG), so training sees it the way a person does. Alpha is dropped, not composited. Stored JPEGs are baseline or
progressive 3-channel files that libjpeg-turbo decodes without a warning, which is what every
loader (simplejpeg, DALI, FFCV) takes.

Degenerate sizes are decided here, once, for every loader: an image whose stored shorter side
would be under MIN_SIDE pixels (1x1, 1x40, 40x1, ..., or once shrunk to `max_side`) is a bad
item, refused with its size (or left out with --on-error skip). A 1-pixel side leaves nothing to
crop (FFCV's evaluation crop becomes 0 pixels and OpenCV's resize aborts the whole process), so
stored images are never that small and no loader has to handle them.
"""
from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass

import cv2
import numpy as np
import simplejpeg
from PIL import Image

from pipeline.codecs import encode_jpeg, encode_png, exif_upright

# The smallest side a stored image may have. FFCV's evaluation crop is int(size / resize x the
# shorter side) pixels, so 8 keeps it at least 1 pixel for any resize up to 8x the crop size.
MIN_SIDE = 8
JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_NAMES = (".jpg", ".jpeg")  # lower-case file name endings that promise a JPEG

# Frame headers (SOFn) kept as they are: baseline and progressive Huffman, what GPU decoders take.
_KEPT_FRAMES = {0xC0, 0xC2}
_FRAME_MARKERS = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # C4/C8/CC are DHT/JPG/DAC
_STANDALONE_MARKERS = {0x01} | set(range(0xD0, 0xD8))  # TEM, RSTn: no length field


class BadItem(Exception):
    """An item that cannot be stored; `reason` says why, for the user."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class Encoded:
    data: bytes
    ext: str                # 'jpg' | 'png'
    converted_to_rgb: bool  # the source was grayscale, palette, CMYK, with alpha, 16-bit, ...
    reencoded: bool         # stored as a new lossy JPEG instead of the source's own bytes
    exif_rotated: bool = False  # turned upright by its EXIF orientation tag
    pixels: int = 0         # width x height of the source image (0 for arrays)


def encode_item(item, max_side: int | None, quality: int) -> Encoded:
    """The stored form of a source item (a path or an (H, W, 3) uint8 array); BadItem if unusable."""
    if isinstance(item, np.ndarray):
        return _from_array(item, max_side, quality)
    return _from_file(os.fspath(item), max_side, quality)


def _from_array(pixels: np.ndarray, max_side: int | None, quality: int) -> Encoded:
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise BadItem(f"array of shape {pixels.shape} and dtype {pixels.dtype}, "
                      f"expected (H, W, 3) uint8 RGB")
    target = stored_size(pixels.shape[1], pixels.shape[0], max_side)
    if target:
        return Encoded(encode_jpeg(_resize(Image.fromarray(pixels), target), quality), "jpg",
                       False, True)
    return Encoded(encode_png(pixels), "png", False, False)


def _from_file(path: str, max_side: int | None, quality: int) -> Encoded:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise BadItem("file not found") from None
    except OSError as e:
        raise BadItem(f"cannot read the file ({e.strerror or e})") from None
    if not data:
        raise BadItem("empty file")
    if data.startswith(JPEG_MAGIC) and _is_plain_jpeg(data) and not _turned(data):
        try:
            pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
        except ValueError as e:
            # libjpeg's warning about junk between segments leaves the pixels intact (a few
            # real ImageNet files): store a clean re-encoding. Any other warning means damage.
            if "extraneous bytes" not in str(e):
                raise BadItem(f"corrupt or truncated JPEG ({e})") from None
        else:
            size = pixels.shape[0] * pixels.shape[1]
            target = stored_size(pixels.shape[1], pixels.shape[0], max_side)
            if not target:
                return Encoded(data, "jpg", False, False, pixels=size)
            return Encoded(encode_jpeg(_resize(Image.fromarray(pixels), target), quality), "jpg",
                           False, True, pixels=size)
    keep_png = data.startswith(PNG_MAGIC) and not path.lower().endswith(JPEG_NAMES)
    return _decode_and_encode(data, keep_png, max_side, quality)


def _decode_and_encode(data: bytes, is_png: bool, max_side: int | None, quality: int) -> Encoded:
    try:
        with Image.open(io.BytesIO(data)) as im:
            turned = False
            if im.format == "PPM" and im.mode == "I":  # 16-bit PGM, which Pillow scales to 65535
                grey = scale_16_to_8(np.asarray(im))
                rgb, converted = Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2)), True
            elif im.mode in ("I", "F"):
                raise BadItem(f"{'32-bit integer' if im.mode == 'I' else 'floating-point'} pixels "
                              f"({im.format}): there is no standard range to map to 8 bits; save it "
                              f"as an 8- or 16-bit image")
            elif _is_16_bit(im, data):
                rgb, converted = Image.fromarray(_decode_16_bit(data)), True
            else:
                converted = im.mode != "RGB" or (im.format == "PPM" and _pnm_maxval(data) > 255)
                upright, turned = exif_upright(im)
                rgb = upright.convert("RGB")  # loads the pixels: Pillow raises on truncated data here
    except BadItem:
        raise
    except Exception as e:  # any decoder failure means the file is damaged or not an image
        # Pillow names the in-memory buffer ("<_io.BytesIO object at 0x...>"); the item is named by the caller
        said = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e))
        raise BadItem(f"not a readable image ({type(e).__name__}: {said})") from None
    size = rgb.width * rgb.height
    target = stored_size(rgb.width, rgb.height, max_side)
    if target:
        return Encoded(encode_jpeg(_resize(rgb, target), quality), "jpg", converted, True, turned, size)
    if is_png:
        return Encoded(encode_png(np.asarray(rgb)), "png", converted, False, turned, size)
    return Encoded(encode_jpeg(np.asarray(rgb), quality), "jpg", converted, True, turned, size)


def _turned(data: bytes) -> bool:
    """True when a JPEG's EXIF orientation tag asks for a turn (read from the header only)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.getexif().get(0x0112, 1) not in (0, 1)
    except Exception:  # an unreadable header: the strict decode that follows reports it
        return False


def stored_size(width: int, height: int, max_side: int | None) -> tuple[int, int] | None:
    """`fit_within`, and BadItem when the stored image's shorter side would be under MIN_SIDE
    (see the module docstring)."""
    target = fit_within(width, height, max_side)
    if min(target or (width, height)) < MIN_SIDE:
        shrunk = f", {target[0]}x{target[1]} once shrunk to --max-side {max_side}" if target else ""
        raise BadItem(f"image of {width}x{height} pixels (width x height){shrunk}: a side under "
                      f"{MIN_SIDE} pixels is too small to crop and resize; enlarge or remove it")
    return target


def _is_16_bit(im: Image.Image, data: bytes) -> bool:
    """True for 16-bit samples, which Pillow's convert("RGB") clips (grey) or truncates (RGB)."""
    if im.mode.startswith("I;16"):
        return True
    if im.format == "PNG":  # the bit depth is byte 24: signature, chunk length and type, W, H
        return data.startswith(PNG_MAGIC) and len(data) > 24 and data[24] == 16
    if im.format == "PPM":  # Pillow scales 16-bit PPM (RGB) right: only count it as converted
        return False
    if im.format == "TIFF":
        bits = im.tag_v2.get(258, (8,))
        return max(bits if isinstance(bits, tuple) else (bits,)) == 16
    return False


def _decode_16_bit(data: bytes) -> np.ndarray:
    """(H, W, 3) uint8 RGB from a 16-bit PNG or TIFF: round(v * 255 / 65535), alpha dropped.

    OpenCV decodes these at full precision (Pillow keeps only the high byte of 16-bit RGB).
    """
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if pixels is None or pixels.dtype != np.uint16:
        raise BadItem("a 16-bit image that OpenCV cannot decode as 16-bit")
    pixels = scale_16_to_8(pixels)
    if pixels.ndim == 2:
        return np.repeat(pixels[:, :, None], 3, axis=2)
    return np.ascontiguousarray(pixels[:, :, 2::-1])  # BGR(A) -> RGB


def scale_16_to_8(pixels: np.ndarray) -> np.ndarray:
    """16-bit samples -> uint8 by round(v * 255 / 65535), in integers: no value is ever a tie."""
    v = np.clip(pixels.astype(np.int64), 0, 65535)
    return ((v * 255 + 32767) // 65535).astype(np.uint8)


def _pnm_maxval(data: bytes) -> int:
    """The maxval field of a binary PGM / PPM header (magic, width, height, maxval, comments
    allowed between them): over 255, the file has 16-bit samples."""
    tokens = re.sub(rb"#[^\n]*", b" ", data[:1024]).split()
    if len(tokens) < 4 or not tokens[3].isdigit() or not 0 < int(tokens[3]) < 65536:
        raise BadItem("a PGM/PPM file whose header gives no valid maxval")
    return int(tokens[3])


def _is_plain_jpeg(data: bytes) -> bool:
    """True for an 8-bit, 3-channel, baseline or progressive JPEG (read from its frame header)."""
    frame = jpeg_frame(data)
    return frame is not None and frame[0] in _KEPT_FRAMES and frame[1] == 8 and frame[2] == 3


def jpeg_frame(data: bytes) -> tuple[int, int, int] | None:
    """(SOF marker, sample precision, number of components) of a JPEG, None if not found."""
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
        elif marker in _STANDALONE_MARKERS:
            i += 2
        elif marker in (0xD9, 0xDA):  # end of image, or scan data before any frame header
            return None
        elif marker in _FRAME_MARKERS:
            return (marker, data[i + 4], data[i + 9]) if i + 10 <= n else None
        else:
            i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def fit_within(width: int, height: int, max_side: int | None) -> tuple[int, int] | None:
    """(width, height) with the longer side = max_side, or None when no resize is needed."""
    if max_side is None or max(width, height) <= max_side:
        return None
    scale = max_side / max(width, height)
    if width >= height:
        return max_side, max(1, round(height * scale))
    return max(1, round(width * scale)), max_side


def _resize(im: Image.Image, size: tuple[int, int]) -> np.ndarray:
    # reducing_gap: shrink by an integer factor with a box filter first, then Lanczos for the rest;
    # several times faster on large images and visually the same.
    return np.asarray(im.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0))
