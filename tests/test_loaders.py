"""Loaders (resident, reference), the shared augment ops, and the loader factory, on tiny datasets.

Expected batches are rebuilt independently: decode the sampled images, draw the step's parameters
from `step_generator`, apply a direct per-sample numpy version of the augmentation.
"""
from __future__ import annotations

import os
import shutil
import time

import numpy as np
import pytest
import torch

from helpers import hwc, make_converted, np_pad_crop, random_images, smooth_images
from pipeline.augment import STREAM_CLASS_AWARE, STREAM_UNIFORM, draw_params, step_generator
from pipeline.dataset import ShardedSplit
from pipeline.errors import DataError
from pipeline.loaders import (AugmentSpec, EvalSpec, choose_loader, make_eval_loader, make_train_loader)
from pipeline.loaders.reference import ReferenceEvalLoader, ReferenceLoader, _TrainSteps
from pipeline.loaders.resident import ResidentEvalLoader, ResidentLoader
from pipeline.samplers import ClassAwareSampler, UniformSampler

SEED = 11
PAD_CROP = AugmentSpec(kind="pad_crop", size=32, pad=4)
RRC = AugmentSpec(kind="rrc", size=24, scale=(0.2, 1.0), jitter=0.3)
TRAIN_LOADERS = {"resident": ResidentLoader, "reference": ReferenceLoader}
EVAL_LOADERS = {"resident": ResidentEvalLoader, "reference": ReferenceEvalLoader}
COUNTS = [40, 24, 12, 6, 2]  # 84 train samples, long-tailed


def _labels(counts, seed=0):
    labels = np.repeat(np.arange(len(counts)), counts)
    return labels[np.random.default_rng(seed).permutation(len(labels))]


@pytest.fixture(scope="module")
def png32(tmp_path_factory):
    labels = _labels(COUNTS)
    root = make_converted(tmp_path_factory.mktemp("png32"), {
        "train": (random_images(len(labels), 32, seed=1), labels),
        "test": (random_images(30, 32, seed=2), np.arange(30) % len(COUNTS)),
    }, num_classes=len(COUNTS), shard_size=20)
    return root


@pytest.fixture(scope="module")
def jpg(tmp_path_factory):
    labels = _labels([30, 14, 4], seed=1)
    root = make_converted(tmp_path_factory.mktemp("jpg"), {
        "train": (smooth_images(len(labels), 48, 64, seed=3), labels),
        "test": (smooth_images(11, 48, 64, seed=4), np.arange(11) % 3),
    }, num_classes=3, ext="jpg", shard_size=16, quality=90)
    return root


def _samplers(split, batch=16, gamma=0.0, rank=0, world_size=1, uniform=True, steps=None):
    uni = UniformSampler(len(split), batch, SEED, rank, world_size) if uniform else None
    steps = steps or len(split) // batch
    aware = None if gamma is None else ClassAwareSampler(split.labels, gamma, batch, SEED, rank,
                                                         world_size, steps_per_epoch=steps)
    return uni, aware, steps


def _loader(name, split, augment=PAD_CROP, workers=0, rank=0, world_size=1, batch=16, **kw):
    uni, aware, steps = _samplers(split, batch, rank=rank, world_size=world_size)
    return TRAIN_LOADERS[name](split, uniform=uni, class_aware=aware, augment=augment, seed=SEED,
                               steps_per_epoch=steps, rank=rank, world_size=world_size,
                               device="cpu", workers=workers, **kw), uni, aware


def _expected_pad_crop(split, idx, epoch, step, stream, rank=0):
    imgs = [split.decode(int(i)) for i in idx]
    p = draw_params(PAD_CROP, len(idx), 32, 32, step_generator(SEED, epoch, step, rank, stream))
    return np.stack([np_pad_crop(im, PAD_CROP.pad, *map(int, p.offsets[b]), PAD_CROP.size, bool(p.flip[b]))
                     for b, im in enumerate(imgs)])


# --- training loaders ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", TRAIN_LOADERS)
def test_train_batches_contract_and_pad_crop_semantics(png32, name):
    split = ShardedSplit(png32, "train")
    loader, uni, aware = _loader(name, split)
    loader.set_epoch(2)
    batches = list(loader)
    assert len(batches) == len(loader) == len(split) // 16
    for step in (0, 3):
        b = batches[step]
        streams = ((b.x_a, b.y_a, uni, STREAM_UNIFORM), (b.x_c, b.y_c, aware, STREAM_CLASS_AWARE))
        for x, y, sampler, stream in streams:
            assert x.shape == (16, 3, 32, 32) and x.dtype == torch.uint8 and x.device.type == "cpu"
            assert x.is_contiguous(memory_format=torch.channels_last)
            idx = sampler.batch(2, step)
            assert y.dtype == torch.int64 and torch.equal(y, torch.from_numpy(split.labels[idx]))
            np.testing.assert_array_equal(hwc(x), _expected_pad_crop(split, idx, 2, step, stream))
    loader.close()
    loader.close()


