"""JPEG trees in the real layouts of ImageNet-LT and iNaturalist 2018, with their real class counts,
for measuring conversion, loading, sampling and evaluation at the real sizes without the images.

    imagenet-lt  ROOT/train/<wnid>/<wnid>_<n>.JPEG and ROOT/val/<wnid>/ILSVRC2012_val_<n>.JPEG,
                 ImageNet-size (500x375 mostly, ImageNet's common shapes; see tools/bench_data.py),
                 LISTS/ImageNet_LT_{train,val,test}.txt: 115,846 / 20,000 / 50,000 lines
    inat2018     ROOT/train_val2018/<supercategory>/<category id>/<32 hex>.jpg at 128x96 or 96x128
                 (long side 128 px: real iNaturalist photos are ~800 px, which would not fit a
                 small disk 462k times), with LISTS/iNaturalist18_{train,val}.txt (437,513 / 24,426
                 lines) or, with json=True, ROOT/train2018.json and ROOT/val2018.json (COCO-style)

Train counts per class are the real ones, shipped in tools/data/lt_class_counts.json (keys
ImageNet_LT_train_cls_num, iNaturalist18_train_cls_num), or another file with those keys. The
val/test lists are the real ones when a folder holding them is given (`ImageNet_LT_val.txt`,
`ImageNet_LT_test.txt`, `iNaturalist18_val.txt`; they also give the real wnids and
supercategories); without one, lists of the published shape are made up (20 / 50 images per
class for ImageNet-LT, 3 for iNaturalist, synthetic wnids and supercategories). `scale` keeps
max(1, round(scale x n)) images of every class in every split.

Content: a pool of `POOL` distinct photographic mosaics (of the CIFAR-10 test images of the
download given as `tiles_from`, as the bench data uses them; of smooth-noise tiles without one)
encoded once as baseline JPEG; every file is a pool JPEG with a COM segment naming the file
inserted after the SOI marker, so every file differs byte-wise and decodes to its pool image. Decode
cost per file is that of a real photograph of the size; making a tree costs file writes only,
spread over `workers` processes.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np
import simplejpeg

from pipeline.atomic import atomic_open, write_json
from pipeline.cpus import usable_cpus
from pipeline.errors import DataError
from pipeline.progress import progress, say

# The real per-class training counts of ImageNet-LT (1,000 classes, 115,846 images) and iNaturalist
# 2018 (8,142 classes, 437,513 images), shipped with the package: the `cls_num` lists of the LiVT
# release (its "source" field), index = class id.
COUNTS_FILE = Path(__file__).resolve().parent / "data" / "lt_class_counts.json"
COUNT_KEYS = {"imagenet-lt": "ImageNet_LT_train_cls_num", "inat2018": "iNaturalist18_train_cls_num"}
PER_CLASS = {"imagenet-lt": {"val": 20, "test": 50}, "inat2018": {"val": 3}}
REAL_LISTS = {"imagenet-lt": {"val": "ImageNet_LT_val.txt", "test": "ImageNet_LT_test.txt"},
              "inat2018": {"val": "iNaturalist18_val.txt"}}
LIST_NAMES = {"imagenet-lt": {"train": "ImageNet_LT_train.txt", **REAL_LISTS["imagenet-lt"]},
              "inat2018": {"train": "iNaturalist18_train.txt", **REAL_LISTS["inat2018"]}}
INAT_SHAPES = ((96, 128), (128, 96))
INAT_SHAPE_WEIGHTS = (0.7, 0.3)
INAT_SUPERCATEGORIES = ("Plantae", "Insecta", "Aves", "Reptilia", "Mammalia", "Fungi", "Amphibia",
                        "Mollusca", "Animalia", "Arachnida", "Actinopterygii", "Chromista",
                        "Protozoa", "Bacteria")
POOL = 256
DONE_FILE = "trees.json"
_TRAIN_NUMBER = 200_000  # train file numbers start here: above every number in the real val list


def load_counts(kind: str, counts_file: Optional[Path]) -> np.ndarray:
    path = Path(counts_file) if counts_file else COUNTS_FILE
    if not path.is_file():
        raise DataError(f"{path}: no per-class counts file. Pass --counts FILE, a JSON with the key "
                        f"{COUNT_KEYS[kind]} (a list of training images per class).")
    try:
        counts = np.asarray(json.loads(path.read_text())[COUNT_KEYS[kind]], dtype=np.int64)
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: no list {COUNT_KEYS[kind]!r} of per-class counts ({e}). Pass the "
                        f"per-class counts of the real dataset with --counts.") from None
    if counts.ndim != 1 or len(counts) == 0 or (counts < 1).any():
        raise DataError(f"{path}: {COUNT_KEYS[kind]} must be a list of positive counts.")
    return counts


def scaled(n: np.ndarray | int, scale: float):
    """max(1, round(scale x n)), per class."""
    return np.maximum(1, np.round(np.asarray(n) * scale)).astype(np.int64)


def _read_lines(path: Path) -> list[tuple[str, int]]:
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            rel, label = line.rsplit(maxsplit=1)
            out.append((rel, int(label)))
    return out


def _keep_per_class(lines: list[tuple[str, int]], scale: float) -> list[tuple[str, int]]:
    """The first max(1, round(scale x n_k)) lines of every class, in file order."""
    if scale >= 1:
        return lines
    labels = np.array([label for _, label in lines])
    keep = scaled(np.bincount(labels), scale)
    seen = np.zeros_like(keep)
    out = []
    for rel, label in lines:
        if seen[label] < keep[label]:
            out.append((rel, label))
            seen[label] += 1
    return out


# --- the layouts -----------------------------------------------------------------------------------
def imagenet_lt_lists(counts: np.ndarray, scale: float, lists_dir: Optional[Path]) -> dict:
    """{split: [(relative path, label)]} for train, val and test."""
    real = {s: Path(lists_dir) / name for s, name in REAL_LISTS["imagenet-lt"].items()} if lists_dir else {}
    wnids = [f"n{90000000 + k:08d}" for k in range(len(counts))]
    given = {s: _read_lines(p) for s, p in real.items() if p.is_file()}
    for lines in given.values():  # the real wnid of each label
        for rel, label in lines:
            if label < len(wnids):
                wnids[label] = rel.split("/")[1]
    out = {}
    for split, per in PER_CLASS["imagenet-lt"].items():
        if split in given:
            out[split] = _keep_per_class([x for x in given[split] if x[1] < len(counts)], scale)
        elif split == "val":  # ImageNet-LT's val images are ImageNet train images
            out[split] = [(f"train/{wnids[k]}/{wnids[k]}_{100_000 + j}.JPEG", k)
                          for k in range(len(counts)) for j in range(int(scaled(per, scale)))]
        else:
            n = int(scaled(per, scale))
            out[split] = [(f"val/{wnids[k]}/ILSVRC2012_val_{k * n + j + 1:08d}.JPEG", k)
                          for k in range(len(counts)) for j in range(n)]
    n_train = scaled(counts, scale)
    out["train"] = [(f"train/{wnids[k]}/{wnids[k]}_{_TRAIN_NUMBER + j}.JPEG", k)
                    for k in range(len(counts)) for j in range(int(n_train[k]))]
    return {s: out[s] for s in ("train", "val", "test")}


def inat_lists(counts: np.ndarray, scale: float, lists_dir: Optional[Path]) -> tuple[dict, list[str]]:
    """({split: [(relative path, category id)]} for train and val, supercategory of each id)."""
    real = Path(lists_dir) / REAL_LISTS["inat2018"]["val"] if lists_dir else None
    supercats = [INAT_SUPERCATEGORIES[k % len(INAT_SUPERCATEGORIES)] for k in range(len(counts))]
    out = {}
    if real is not None and real.is_file():
        val = [x for x in _read_lines(real) if x[1] < len(counts)]
        for rel, label in val:
            supercats[label] = rel.split("/")[1]
        out["val"] = _keep_per_class(val, scale)
    else:
        out["val"] = [(_inat_path(supercats[k], k, "val", j), k)
                      for k in range(len(counts)) for j in range(int(scaled(PER_CLASS["inat2018"]["val"], scale)))]
    n_train = scaled(counts, scale)
    out["train"] = [(_inat_path(supercats[k], k, "train", j), k)
                    for k in range(len(counts)) for j in range(int(n_train[k]))]
    return {s: out[s] for s in ("train", "val")}, supercats


def _inat_path(supercategory: str, cid: int, split: str, j: int) -> str:
    name = hashlib.md5(f"{split}/{cid}/{j}".encode()).hexdigest()  # iNat's file names are 32 hex
    return f"train_val2018/{supercategory}/{cid}/{name}.jpg"


# --- content ---------------------------------------------------------------------------------------
def jpeg_pool(kind: str, size: int, quality: int, tiles: np.ndarray, rng: np.random.Generator) -> list[bytes]:
    """`size` baseline 4:2:0 JPEGs of photographic mosaics of `tiles` ((N, 32, 32, 3) uint8, from
    tools.bench_data.photo_tiles) in the kind's shapes."""
    from tools.bench_data import GRAIN, PHOTO_SHAPE_WEIGHTS, PHOTO_SHAPES, photo_mosaic

    shapes, weights = (PHOTO_SHAPES, PHOTO_SHAPE_WEIGHTS) if kind == "imagenet-lt" else (INAT_SHAPES, INAT_SHAPE_WEIGHTS)
    grain = rng.normal(0, GRAIN, (600, 600, 3)).astype(np.float32)
    pool = []
    for s in rng.choice(len(shapes), size=size, p=weights):
        pixels = photo_mosaic(tiles, *shapes[s], grain, rng)
        pool.append(simplejpeg.encode_jpeg(pixels, quality=quality, colorspace="RGB", colorsubsampling="420"))
    return pool


