"""Writing one WebDataset shard and its index rows.

A shard is a plain POSIX tar of `KEY.jpg|png` + `KEY.cls` members. We write the tar headers
ourselves (via `tarfile.TarInfo.tobuf`) so that the byte offset of every image is known while
writing: the index then locates any sample without reading the tar again.
"""
from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Iterable

import numpy as np

from pipeline.atomic import atomic_open
from pipeline.format import EXT_CODE, INDEX_DTYPE, sample_key

BLOCK = tarfile.BLOCKSIZE  # 512
# Fixed metadata so that a rerun writes byte-identical shards.
_MTIME = 0

def _member(name: str, data: bytes) -> tuple[bytes, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = _MTIME
    info.mode = 0o444
    header = info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")
    pad = b"\0" * ((-len(data)) % BLOCK)
    return header, pad

def write_shard(path: Path, shard: int, first: int, records: Iterable[tuple]) -> np.ndarray:
    """Write records (image bytes, 'jpg'|'png', label[, key]) as the samples of `shard`.

    A record's key is its source position (`format.sample_key`); without one, records get keys
    first, first+1, ... Records are consumed one at a time, so a generator keeps memory flat.
    The file appears at `path` only when complete (atomic rename); returns its index rows.
    """
    rows = []
    with atomic_open(path, "wb") as f:
        pos = 0
        for j, record in enumerate(records):
            data, ext, label = record[:3]
            key = sample_key(record[3] if len(record) > 3 else first + j)
            header, pad = _member(f"{key}.{ext}", data)
            f.write(header)
            rows.append((shard, pos + len(header), len(data), label, EXT_CODE[ext]))
            f.write(data)
            f.write(pad)
            pos += len(header) + len(data) + len(pad)
            cls = str(int(label)).encode()
            header, pad = _member(f"{key}.cls", cls)
            f.write(header + cls + pad)
            pos += len(header) + len(cls) + len(pad)
        f.write(b"\0" * (2 * BLOCK))  # end-of-archive marker
    return np.array(rows, dtype=INDEX_DTYPE)

def read_member_names(path: Path) -> list[str]:
    """Member names in order (used by verify and tests to check what a tar reader sees)."""
    with tarfile.open(path, "r:") as tar:
        return tar.getnames()

