"""Benchmark data made offline, written with the regular conversion engine (`pipeline.convert`).

Two kinds, both long-tailed over 10 classes (n_k proportional to 10^(-k/9), so the class-aware
stream really re-weights) and stored exactly as `iccl convert` stores real data:

  photos  ImageNet-size JPEGs: baseline 4:2:0 JPEGs at quality 90 in ImageNet's common shapes
          (500x375 most often; also 500x333, 500x400 and the portrait versions). Each is a mosaic
          of real photographs -- the CIFAR-10 test images -- upscaled 1-2x (bicubic) in rows, with
          light per-pixel grain (sigma 4), i.e. real photographic content at the size and near
          the entropy of ImageNet files: ~70 KB each (ImageNet's training files average ~110 KB,
          so real data decodes somewhat slower). Stored as they are (no re-encoding).
  tiny    CIFAR-size: the CIFAR-10 test images themselves, 32x32, lossless PNG (the CIFAR-LT format).

The CIFAR-10 test images are read from the CIFAR-10 download the caller names (`tiles_from`,
`--tiles-from` on the command line: the .tar.gz or its extracted folder, binary or python
version); without one, tiles of smooth multi-octave noise stand in (content less like
photographs, sizes and formats unchanged). An FFCV `.beton` is added when ffcv is installed.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import simplejpeg
from PIL import Image

from pipeline.errors import DataError
from pipeline.progress import progress, say
from pipeline.sources.base import Source, SourceSplit

NUM_CLASSES = 10
IMBALANCE = 10.0
# (height, width) and how often: ImageNet's photos are mostly 500 px on the long side, 4:3 first.
PHOTO_SHAPES = ((375, 500), (333, 500), (400, 500), (500, 375), (500, 333))
PHOTO_SHAPE_WEIGHTS = (0.5, 0.15, 0.1, 0.15, 0.1)
TILE_SCALES = (1.0, 1.5, 2.0)  # tile upscaling per mosaic row: 32, 48 or 64 px tiles
GRAIN = 4.0  # per-pixel Gaussian noise (sensor grain), in 0..255 units
QUALITY = 90


def photo_tiles(tiles_from: Optional[Path], rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """(tiles, what they are): the 10,000 CIFAR-10 test images of the download `tiles_from`
    ((10000, 32, 32, 3) uint8, read and md5-checked by `pipeline.sources.cifar.read_cifar`, which
    raises DataError naming the file for anything else), or 2,000 noise tiles without one."""
    if tiles_from is None:
        say("no CIFAR-10 download given to tile the pictures with: smooth-noise tiles stand in "
            "for photographs")
        return noise_tiles(2000, rng), "smooth-noise tiles"
    from pipeline.sources.cifar import read_cifar

    return read_cifar(Path(tiles_from), 10).test_images, "CIFAR-10 test images"


def noise_tiles(n: int, rng: np.random.Generator) -> np.ndarray:
    """Stand-in tiles: smooth noise, coarse octaves upscaled and summed (photographs' 1/f-like
    spectrum, roughly)."""
    out = np.zeros((n, 32, 32, 3), np.float32)
    for cells, weight in ((2, 0.5), (4, 0.3), (8, 0.15), (32, 0.05)):
        coarse = rng.random((n, cells, cells, 3), dtype=np.float32)
        out += weight * coarse.repeat(32 // cells, axis=1).repeat(32 // cells, axis=2)
    return (out * 255).astype(np.uint8)


def photo_mosaic(tiles: np.ndarray, height: int, width: int, grain: np.ndarray,
                 rng: np.random.Generator) -> np.ndarray:
    """One height x width image: rows of randomly chosen tiles, upscaled by a per-row factor,
    plus a random window of the shared grain field."""
    img = np.empty((height, width, 3), np.float32)
    y = 0
    while y < height:
        side = int(32 * TILE_SCALES[rng.integers(len(TILE_SCALES))])
        for x in range(0, width, side):
            tile = Image.fromarray(tiles[rng.integers(len(tiles))]).resize((side, side), Image.BICUBIC)
            img[y:y + side, x:x + side] = np.asarray(tile)[:height - y, :width - x]
        y += side
    oy, ox = rng.integers(0, grain.shape[0] - height), rng.integers(0, grain.shape[1] - width)
    img += grain[oy:oy + height, ox:ox + width]
    return np.clip(img, 0, 255).astype(np.uint8)


def long_tailed_labels(n: int, rng: np.random.Generator) -> np.ndarray:
    """n labels over NUM_CLASSES classes with counts proportional to IMBALANCE^(-k/(K-1)), in
    random order; every class gets at least one image."""
    weights = IMBALANCE ** (-np.arange(NUM_CLASSES) / (NUM_CLASSES - 1))
    counts = np.maximum(1, np.floor(n * weights / weights.sum())).astype(int)
    counts[0] += n - counts.sum()
    return rng.permutation(np.repeat(np.arange(NUM_CLASSES), counts))


def make_bench_data(out: Path, images: int = 2000, tiny: bool = False, seed: int = 0,
                    workers: Optional[int] = None, tiles_from: Optional[Path] = None) -> dict:
    """Write the bench dataset (module docstring) to `out` as a converted dataset with one split,
    `train`; returns its meta.json content. A rerun with the same arguments finds it complete.
    Raises DataError for a `tiles_from` that is not a CIFAR-10 download."""
    rng = np.random.default_rng(seed)
    tiles, content = photo_tiles(tiles_from, rng)
    labels = long_tailed_labels(images, rng)
    description = {"content": content, "images": images, "seed": seed}
    if not tiny:
        description.update(quality=QUALITY, shapes=[list(s) for s in PHOTO_SHAPES])
    out = Path(out)
    done = _complete(out, "bench-tiny" if tiny else "bench-photos", description)
    if done is not None:  # no need to generate the images again
        return done
    if tiny:
        items = [tiles[i % len(tiles)] for i in range(images)]
        return _convert(Source("bench-tiny", _class_names(), {"train": SourceSplit(labels, items)},
                               description), out, workers)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-jpegs-") as tmp:
        grain = rng.normal(0, GRAIN, (600, 600, 3)).astype(np.float32)
        shapes = rng.choice(len(PHOTO_SHAPES), size=images, p=PHOTO_SHAPE_WEIGHTS)
        paths = []
        with progress(images, "bench data: photos", unit="images") as task:
            for i, s in enumerate(shapes):
                pixels = photo_mosaic(tiles, *PHOTO_SHAPES[s], grain, rng)
                path = Path(tmp) / f"{i:07d}.jpg"
                path.write_bytes(simplejpeg.encode_jpeg(pixels, quality=QUALITY, colorspace="RGB",
                                                        colorsubsampling="420"))
                paths.append(str(path))
                task.advance(1)
        return _convert(Source("bench-photos", _class_names(), {"train": SourceSplit(labels, paths)},
                               description), out, workers)


def _complete(out: Path, name: str, description: dict) -> Optional[dict]:
    """meta.json of a finished conversion of this same bench data in `out`, None when `out` holds
    none; DataError when it holds other data."""
    from pipeline.format import META_FILE, read_meta

    if not (out / META_FILE).is_file():
        return None
    meta = read_meta(out)
    if meta.get("source") != {"kind": name, **description}:  # refused before making any picture
        raise DataError(f"{out} holds other data ({meta.get('source')}); give another folder for "
                        f"this bench data (--make-data) or delete that one")
    return meta


def _class_names() -> list[str]:
    return [f"class_{k}" for k in range(NUM_CLASSES)]


def _convert(source: Source, out: Path, workers: Optional[int]) -> dict:
    """Convert, adding the FFCV file when ffcv is installed (the ffcv loader is benched then)."""
    from pipeline.convert import convert

    try:
        import ffcv  # noqa: F401  (only to know whether the .beton can be written)
        with_ffcv = True
    except ImportError:
        say("ffcv is not installed: no .beton, the ffcv loader will be skipped")
        with_ffcv = False
    return convert(source, out, workers=workers, quality=QUALITY, ffcv=with_ffcv)