def with_comment(jpeg: bytes, text: str) -> bytes:
    """`jpeg` with a COM segment holding `text` right after SOI: other bytes, the same pixels."""
    payload = text.encode()[:65000]
    return jpeg[:2] + b"\xff\xfe" + (len(payload) + 2).to_bytes(2, "big") + payload + jpeg[2:]


_pool: list[bytes] = []


def _init_worker(pool: list[bytes]) -> None:
    global _pool
    _pool = pool


def _write_files(root: str, relpaths: list[str]) -> int:
    """Write each file (pool JPEG chosen by a hash of its path, plus its COM segment); returns bytes."""
    made, total = set(), 0
    for rel in relpaths:
        path = os.path.join(root, rel)
        folder = os.path.dirname(path)
        if folder not in made:
            os.makedirs(folder, exist_ok=True)
            made.add(folder)
        k = int.from_bytes(hashlib.md5(rel.encode()).digest()[:4], "little") % len(_pool)
        data = with_comment(_pool[k], rel)
        with open(path, "wb") as f:
            f.write(data)
        total += len(data)
    return total


def real_lists(kind: str, lists_dir: Optional[Path], counts_file: Optional[Path]) -> dict[str, Path]:
    """{file name: path} of the real val/test lists of `kind` found in `lists_dir` (default: beside
    `counts_file`, where the real lists usually sit; else none). DataError when a `lists_dir` was
    given and holds none of them (a mistyped folder must not fall back to made-up lists)."""
    folder = Path(lists_dir) if lists_dir else (Path(counts_file).parent if counts_file else None)
    if folder is None:
        return {}
    found = {n: folder / n for n in REAL_LISTS[kind].values() if (folder / n).is_file()}
    if lists_dir and not found:
        raise DataError(f"--lists-dir {lists_dir}: none of {', '.join(REAL_LISTS[kind].values())} is "
                        f"there. Give the folder holding the official lists, or leave --lists-dir out "
                        f"for made-up lists of the published shape.")
    return found