@pytest.mark.parametrize("name", TRAIN_LOADERS)
def test_rrc_batches(jpg, name):
    split = ShardedSplit(jpg, "train")
    loader, uni, _ = _loader(name, split, augment=RRC, batch=8)
    b = next(iter(loader))
    assert b.x_a.shape == b.x_c.shape == (8, 3, 24, 24) and b.x_a.dtype == torch.uint8
    assert b.x_a.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(b.y_a, torch.from_numpy(split.labels[uni.batch(0, 0)]))
    loader.close()


def test_rrc_resident_and_reference_agree_on_smooth_images(jpg):
    """Same boxes, flips and jitter factors; pixels differ only by the resampling filters and
    the JPEG decoders (simplejpeg vs Pillow): under a level on average on smooth images."""
    split = ShardedSplit(jpg, "train")
    spec = AugmentSpec(kind="rrc", size=24, scale=(0.5, 1.0), jitter=0.2)
    a = next(iter(_loader("resident", split, augment=spec, batch=8)[0]))
    b = next(iter(_loader("reference", split, augment=spec, batch=8)[0]))
    diff = (a.x_a.float() - b.x_a.float()).abs()
    assert diff.mean() < 1.5 and diff.max() <= 16, (diff.mean(), diff.max())


@pytest.mark.parametrize("name", TRAIN_LOADERS)
def test_determinism_and_resume(png32, name):
    split = ShardedSplit(png32, "train")
    workers = 2 if name == "reference" else 0  # worker processes must not change the result
    first, _, _ = _loader(name, split, workers=workers)
    first.set_epoch(1)
    full = list(first)
    again, _, _ = _loader(name, split, workers=workers)
    again.load_state_dict({"epoch": 1, "step": 3})
    resumed = list(again)
    assert len(resumed) == len(full) - 3
    for r, f in zip(resumed, full[3:]):
        assert all(torch.equal(u, v) for u, v in zip(r, f))
    assert list(again)[0].x_a.shape == full[0].x_a.shape  # the next pass starts at step 0 again
    again.set_epoch(2)
    assert not torch.equal(next(iter(again)).x_a, full[0].x_a)
    first.close()
    again.close()


def test_resident_and_reference_identical_on_png(png32):
    split = ShardedSplit(png32, "train")
    for r, f in zip(_loader("resident", split)[0], _loader("reference", split)[0]):
        assert all(torch.equal(u, v) for u, v in zip(r, f))


def test_ranks_split_the_global_batch(png32):
    split = ShardedSplit(png32, "train")
    single = next(iter(_loader("resident", split)[0]))
    halves = [next(iter(_loader("resident", split, rank=r, world_size=2)[0])) for r in range(2)]
    assert torch.equal(torch.cat([h.y_a for h in halves]), single.y_a)
    assert halves[0].x_a.shape[0] == 8


# --- evaluation loaders --------------------------------------------------------------------------
@pytest.mark.parametrize("name", EVAL_LOADERS)
def test_eval_covers_every_sample_once_across_ranks(png32, jpg, name):
    for root, spec in ((png32, EvalSpec(32, 32)), (jpg, EvalSpec(40, 44))):
        split = ShardedSplit(root, "test")
        xs, ys = [], []
        for rank in range(2):
            loader = EVAL_LOADERS[name](split, spec=spec, batch_size=4, rank=rank, world_size=2,
                                        device="cpu", workers=1)
            batches = list(loader)
            assert len(batches) == len(loader)
            for b in batches:
                assert b.x_a.is_contiguous(memory_format=torch.channels_last) and b.x_c is None
                assert b.x_a.shape[1:] == (3, spec.size, spec.size)
            xs += [hwc(b.x_a) for b in batches]
            ys += [b.y_a for b in batches]
        np.testing.assert_array_equal(torch.cat(ys).numpy(), split.labels)
        images = np.concatenate(xs)
        if root == png32:  # stored 32-px images pass through unchanged
            np.testing.assert_array_equal(images, np.stack([split.decode(i) for i in range(len(split))]))


