"""One unit of conversion work: encode the items of one shard, write the shard and its record.

A task runs in a worker process. Next to the shard it leaves two hidden files, written atomically
after the shard itself:

    <split>/.shard-000000.idx.npy   the shard's index rows
    <split>/.shard-000000.json      its counts, sha256 and skipped items

A shard is done when all three exist, so a rerun after a crash (or after a damaged shard was
deleted) rewrites only the shards that are not. A shard whose items were all left out by
--on-error skip is never written (an empty tar is refused by DALI's webdataset reader, "Underful
sample"): its two records alone, with no rows, say it is done, so shard numbers can have gaps. The records are kept after the conversion: they
are small, and they make such a repair cost one shard instead of the whole dataset.
"""
from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.atomic import atomic_open, write_json
from pipeline.convert_items import BadItem, encode_item
from pipeline.errors import DataError
from pipeline.format import INDEX_DTYPE, shard_name

# Images above this many pixels (e.g. 6000 x 4000 camera photos) decode ~100x slower than a 500 x 375
# one at every epoch; conversion counts them to suggest --max-side.
LARGE_IMAGE_PIXELS = 20_000_000
from pipeline.shards import write_shard


@dataclass
class ShardTask:
    """Items [start, start + len(items)) of a split, to become shard `shard` in `dir`."""

    split: str
    dir: Path
    shard: int
    start: int
    items: Sequence
    labels: np.ndarray
    origins: Sequence[str] | None
    num_classes: int
    max_side: int | None
    quality: int
    on_error: str  # "stop" | "skip"


@dataclass
class ShardResult:
    split: str
    shard: int
    rows: np.ndarray            # INDEX_DTYPE; empty when every item was left out (no shard file)
    num_items: int              # source items covered, kept or not
    sha256: str                 # of the shard file; "" when there is none
    converted_to_rgb: int = 0
    reencoded: int = 0
    exif_rotated: int = 0       # turned upright by their EXIF orientation (and re-encoded)
    large_images: int = 0       # stored with more than LARGE_IMAGE_PIXELS pixels
    skipped: list[dict] = field(default_factory=list)  # {split, position, origin, path, reason}


def record_paths(split_dir: Path, k: int) -> tuple[Path, Path]:
    stem = split_dir / f".{shard_name(k).removesuffix('.tar')}"
    return stem.with_name(stem.name + ".idx.npy"), stem.with_name(stem.name + ".json")


def load_done(split: str, split_dir: Path, k: int) -> ShardResult | None:
    """The result of shard k if a previous run completed it, else None."""
    idx_path, rec_path = record_paths(split_dir, k)
    if not (idx_path.is_file() and rec_path.is_file()):
        return None
    rows = np.load(idx_path)
    if rows.dtype != INDEX_DTYPE:  # written by another version of the format: rewrite the shard
        return None
    if len(rows) and not (split_dir / shard_name(k)).is_file():
        return None
    return ShardResult(split=split, shard=k, rows=rows, **json.loads(rec_path.read_text()))


def run_shard(task: ShardTask) -> ShardResult:
    """Encode and write one shard (in a worker process); DataError on a bad item in "stop" mode."""
    result = ShardResult(task.split, task.shard, np.empty(0, INDEX_DTYPE), len(task.items), "")
    path = task.dir / shard_name(task.shard)
    records = _records(task, result)
    first = next(records, None)
    if first is None:  # every item left out: no shard file at all (see the module docstring)
        path.unlink(missing_ok=True)
    else:
        result.rows = write_shard(path, task.shard, task.start, itertools.chain([first], records))
        result.sha256 = file_sha256(path)
    idx_path, rec_path = record_paths(task.dir, task.shard)
    with atomic_open(idx_path, "wb") as f:
        np.save(f, result.rows)
    write_json(rec_path, {"num_items": result.num_items, "sha256": result.sha256,
                          "converted_to_rgb": result.converted_to_rgb,
                          "reencoded": result.reencoded, "exif_rotated": result.exif_rotated,
                          "large_images": result.large_images, "skipped": result.skipped})
    return result


def _records(task: ShardTask, result: ShardResult):
    """(bytes, ext, label, key) of the kept items, one at a time; counts go into `result`."""
    for j, item in enumerate(task.items):
        position = task.start + j
        label = int(task.labels[j])
        origin = task.origins[j] if task.origins is not None else None
        try:
            if not 0 <= label < task.num_classes:
                raise BadItem(f"label {label} out of range [0, {task.num_classes})")
            enc = encode_item(item, task.max_side, task.quality)
        except BadItem as e:
            if task.on_error == "stop":
                raise DataError(f"{describe_item(task.split, position, item, origin)}: {e.reason}. "
                                f"Fix or remove it, or pass --on-error skip to leave it out.") from None
            result.skipped.append({"split": task.split, "position": position, "origin": origin,
                                   "path": None if isinstance(item, np.ndarray) else str(item),
                                   "reason": e.reason})
            continue
        result.converted_to_rgb += enc.converted_to_rgb
        result.reencoded += enc.reencoded
        result.exif_rotated += enc.exif_rotated
        result.large_images += enc.pixels > LARGE_IMAGE_PIXELS and not enc.reencoded
        yield enc.data, enc.ext, label, position


def describe_item(split: str, position: int, item, origin: str | None) -> str:
    """How an error names an item: its file, where it was listed, or its place in the split."""
    what = f"{split} sample {position}" if isinstance(item, np.ndarray) else str(item)
    return f"{what} (listed at {origin})" if origin else what


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
