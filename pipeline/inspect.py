"""What a converted dataset holds (`dataset_info`) and whether it is intact (`verify`).

`verify` re-reads everything with readers independent of the writer: Python's `tarfile` for the
shard structure, the decoders for every image, FFCV's own reader for the `.beton`. It returns
problems as sentences naming the file, what is wrong, and what to do; an empty list means intact.
"""
from __future__ import annotations

import io
import multiprocessing
import os
import tarfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import simplejpeg
from PIL import Image

from pipeline.convert_items import MIN_SIDE
from pipeline.convert_shard import file_sha256
from pipeline.cpus import usable_cpus
from pipeline.dataset import ShardedSplit
from pipeline.errors import DataError
from pipeline.format import (EXTS, INDEX_FILE, META_FILE, beton_name, read_meta, sample_key,
                             shard_ids, shard_name, shot_groups)
from pipeline.progress import count, progress

_MAX_PER_SHARD = 5  # problems listed per shard before "... and N more"


# --- info -------------------------------------------------------------------------------------
def split_bytes(root: Path, split: str, split_meta: dict) -> int:
    """Bytes on disk of a converted split (`split_meta`: its entry in meta.json): its shards, its
    index and its FFCV file if any. The one definition of a split's size, reported by `iccl convert`
    and `iccl info` alike."""
    files = [Path(root) / split / shard_name(k) for k in shard_ids(split_meta)]
    files += [root / split / INDEX_FILE, root / beton_name(split)]
    return sum(p.stat().st_size for p in files if p.is_file())


def dataset_info(root: str | os.PathLike) -> dict:
    """Name, classes and, per split, counts, imbalance, many/medium/few, formats and bytes on disk.

    many / medium / few count the classes of each split present in it, grouped by their number of
    TRAINING images (the field's convention: > 100, 20-100, < 20), for the test split too
    (`groups_by` says so). Every split's index is checked against meta.json first (DataError)."""
    root = Path(root)
    meta = read_meta(root)
    info = {"name": meta["name"], "classes": meta["classes"], "groups_by": "train class counts",
            "splits": {}}
    groups = meta.get("shot_groups")
    for split, m in meta["splits"].items():
        ShardedSplit(root, split)  # its index against meta.json: a hand-edited meta.json is refused
        counts = np.asarray(m["class_counts"])
        present = counts[counts > 0]
        split_groups = groups or shot_groups(counts)  # without a train split: the split's own
        info["splits"][split] = {
            "num_samples": int(m["num_samples"]),
            "num_classes": int(len(present)),
            "class_counts": counts.tolist(),
            "imbalance_ratio": float(present.max() / present.min()) if len(present) else None,
            **{g: int((counts[split_groups[g]] > 0).sum()) for g in ("many", "medium", "few")},
            "formats": list(m["formats"]),
            "bytes": split_bytes(root, split, m),
        }
    return info


# --- verify -----------------------------------------------------------------------------------
def verify(root: str | os.PathLike, workers: int | None = None) -> list[str]:
    """Every problem found in the converted dataset at `root` (empty: all intact)."""
    root = Path(root)
    try:
        meta = read_meta(root)
    except DataError as e:
        return [str(e)]
    problems, tasks = [], []
    for split in meta["splits"]:
        try:
            ds = ShardedSplit(root, split, check_meta=False)  # _check_index reports the same
        except DataError as e:
            problems.append(str(e))
            continue
        index = np.asarray(ds.index)
        problems += _check_index(root, split, index, ds.info, len(meta["classes"]))
        ids = shard_ids(ds.info)
        digests = ds.info.get("shard_sha256") or [None] * len(ids)
        for k, digest in zip(ids, digests):
            tasks.append((root, split, k, index[index["shard"] == k], digest))
        if "ffcv" in ds.info["formats"]:
            problems += _check_beton(root / beton_name(split), index)
    total = sum(len(t[3]) for t in tasks)
    with progress(total, f"verify {root.name}", unit="images") as bar:
        for found, n in _run(tasks, workers or usable_cpus()):
            problems += found
            bar.advance(n)
    return problems


def _check_index(root: Path, split: str, index: np.ndarray, info: dict, num_classes: int) -> list[str]:
    where = root / split / INDEX_FILE
    fix = f"Convert again into a fresh folder (or delete {root / META_FILE} and rerun the conversion)."
    problems = []
    bad = np.flatnonzero((index["label"] < 0) | (index["label"] >= num_classes))
    if len(bad):
        problems.append(f"{where}: {count(len(bad), 'label')} out of range [0, {num_classes}), first at "
                        f"sample {bad[0]}. {fix}")
    elif np.bincount(index["label"], minlength=num_classes).tolist() != list(info["class_counts"]):
        problems.append(f"{where}: class counts differ from {root / META_FILE}. {fix}")
    order = np.lexsort((index["offset"], index["shard"]))
    outside = ~np.isin(index["shard"], shard_ids(info))
    if outside.any() or not (order == np.arange(len(index))).all():
        problems.append(f"{where}: rows do not follow the shards in order. {fix}")
    return problems