# --- the factory ---------------------------------------------------------------------------------
def test_factory_streams_and_choice(png32, tmp_path):
    split = ShardedSplit(png32, "train")
    assert choose_loader(split, PAD_CROP, "cpu") == "resident"
    stage2 = make_train_loader(split, batch_size=16, uniform=False, class_aware_gamma=1.0,
                               augment=PAD_CROP, seed=0, device="cpu")
    b = next(iter(stage2))
    assert b.x_a is None and b.y_a is None and b.x_c.shape == (16, 3, 32, 32)
    ce = make_train_loader(split, loader="reference", batch_size=16, class_aware_gamma=None,
                           augment=PAD_CROP, seed=0, device="cpu", workers=0, steps_per_epoch=2)
    batches = list(ce)
    assert len(batches) == 2 and batches[0].x_c is None and batches[0].x_a is not None
    ev = make_eval_loader(ShardedSplit(png32, "test"), batch_size=8, spec=EvalSpec(), device="cpu")
    assert ev.name == "resident"

    two_sizes = random_images(3, 32) + random_images(3, 16)
    mixed = make_converted(tmp_path / "mixed", {"train": (two_sizes, np.arange(6) % 2)}, num_classes=2)
    assert choose_loader(ShardedSplit(mixed, "train"), PAD_CROP, "cpu") in ("dali", "reference")
    with pytest.raises(DataError, match="one size"):
        make_train_loader(ShardedSplit(mixed, "train"), loader="resident", batch_size=2, augment=PAD_CROP,
                          seed=0, device="cpu")


def test_factory_errors(png32):
    split = ShardedSplit(png32, "train")
    common = dict(batch_size=16, augment=PAD_CROP, seed=0, device="cpu")
    with pytest.raises(DataError, match="unknown"):
        make_train_loader(split, loader="nope", **common)
    with pytest.raises(DataError, match="beton"):
        make_train_loader(split, loader="ffcv", **common)
    with pytest.raises(DataError, match="stream"):
        make_train_loader(split, uniform=False, class_aware_gamma=None, **common)
    with pytest.raises(DataError, match="exceeds"):
        make_train_loader(split, steps_per_epoch=99, **common)
    with pytest.raises(DataError, match="multiple"):
        make_train_loader(split, batch_size=15, augment=PAD_CROP, seed=0, device="cpu", world_size=2)
    with pytest.raises(DataError, match="GiB"):
        ResidentLoader(split, uniform=None, class_aware=_samplers(split)[1], augment=PAD_CROP, seed=0,
                       steps_per_epoch=5, budget_bytes=1000)


# --- failures ------------------------------------------------------------------------------------
def _copy_dataset(src, dst):
    shutil.copytree(src, dst)
    return dst


def _corrupt(root, i: int):
    """Overwrite sample i's image bytes inside its shard (sizes and the index stay valid)."""
    split = ShardedSplit(root, "train")
    row = split.index[i]
    with open(split.shard_path(int(row["shard"])), "r+b") as f:
        f.seek(int(row["offset"]))
        f.write(b"\x00" * int(row["size"]))


@pytest.mark.parametrize("name", TRAIN_LOADERS)
def test_corrupt_image_is_replaced_and_counted(png32, tmp_path, name):
    root = _copy_dataset(png32, tmp_path / "data")
    bad = int(_samplers(ShardedSplit(root, "train"))[0].batch(0, 1)[3])  # a sample step 1 reads
    _corrupt(root, bad)
    split = ShardedSplit(root, "train")
    loader, uni, aware = _loader(name, split, workers=2 if name == "reference" else 0)
    batches = list(loader)  # the run goes on
    assert len(batches) == len(loader) and loader.skipped >= 1
    for step, b in enumerate(batches):  # a replacement comes from the same class: labels still match
        assert torch.equal(b.y_a, torch.from_numpy(split.labels[uni.batch(0, step)]))
        assert torch.equal(b.y_c, torch.from_numpy(split.labels[aware.batch(0, step)]))
    replaced = hwc(batches[1].x_a)[3]
    assert replaced.any()  # real pixels of another image, not a blank
    loader.close()
    ev = EVAL_LOADERS[name](split, spec=EvalSpec(), batch_size=16, device="cpu", workers=0)
    assert sum(len(b.y_a) for b in ev) == len(split) - 1 and ev.skipped == 1


@pytest.mark.parametrize("name", TRAIN_LOADERS)
@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_damaged_shard_raises_data_error(png32, tmp_path, name, damage):
    root = _copy_dataset(png32, tmp_path / "data")
    shard = ShardedSplit(root, "train").shard_path(1)
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:3000])
    else:
        shard.unlink()
    with pytest.raises(DataError, match="shard-000001.tar"):
        loader, _, _ = _loader(name, ShardedSplit(root, "train"), workers=2 if name == "reference" else 0)
        list(loader)


def test_dead_worker_raises_without_hanging(png32, monkeypatch):
    def die(self, key):
        os._exit(3)
    monkeypatch.setattr(_TrainSteps, "__getitem__", die)  # forked workers inherit the patch
    loader, _, _ = _loader("reference", ShardedSplit(png32, "train"), workers=1, timeout_s=20)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="worker"):
        list(loader)
    assert time.monotonic() - t0 < 20
    loader.close()
