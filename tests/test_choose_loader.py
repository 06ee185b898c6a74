"""`--loader auto` on a CPU never picks a loader measured slower than the reference for the data
at hand (the rule in `pipeline.loaders.choose_loader`)."""
from __future__ import annotations

import numpy as np
import pytest

import pipeline.loaders as loaders
from helpers import make_converted, random_images, smooth_images
from pipeline.dataset import ShardedSplit
from pipeline.loaders import AugmentSpec, choose_loader
from pipeline.loaders.resident import common_size

RRC = AugmentSpec(kind="rrc", size=224, jitter=0.4)
PAD_CROP = AugmentSpec(kind="pad_crop", size=32, pad=4)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """JPEG photographs of two shapes (so the training set is not resident-able)."""
    imgs = smooth_images(4, 150, 200, seed=0) + smooth_images(4, 200, 150, seed=1)
    return make_converted(tmp_path_factory.mktemp("photos"), {"train": (imgs, np.arange(8) % 2)},
                          num_classes=2, ext="jpg")


@pytest.fixture(scope="module")
def small_mixed(tmp_path_factory):
    """CIFAR-size PNGs of two sizes: small, but not one common size."""
    imgs = random_images(4, 32) + random_images(4, 16)
    return make_converted(tmp_path_factory.mktemp("small"), {"train": (imgs, np.arange(8) % 2)},
                          num_classes=2)


def test_cpu_photographs_without_beton_use_the_reference(photos, monkeypatch):
    monkeypatch.setattr(loaders, "_dali_importable", lambda: True)  # even with DALI installed
    split = ShardedSplit(photos, "train")
    assert common_size(split) is None
    assert choose_loader(split, RRC, "cpu") == "reference"


def test_cpu_beton_means_ffcv(photos):
    (photos / "train.beton").touch()  # only its presence is looked at
    try:
        assert choose_loader(ShardedSplit(photos, "train"), RRC, "cpu") == "ffcv"
    finally:
        (photos / "train.beton").unlink()


@pytest.mark.parametrize("dali", [True, False])
def test_cpu_small_images_use_dali_only_when_installed(small_mixed, monkeypatch, dali):
    monkeypatch.setattr(loaders, "_dali_importable", lambda: dali)
    split = ShardedSplit(small_mixed, "train")
    assert choose_loader(split, PAD_CROP, "cpu") == ("dali" if dali else "reference")


def test_gpu_photographs_use_dali(photos, monkeypatch):
    monkeypatch.setattr(loaders, "_dali_importable", lambda: True)
    monkeypatch.setattr("pipeline.loaders.resident.resident_budget", lambda device: 0)
    assert choose_loader(ShardedSplit(photos, "train"), RRC, "cuda") == "dali"


def test_resident_first_when_it_fits(small_mixed):
    # evaluation: any sizes, transformed to the eval size, fit the budget
    assert choose_loader(ShardedSplit(small_mixed, "train"), None, "cpu") == "resident"