def _check_beton(path: Path, index: np.ndarray) -> list[str]:
    fix = "Delete it and rerun the conversion with --ffcv."
    if not path.is_file():
        return [f"{path}: missing (meta.json lists an FFCV file). {fix}"]
    try:
        from ffcv.reader import Reader

        reader = Reader(str(path))
        labels = reader.metadata[f"f{reader.field_names.index('label')}"]
    except Exception as e:  # any failure of FFCV's reader means the file is unusable
        return [f"{path}: unreadable by FFCV ({type(e).__name__}: {e}). {fix}"]
    if reader.num_samples != len(index):
        return [f"{path}: {reader.num_samples} samples, the index has {len(index)}. {fix}"]
    if not np.array_equal(labels, index["label"]):
        return [f"{path}: labels differ from the index. {fix}"]
    return []


def _run(tasks: list[tuple], workers: int):
    if workers == 1 or len(tasks) <= 1:
        yield from map(_check_shard_task, tasks)
        return
    ctx = multiprocessing.get_context("spawn")  # as in convert: no inherited threads or maps
    with ProcessPoolExecutor(min(workers, len(tasks)), mp_context=ctx) as pool:
        yield from pool.map(_check_shard_task, tasks)


def _check_shard_task(task: tuple) -> tuple[list[str], int]:
    root, split, k, rows, digest = task
    path = root / split / shard_name(k)
    problems = check_shard(path, rows, digest)
    if not path.is_file():
        fix = "Rerun the same `iccl convert` command: it rewrites missing shards."
    elif problems and digest is not None and file_sha256(path) == digest:
        # The shard is byte for byte what the conversion wrote: the index is what is wrong.
        fix = (f"{path.name} itself is intact (its checksum matches meta.json): delete "
               f"{root / split / INDEX_FILE} and rerun the same `iccl convert` command: it rebuilds "
               f"the index from the shard records.")
    else:
        fix = f"Delete {path.name} and rerun the same `iccl convert` command: it rewrites that shard."
    more = len(problems) - _MAX_PER_SHARD
    if more > 0:
        problems = problems[:_MAX_PER_SHARD] + [f"{path}: ... and {count(more, 'more problem')}"]
    return [f"{p} {fix}" for p in problems], len(rows)


def check_shard(path: Path, rows: np.ndarray, digest: str | None) -> list[str]:
    """Problems of one shard: its checksum, its members against its index rows, every image."""
    if not path.is_file():
        return [f"{path}: missing."]
    if digest is not None and file_sha256(path) != digest:
        problems = [f"{path}: checksum differs from meta.json (the file was altered or damaged)."]
    else:
        problems = []
    if not len(rows):  # written by an older version after --on-error skip emptied the shard
        problems.append(f"{path}: holds no sample (DALI's webdataset reader refuses the whole "
                        f"dataset for an empty shard).")
    try:
        with tarfile.open(path, "r:") as tar:
            members = tar.getmembers()
            problems += _check_members(path, tar, members, rows)
    except (tarfile.TarError, OSError) as e:
        problems.append(f"{path}: not a readable tar ({e}).")
    return problems


def _check_members(path: Path, tar: tarfile.TarFile, members: list, rows: np.ndarray) -> list[str]:
    problems = []
    if len(members) != 2 * len(rows):
        problems.append(f"{path}: {len(members)} members, expected {2 * len(rows)} "
                        f"(an image and a .cls per sample; truncated or altered).")
    previous_key = -1
    for j, row in enumerate(rows[: len(members) // 2]):
        image, cls = members[2 * j], members[2 * j + 1]
        ext = EXTS[int(row["ext"])]
        key = image.name.split(".", 1)[0]
        if (image.name != f"{key}.{ext}" or cls.name != f"{key}.cls" or not key.isdigit()
                or key != sample_key(int(key)) or int(key) <= previous_key):
            problems.append(f"{path}: members {image.name!r}, {cls.name!r} where sample {j} "
                            f"should be (increasing KEY.{ext}, KEY.cls).")
            continue
        previous_key = int(key)
        if image.offset_data != row["offset"] or image.size != row["size"]:
            problems.append(f"{path}: {image.name} is at byte {image.offset_data} ({image.size} "
                            f"bytes), the index says {row['offset']} ({row['size']} bytes).")
            continue
        label = tar.extractfile(cls).read()
        if label != str(int(row["label"])).encode():
            problems.append(f"{path}: {cls.name} holds {label[:20]!r}, the index says {row['label']}.")
        problem = image_problem(tar.extractfile(image).read(), ext)
        if problem:
            problems.append(f"{path}: {image.name} {problem}.")
    return problems


def image_problem(data: bytes, ext: str) -> str | None:
    """What is wrong with stored image bytes (they do not decode strictly, or the image is too
    small for the loaders), as the end of a sentence about them; None when nothing is."""
    try:
        if ext == "jpg":
            height, width = simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True).shape[:2]
        else:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                width, height = im.size
    except Exception as e:  # any decoder failure is the finding itself
        return f"does not decode ({type(e).__name__}: {e})"
    if min(width, height) < MIN_SIDE:
        return (f"is {width}x{height} pixels, a side under {MIN_SIDE}: too small for the loaders "
                f"to crop (a conversion refuses such images)")
    return None
