"""Small converted datasets written directly in the on-disk format, for tests of the readers,
samplers and loaders (independent of the conversion engine, which has tests of its own)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from pipeline.atomic import write_json
from pipeline.codecs import encode_jpeg, encode_png
from pipeline.format import FORMAT_NAME, FORMAT_VERSION, INDEX_FILE, META_FILE, shard_name, shot_groups
from pipeline.shards import write_shard


def make_converted(out: Path, splits: dict[str, tuple[list[np.ndarray], np.ndarray]],
                   num_classes: int, ext: str = "png", shard_size: int = 64,
                   quality: int = 95) -> Path:
    """Write `splits` ({name: (list of HWC uint8 images, labels)}) as a converted dataset at `out`."""
    out.mkdir(parents=True, exist_ok=True)
    encode = encode_png if ext == "png" else (lambda im: encode_jpeg(im, quality))
    meta_splits = {}
    for name, (images, labels) in splits.items():
        labels = np.asarray(labels, dtype=np.int64)
        d = out / name
        d.mkdir(exist_ok=True)
        rows = []
        for k, start in enumerate(range(0, len(images), shard_size)):
            stop = min(start + shard_size, len(images))
            rows.append(write_shard(d / shard_name(k), k, start,
                                    [(encode(images[i]), ext, int(labels[i])) for i in range(start, stop)]))
        np.save(d / INDEX_FILE, np.concatenate(rows))
        meta_splits[name] = {
            "num_samples": len(images), "num_shards": len(rows),
            "class_counts": np.bincount(labels, minlength=num_classes).tolist(),
            "bytes": sum(p.stat().st_size for p in d.glob("shard-*.tar")),
            "formats": ["webdataset"], "skipped": 0, "converted_to_rgb": 0, "reencoded": 0,
        }
    write_json(out / META_FILE, {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "name": "test",
        "classes": [f"class_{k}" for k in range(num_classes)],
        "splits": meta_splits,
        "shot_groups": shot_groups(meta_splits["train"]["class_counts"]) if "train" in meta_splits else None,
        "source": {"kind": "tests"}, "options": {},
    })
    return out


def random_images(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def smooth_images(n: int, h: int, w: int, seed: int) -> list[np.ndarray]:
    """Gradients plus mild noise: JPEG keeps them close, so decoders agree within a few levels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    out = []
    for _ in range(n):
        a, b, c = rng.uniform(0.5, 3, 3)
        base = np.stack([a * yy, b * xx, c * (yy + xx)], -1) + rng.uniform(0, 60, 3)
        out.append(np.clip(base + rng.normal(0, 3, base.shape), 0, 255).astype(np.uint8))
    return out


def np_pad_crop(img, pad, top, left, size, flip):
    """The pad-crop-flip recipe, written out per sample."""
    h, w, _ = img.shape
    padded = np.zeros((h + 2 * pad, w + 2 * pad, 3), np.uint8)
    padded[pad:pad + h, pad:pad + w] = img
    out = padded[top:top + size, left:left + size]
    return out[:, ::-1] if flip else out


def hwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(0, 2, 3, 1).numpy()


K = 4  # classes of `make_tiny_lt` and `train_tiny_run`


def make_tiny_lt(root: Path, val_per_class: int = 0) -> Path:
    """A converted 4-class 32-px long-tailed dataset at `root`: train counts 24 / 12 / 8 / 4, 16
    balanced test images and, with val_per_class > 0, a balanced "val" split. The tests' small
    training runs use it."""
    splits = {"train": (random_images(48, 32, seed=1), np.repeat(np.arange(K), [24, 12, 8, 4])),
              "test": (random_images(16, 32, seed=2), np.arange(16) % K)}
    if val_per_class:
        splits["val"] = (random_images(K * val_per_class, 32, seed=3), np.arange(K * val_per_class) % K)
    return make_converted(root, splits, K)