# --- one tree --------------------------------------------------------------------------------------
def make_tree(kind: str, out: Path, *, scale: float = 1.0, counts_file: Optional[Path] = None,
              lists_dir: Optional[Path] = None, json_annotations: bool = False, workers: Optional[int] = None,
              quality: int = 90, seed: int = 0, tiles_from: Optional[Path] = None) -> dict:
    """Write the `kind` tree (module docstring) to OUT/root (images) and OUT/lists (list files;
    iNaturalist with `json_annotations`: OUT/root/{train,val}2018.json instead) and return its
    record, also written to OUT/trees.json last. A rerun with the same arguments finds it done.
    `counts_file` defaults to the real counts shipped in tools/data; `lists_dir` (default: beside
    a given `counts_file`, else none) holds the real val/test lists, made up without them;
    `tiles_from` is the CIFAR-10 download whose test images tile the JPEGs (noise without it)."""
    if kind not in COUNT_KEYS:
        raise DataError(f"unknown tree {kind!r}; choose one of {', '.join(COUNT_KEYS)}")
    if not 0 < scale <= 1:
        raise DataError(f"--scale {scale}: must be in (0, 1] (the fraction of each class kept)")
    if json_annotations and kind != "inat2018":
        raise DataError("--json applies to inat2018 only (ImageNet-LT comes with list files)")
    from tools.bench_data import photo_tiles

    out = Path(out)
    counts = load_counts(kind, counts_file)
    lists_found = real_lists(kind, lists_dir, counts_file)
    rng = np.random.default_rng(seed)
    tiles, content = photo_tiles(tiles_from, rng)  # a bad download is refused before anything else
    request = {"kind": kind, "scale": scale, "json": json_annotations, "quality": quality, "seed": seed,
               "counts_sha256": hashlib.sha256(counts.tobytes()).hexdigest(), "tiles": content,
               "lists_sha256": {name: hashlib.sha256(p.read_bytes()).hexdigest()
                                for name, p in sorted(lists_found.items())}}
    done = out / DONE_FILE
    if done.is_file():
        record = json.loads(done.read_text())
        if record.get("request") == request:
            say(f"{out}: the {kind} tree is already complete")
            return record
        done.unlink()  # another tree is written over this one: an interrupted rewrite is not "done"
    if lists_found:
        lists_dir = next(iter(lists_found.values())).parent
    t0 = time.perf_counter()
    if kind == "imagenet-lt":
        lists = imagenet_lt_lists(counts, scale, lists_dir)
        supercats = None
    else:
        lists, supercats = inat_lists(counts, scale, lists_dir)
    root, lists_out = out / "root", out / "lists"
    relpaths = sorted({rel for entries in lists.values() for rel, _ in entries})
    pool = jpeg_pool(kind, POOL, quality, tiles, rng)
    workers = workers or usable_cpus()
    chunks = [relpaths[s:s + 2000] for s in range(0, len(relpaths), 2000)]
    total_bytes = 0
    with progress(len(relpaths), f"{kind} tree", unit="files") as task, \
            ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(pool,)) as ex:
        for chunk, nbytes in zip(chunks, ex.map(_write_files, [str(root)] * len(chunks), chunks)):
            total_bytes += nbytes
            task.advance(len(chunk))
    if json_annotations:
        for split, entries in lists.items():
            write_json(root / f"{split}2018.json", _coco(entries, supercats, len(counts)))
    else:
        lists_out.mkdir(parents=True, exist_ok=True)
        for split, entries in lists.items():
            with atomic_open(lists_out / LIST_NAMES[kind][split], "w") as f:
                f.write("".join(f"{rel} {label}\n" for rel, label in entries))
    record = {"request": request, "root": str(root), "lists": None if json_annotations else str(lists_out),
              "images": {split: len(entries) for split, entries in lists.items()},
              "num_classes": len(counts), "files": len(relpaths), "bytes": total_bytes,
              "seconds": round(time.perf_counter() - t0, 1),
              "real_lists": {s: n in lists_found for s, n in REAL_LISTS[kind].items()}}
    write_json(done, record)
    return record


def _coco(entries: list[tuple[str, int]], supercats: list[str], num_classes: int) -> dict:
    """An iNaturalist 2018 annotation file (COCO-style) for `entries`."""
    return {
        "info": {"description": "generated iNaturalist 2018 layout", "year": 2018},
        "images": [{"id": i, "file_name": rel} for i, (rel, _) in enumerate(entries)],
        "annotations": [{"id": i, "image_id": i, "category_id": label} for i, (_, label) in enumerate(entries)],
        "categories": [{"id": k, "name": f"species {k}", "supercategory": supercats[k]} for k in range(num_classes)],
    }
