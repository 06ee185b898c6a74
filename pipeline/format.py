"""The on-disk layout of a converted dataset (the contract between `iccl convert` and every reader).

    OUT/
      meta.json                 written last: its presence means the conversion is complete
      <split>/shard-000000.tar  WebDataset shards, members KEY.jpg|KEY.png and KEY.cls
      <split>/index.npy         one INDEX_DTYPE row per sample, in sample order
      <split>.beton             optional FFCV file of the same samples in the same order

The index is the authority: sample i of a split is the i-th row of its index, and the rows follow
the shards front to back, so the `webdataset` library and DALI's reader see the same samples in the
same order. KEY is the sample's position in the source split as 9 digits: keys increase along the
index and equal the sample number, except after `iccl convert --on-error skip` left bad items out,
which leaves gaps in the keys (never in the index). Shard k holds the kept samples of source
positions [k*S, (k+1)*S) for the shard size S, so a shard can be rewritten on its own. A shard
that would hold no sample (all its items left out) is not written: meta.json lists the shard
numbers of a split under "shards" (`shard_ids`), which then has a gap. No shard is ever empty.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.errors import DataError

FORMAT_NAME = "iccl-shards"
FORMAT_VERSION = 1
META_FILE = "meta.json"
# written first by a conversion (what was asked); with no META_FILE beside it, the conversion is unfinished
REQUEST_FILE = "convert.json"
INDEX_FILE = "index.npy"

# offset/size locate the image bytes (not the tar header) inside the shard, so a sample is one slice
# of a memory-mapped file; ext says how to decode them.
INDEX_DTYPE = np.dtype(
    [("shard", "<i4"), ("offset", "<i8"), ("size", "<i8"), ("label", "<i4"), ("ext", "u1")]
)
EXTS = ("jpg", "png")  # index value -> member suffix
EXT_CODE = {e: i for i, e in enumerate(EXTS)}

# Many / medium / few by the training count of the class (the literature's convention).
MANY_ABOVE = 100
FEW_BELOW = 20


def shard_name(k: int) -> str:
    return f"shard-{k:06d}.tar"


def shard_ids(info: dict) -> list[int]:
    """The shard numbers of a split, from its meta.json entry, in order (datasets written before
    the "shards" list existed have shards 0 .. num_shards - 1)."""
    return [int(k) for k in info.get("shards", range(info["num_shards"]))]


def sample_key(i: int) -> str:
    """Member name stem of the sample at source position i."""
    return f"{i:09d}"


def beton_name(split: str) -> str:
    return f"{split}.beton"


def shot_groups(train_counts) -> dict[str, list[int]]:
    """Class ids per group: many (> 100 training images), medium (20-100), few (< 20)."""
    counts = np.asarray(train_counts)
    return {
        "many": np.flatnonzero(counts > MANY_ABOVE).tolist(),
        "medium": np.flatnonzero((counts >= FEW_BELOW) & (counts <= MANY_ABOVE)).tolist(),
        "few": np.flatnonzero(counts < FEW_BELOW).tolist(),
    }


def read_meta(root: str | Path) -> dict:
    """meta.json of a converted dataset, with a clear error when `root` is not one."""
    root = Path(root)
    path = root / META_FILE
    if not root.is_dir():
        raise DataError(f"{root}: no such folder. Pass the output folder of `iccl convert`.")
    if not path.is_file():
        if (root / REQUEST_FILE).is_file():
            raise DataError(f"{path} is missing: the conversion into {root} did not finish. Run the same "
                            f"`iccl convert ... --out {root}` again (it resumes).")
        # Never suggest converting into a folder that holds something else (a run, photographs).
        run = (" It holds a training run (config.json): `iccl eval --run " + str(root) + "` evaluates it."
               if (root / "config.json").is_file() else "")
        raise DataError(f"{root}: not a converted dataset (no {META_FILE}).{run} Pass the --out of "
                        f"`iccl convert`.")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable ({e}). Re-run the conversion into a fresh folder.") from e
    if meta.get("format") != FORMAT_NAME or meta.get("version") != FORMAT_VERSION:
        raise DataError(
            f"{path}: format {meta.get('format')!r} version {meta.get('version')!r}, expected "
            f"{FORMAT_NAME!r} version {FORMAT_VERSION}. Re-convert the dataset with this version."
        )
    return meta
