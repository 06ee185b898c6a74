"""The optional FFCV copy of a converted split: `<split>.beton`, samples in index order.

Fields: `image` (`RGBImageField`) and `label` (`IntField`). The image write mode follows what the
split stores:
  - only small PNGs (CIFAR, synthetic: up to RAW_MAX_BYTES of pixels each) -> 'raw': uint8 pixels,
    identical to the shards' and the fastest to load (no decode at all);
  - anything else -> 'jpg' at the conversion's --quality. FFCV's writer takes pixels, not encoded
    bytes, so this is a second JPEG generation: its pixels are close to the shards', not equal.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from pipeline.atomic import atomic_path
from pipeline.cpus import usable_cpus
from pipeline.dataset import ShardedSplit
from pipeline.errors import DataError
from pipeline.format import EXT_CODE
from pipeline.progress import progress

RAW_MAX_BYTES = 1 << 20  # largest decoded image (bytes) of a split stored 'raw': 1 MiB, ~590x590


class _Samples:
    """(pixels, label) by sample number: the indexable dataset FFCV's writer reads."""

    def __init__(self, split: ShardedSplit):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        return self.split.decode(i), int(self.split.labels[i])


def write_mode(split: ShardedSplit) -> str:
    """'raw' for a split of small PNGs, else 'jpg' (raw photos would be tens of times larger)."""
    if (split.index["ext"] == EXT_CODE["jpg"]).any():
        return "jpg"
    largest = max(_png_rgb_bytes(split.encoded(i)) for i in range(len(split)))
    return "raw" if largest <= RAW_MAX_BYTES else "jpg"


def _png_rgb_bytes(png) -> int:
    """Size of a PNG decoded to RGB, from its header (width, height: bytes 16-24), not its pixels."""
    return int.from_bytes(png[16:20], "big") * int.from_bytes(png[20:24], "big") * 3


def write_beton(split: ShardedSplit, path: str | os.PathLike, workers: int | None = None) -> None:
    """Write `split` as an FFCV file at `path`, which appears only once complete."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import MIN_PAGE_SIZE, DatasetWriter

    path = Path(path)
    if len(split) == 0:
        raise DataError(f"{split.dir}: the split has no samples; there is nothing to write to {path}.")
    quality = split.meta.get("options", {}).get("quality", 90)
    mode = write_mode(split)
    fields = {"image": RGBImageField(write_mode=mode, jpeg_quality=quality), "label": IntField()}
    # Every sample must fit in one page; FFCV's default 8 MiB fits any photo as JPEG, and the
    # smallest page keeps the file of a small raw dataset small (each worker fills its own pages).
    page_size = MIN_PAGE_SIZE if mode == "raw" else 4 * MIN_PAGE_SIZE
    with atomic_path(path) as tmp:
        # FFCV's workers are forked and write straight into the file, so it gets the temp name.
        writer = DatasetWriter(str(tmp), fields, page_size=page_size,
                               num_workers=workers or usable_cpus())
        with progress(len(split), f"ffcv {split.split}", unit="images") as task, _bar_to(task):
            writer.from_indexed_dataset(_Samples(split), chunksize=100)


@contextmanager
def _bar_to(task):
    """Route the progress bar FFCV's writer draws itself (tqdm) to our progress reporting."""
    import ffcv.writer

    class Bar:
        def __init__(self, *args, **kwargs):
            pass

        def update(self, n: int) -> None:
            task.advance(n)

        def close(self) -> None:
            pass

    saved, ffcv.writer.tqdm = ffcv.writer.tqdm, Bar
    try:
        yield
    finally:
        ffcv.writer.tqdm = saved
