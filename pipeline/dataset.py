"""Reading API of a converted split: labels, counts, the encoded bytes of sample i, decoded pixels.

Shards are memory-mapped and the index says where every sample's bytes are, so reading sample i
costs one slice: no tar scan, safe to share across DataLoader workers (maps open lazily per process).
"""
from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np

from pipeline import codecs
from pipeline.errors import DataError
from pipeline.format import EXTS, INDEX_DTYPE, INDEX_FILE, META_FILE, read_meta, shard_name


class ShardedSplit:
    """One split (`train`, `val`, `test`) of a dataset written by `iccl convert`.

    Opening it checks meta.json against the index (`check_meta`: classes, per-class counts and
    labels agree), so that a hand-edited or damaged meta.json is refused with a DataError naming
    the fix, by every command that opens a dataset, before anything else happens. `iccl verify`
    opens splits with check_meta=False and reports the same findings among all the others."""

    def __init__(self, root: str | os.PathLike, split: str, check_meta: bool = True):
        self.root = Path(root)
        self.split = split
        self.meta = read_meta(self.root)
        if split not in self.meta["splits"]:
            raise DataError(
                f"{self.root}: no split {split!r}; it has {', '.join(sorted(self.meta['splits']))}."
            )
        self.info = self.meta["splits"][split]
        self.dir = self.root / split
        index_path = self.dir / INDEX_FILE
        # A rerun of the conversion keeps an index that exists: it must be deleted to be rebuilt.
        rebuild = (f"Delete {index_path} and rerun the same `iccl convert` command: it rebuilds the "
                   f"index from the shard records.")
        try:
            self.index = np.load(index_path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise DataError(f"{index_path}: unreadable index ({e}). {rebuild}") from e
        if self.index.dtype != INDEX_DTYPE or len(self.index) != self.info["num_samples"]:
            raise DataError(
                f"{index_path}: does not match {self.root / 'meta.json'} "
                f"({len(self.index)} rows, expected {self.info['num_samples']}). {rebuild}"
            )
        self.labels = np.asarray(self.index["label"], dtype=np.int64)
        if check_meta:
            self._check_meta(index_path)
        self._maps: dict[int, mmap.mmap] = {}
        self._pid = os.getpid()

    def _check_meta(self, index_path: Path) -> None:
        counts, k = self.info.get("class_counts"), self.num_classes
        if not isinstance(counts, list) or len(counts) != k:
            found = f"{k} classes but {len(counts) if isinstance(counts, list) else 'no'} class counts"
        elif len(self.labels) and not 0 <= self.labels.min() <= self.labels.max() < k:
            found = f"{k} classes but the index has labels up to {self.labels.max()}"
        elif np.bincount(self.labels, minlength=k).tolist() != counts:
            found = "class counts that differ from the index's labels"
        else:
            return
        raise DataError(f"{self.root / META_FILE} lists {found} (in {index_path}): the file was "
                        f"edited or damaged. Run `iccl verify {self.root}` for every problem, then "
                        f"convert again (delete meta.json and rerun the same `iccl convert`, or use "
                        f"a fresh --out).")

    # --- what the dataset is --------------------------------------------------------------
    @property
    def classes(self) -> list[str]:
        return self.meta["classes"]

    @property
    def num_classes(self) -> int:
        return len(self.meta["classes"])

    @property
    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.num_classes)

    @property
    def num_shards(self) -> int:
        return int(self.info["num_shards"])

    def shard_path(self, k: int) -> Path:
        return self.dir / shard_name(k)

    def __len__(self) -> int:
        return len(self.index)

    # --- reading samples ------------------------------------------------------------------
    def _map(self, k: int) -> mmap.mmap:
        if os.getpid() != self._pid:  # forked worker: maps of the parent are not ours to use
            self._maps, self._pid = {}, os.getpid()
        m = self._maps.get(k)
        if m is None:
            path = self.shard_path(k)
            try:
                with open(path, "rb") as f:
                    m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as e:
                raise DataError(f"{path}: cannot open shard ({e}). Re-run `iccl convert` "
                                f"on {self.root} to rewrite it.") from e
            self._maps[k] = m
        return m

    def encoded(self, i: int) -> memoryview:
        """The stored image bytes of sample i (a zero-copy view of the shard)."""
        row = self.index[i]
        m = self._map(int(row["shard"]))
        start, size = int(row["offset"]), int(row["size"])
        if start + size > len(m):
            raise DataError(
                f"{self.shard_path(int(row['shard']))}: truncated (sample {i} ends at byte "
                f"{start + size}, file has {len(m)}). Re-run `iccl convert` on {self.root}."
            )
        return memoryview(m)[start:start + size]

    def ext(self, i: int) -> str:
        return EXTS[int(self.index[i]["ext"])]

    def decode(self, i: int) -> np.ndarray:
        """Sample i as (H, W, 3) uint8 RGB."""
        return codecs.decode(self.encoded(i), self.ext(i))

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.decode(i), int(self.labels[i])

    def __iter__(self):
        """(pixels, label) in sample order; shards are read front to back."""
        for i in range(len(self)):
            yield self[i]

    def __getstate__(self):  # mmaps do not pickle; workers reopen them
        state = self.__dict__.copy()
        state["_maps"] = {}
        return state


def open_split(root: str | os.PathLike, split: str) -> ShardedSplit:
    return ShardedSplit(root, split)
