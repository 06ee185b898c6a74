"""A user's path on photographs, end to end through the CLI: an ImageNet-like tree of JPEGs of
varying sizes with LT list files -> `iccl convert imagenet-lt` -> `iccl verify` -> `iccl train`
(random resized crop, through each loader that reads JPEGs of mixed sizes) -> `iccl eval`."""
from __future__ import annotations

import json

import numpy as np
import pytest
import simplejpeg

from tools.cli import main as cli

WNIDS = ("n01440764", "n01443537", "n01484850")
TRAIN_COUNTS = (24, 10, 4)


@pytest.fixture(scope="module")
def imagenet_lt(tmp_path_factory):
    """ImageNet layout (train/<wnid>/, val/<wnid>/) with the three LT lists; smooth, class-coloured
    JPEGs of 40-72 px so that crops and resizes do real work."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    lists = {"train": [], "val": [], "test": []}
    for k, wnid in enumerate(WNIDS):
        for split, n in (("train", TRAIN_COUNTS[k]), ("val", 3), ("test", 3)):
            folder = root / ("train" if split == "train" else "val") / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                h, w = rng.integers(40, 73, 2)
                img = np.clip(rng.normal(60 + 70 * k, 25, (h, w, 3)), 0, 255).astype(np.uint8)
                name = f"{wnid}_{split}_{i}.JPEG"
                (folder / name).write_bytes(simplejpeg.encode_jpeg(img, quality=90))
                lists[split].append(f"{folder.relative_to(root)}/{name} {k}")
    for split, rows in lists.items():
        (root / f"ImageNet_LT_{split}.txt").write_text("\n".join(rows) + "\n")
    out = tmp_path_factory.mktemp("converted") / "imagenet-lt"
    assert cli(["-q", "convert", "imagenet-lt", "--root", str(root), "--lists", str(root),
                "--out", str(out), "--ffcv", "--workers", "1"]) == 0
    assert cli(["-q", "verify", str(out), "--workers", "1"]) == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["reference", "dali", "ffcv"])
def test_convert_train_eval_on_photographs(imagenet_lt, tmp_path, loader, capsys):
    run = tmp_path / "run"
    assert cli(["-q", "train", "--preset", "imagenet-lt", "--data", str(imagenet_lt), "--out", str(run),
                "--epochs", "2", "--batch-size", "8", "--loader", loader, "--workers", "1",
                "--set", "arch=resnet32", "--set", "proj_dim=16", "--set", "image_size=32",
                "--set", "eval_resize=36", "--set", "s2_epochs=1", "--set", "eval_batch_size=8"]) == 0
    report = json.loads((run / "report.json").read_text())
    assert report["stage2"]["num_samples"] == 9  # the test split: 3 per class
    assert cli(["-q", "eval", "--run", str(run), "--json", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["top1"] == pytest.approx(report["stage2"]["top1"])