def tiny_config(data: Path, method: str = "iccl", overrides: dict | None = None, **given):
    """The tests' small-run settings on `data`: synthetic-lt, 2 + 1 epochs of batch 16, no lr warm-up,
    one lr step, the in-memory loader, no time-based checkpoints; `overrides` are --set strings,
    `given` typed values that replace these."""
    from train.config import resolve
    sets = {"lr_warmup_epochs": "0", "lr_steps": "1", "checkpoint_minutes": "0", **(overrides or {})}
    speed = dict(epochs=2, warmup_epochs=1, batch_size=16, s2_epochs=1, loader="resident", workers=0,
                 log_every=1, eval_batch_size=16)
    return resolve("synthetic-lt", method, sets, data=str(data), **{**speed, **given})


def train_tiny_run(root: Path) -> dict:
    """A finished ICCL run (default amp, TensorBoard on) on a 4-class 32-px dataset (train counts
    24 / 12 / 8 / 4, 16 test images), and a folder of image files: two 32-px PNGs (one nested), a
    48x40 JPEG (resized by the eval transform), a corrupt file, a hidden file and a text file."""
    from PIL import Image
    from train.runner import train
    data = make_tiny_lt(root / "data")
    report = train(tiny_config(data, overrides={"tensorboard": "true"}), root / "run")
    photos = root / "photos"
    (photos / "b" / "nested").mkdir(parents=True)
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(photos / "a.png")
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(photos / "b" / "nested" / "c.png")
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(photos / "wide.jpg", quality=95)
    (photos / "broken.jpg").write_bytes(b"\xff\xd8 this is not a JPEG")
    (photos / ".hidden.png").write_bytes(b"skipped")
    (photos / "notes.txt").write_text("not an image")
    return {"root": root, "data": data, "run": root / "run", "photos": photos, "report": report}


def check_field_readers(root: Path) -> None:
    """Assert that the `webdataset` library and DALI's CPU `fn.readers.webdataset` read every split
    of the converted dataset at `root` as its index says (same keys, bytes and labels, in order),
    and that no shard file is empty or left out of meta.json (DALI refuses a dataset with an empty
    shard: "Underful sample detected")."""
    import webdataset as wds

    from pipeline.dataset import ShardedSplit
    from pipeline.format import sample_key, shard_ids

    for split in json.loads((Path(root) / META_FILE).read_text())["splits"]:
        ds = ShardedSplit(root, split)
        paths = [str(ds.shard_path(k)) for k in shard_ids(ds.info)]
        assert sorted(str(p) for p in ds.dir.glob("shard-*.tar")) == sorted(paths), split
        expected = [(bytes(ds.encoded(i)), int(ds.labels[i])) for i in range(len(ds))]
        assert all(len(ds.index[ds.index["shard"] == k]) for k in shard_ids(ds.info)), "empty shard"
        if not paths:
            assert not expected
            continue
        got = [(s.get("jpg", s.get("png")), int(s["cls"])) for s in wds.WebDataset(paths, shardshuffle=False)]
        assert got == expected, f"webdataset library, split {split}"
        keys = [s["__key__"] for s in wds.WebDataset(paths, shardshuffle=False)]
        assert keys == sorted(keys) and len(set(keys)) == len(keys)
        assert all(k == sample_key(int(k)) for k in keys)
        assert _dali_webdataset(paths, len(expected)) == expected, f"DALI reader, split {split}"


def _dali_webdataset(paths: list[str], n: int) -> list[tuple[bytes, int]]:
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=min(n, 64), num_threads=1, device_id=None)  # CPU only
    def read():
        return tuple(fn.readers.webdataset(paths=paths, ext=["jpg;png", "cls"], name="reader",
                                           missing_component_behavior="error", random_shuffle=False))

    pipe = read()
    pipe.build()
    assert pipe.epoch_size("reader") == n
    out = []
    while len(out) < n:  # the last batch wraps around to the start: keep the first n
        images, labels = pipe.run()
        out += [(np.array(images[i]).tobytes(), int(np.array(labels[i]).tobytes()))
                for i in range(len(images))]
    del pipe
    return out[:n]
