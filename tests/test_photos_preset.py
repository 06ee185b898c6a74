"""The `photos` preset: its recipe, the CPU-sized settings README gives, and a tiny run through both stages."""
from __future__ import annotations

import importlib

import numpy as np
import pytest

from helpers import make_converted, smooth_images
from train.config import resolve
from train.runner import train

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def test_photos_recipe():
    c = resolve("photos")
    assert (c.arch, c.augment, c.image_size, c.eval_resize, c.jitter) == ("resnet50", "rrc", 224, 256, 0.4)
    assert (c.mean, c.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert (c.schedule, c.epochs, c.warmup_epochs, c.w_u_after_warmup) == ("cosine", 60, 30, 1.0)
    assert (c.s2_epochs, c.s2_finetune_encoder, c.pretrained) == (10, False, "")
    assert c.scaled_lr(c.lr) == pytest.approx(0.025)  # 0.1 per 256 images, at batch 64


def test_cpu_sized_settings_of_the_readme():
    c = resolve("photos", overrides={"arch": "resnet18", "image_size": "96", "eval_resize": "112"},
                epochs=10)
    assert (c.arch, c.image_size, c.eval_resize, c.epochs, c.warmup_epochs) == ("resnet18", 96, 112, 10, 5)


@pytest.mark.slow
def test_tiny_photos_run_with_a_torchvision_encoder(tmp_path):
    try:
        importlib.import_module("torchvision")
    except Exception as e:  # a torchvision built for another torch fails with RuntimeError
        pytest.skip(f"torchvision is not importable here ({type(e).__name__}: {e})")
    labels = np.repeat(np.arange(3), [10, 6, 4])
    make_converted(tmp_path / "data", {"train": (smooth_images(20, 48, 64, seed=1), labels),
                                       "test": (smooth_images(6, 48, 64, seed=2), np.arange(6) % 3)}, 3)
    cfg = resolve("photos", "iccl", {"arch": "resnet18", "image_size": "32", "eval_resize": "40",
                                     "proj_dim": "16"},
                  data=str(tmp_path / "data"), epochs=2, batch_size=8, s2_epochs=1, workers=0,
                  loader="reference")
    report = train(cfg, tmp_path / "run")
    for stage in ("stage1", "stage2"):
        assert report[stage]["num_samples"] == 6 and 0.0 <= report[stage]["top1"] <= 100.0
