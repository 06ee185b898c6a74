"""The DALI and FFCV loaders on small generated datasets (CPU): shapes and layout, labels in the
samplers' order, augmentation semantics against the reference loader's per-image definition,
resume, evaluation coverage, corrupt images."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import make_converted, random_images
from pipeline.augment import STREAM_UNIFORM, draw_params, step_generator
from pipeline.dataset import ShardedSplit
from pipeline.errors import DataError
from pipeline.format import INDEX_FILE, beton_name, shard_name
from pipeline.loaders import make_eval_loader, make_train_loader
from pipeline.loaders.base import AugmentSpec, EvalSpec
from pipeline.loaders.reference import augment_one, color_jitter_np
from pipeline.samplers import ClassAwareSampler, UniformSampler
from pipeline.shards import write_shard

pytest.importorskip("nvidia.dali")
pytest.importorskip("ffcv")

from pipeline.ffcv_writer import write_beton  # noqa: E402  (needs ffcv)
from pipeline.loaders.dali import DaliEvalLoader, DaliLoader  # noqa: E402
from pipeline.loaders.ffcv import FfcvEvalLoader, FfcvLoader, FlipJitter  # noqa: E402

N_PNG, N_JPG, CLASSES = 64, 40, 4


def pattern_images(n: int) -> list[np.ndarray]:
    """32x32 images whose pixels say where they are (R = row + 1, G = column + 1, B = image id),
    never (0, 0, *): any crop can be located in the zero-padded image."""
    y, x = np.mgrid[0:32, 0:32]
    return [np.stack([y + 1, x + 1, np.full_like(y, k)], -1).astype(np.uint8) for k in range(n)]


@pytest.fixture(scope="module")
def png_split(tmp_path_factory) -> ShardedSplit:
    root = make_converted(tmp_path_factory.mktemp("png"), {"train": (
        random_images(N_PNG, 32, seed=1), np.arange(N_PNG) % CLASSES)}, CLASSES, shard_size=16)
    split = ShardedSplit(root, "train")
    write_beton(split, root / beton_name("train"), workers=1)
    return split


@pytest.fixture(scope="module")
def pattern_split(tmp_path_factory) -> ShardedSplit:
    root = make_converted(tmp_path_factory.mktemp("pattern"), {"train": (
        pattern_images(32), np.arange(32) % CLASSES)}, CLASSES)
    split = ShardedSplit(root, "train")
    write_beton(split, root / beton_name("train"), workers=1)
    return split


def make_jpg_split(root: Path) -> ShardedSplit:
    """64x48 JPEGs of smooth gradients (which resample predictably), 4 classes."""
    rng = np.random.default_rng(2)
    y, x = np.mgrid[0:48, 0:64]
    smooth = np.stack([x * 4, y * 5, (x + y) * 2], -1).astype(np.uint8)
    images = [np.roll(smooth, int(rng.integers(64)), axis=1) for _ in range(N_JPG)]
    make_converted(root, {"train": (images, np.arange(N_JPG) % CLASSES)}, CLASSES, ext="jpg",
                   shard_size=16)
    return ShardedSplit(root, "train")


@pytest.fixture(scope="module")
def jpg_split(tmp_path_factory) -> ShardedSplit:
    return make_jpg_split(tmp_path_factory.mktemp("jpg"))


def samplers(split: ShardedSplit, batch: int, seed: int = 3):
    uniform = UniformSampler(len(split), batch, seed)
    aware = ClassAwareSampler(split.labels, 0.0, batch, seed, steps_per_epoch=uniform.steps_per_epoch)
    return uniform, aware


def train_loader(cls, split, augment, batch=8, seed=3, **kw):
    uniform, aware = samplers(split, batch, seed)
    return cls(split, uniform=uniform, class_aware=aware, augment=augment, seed=seed,
               steps_per_epoch=uniform.steps_per_epoch, workers=2, **kw), uniform, aware


def reference_crops(split, idx, spec, seed, epoch, step, stream=STREAM_UNIFORM) -> np.ndarray:
    """What the per-image definition (the reference loader's) makes of these samples: NHWC."""
    images = [split.decode(int(i)) for i in idx]
    h = torch.tensor([im.shape[0] for im in images])
    w = torch.tensor([im.shape[1] for im in images])
    params = draw_params(spec, len(idx), h, w, step_generator(seed, epoch, step, 0, stream))
    return np.stack([augment_one(im, spec, params, b) for b, im in enumerate(images)])


def nhwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(0, 2, 3, 1).numpy()


def assert_layout(x: torch.Tensor, n: int, size: int) -> None:
    assert x.shape == (n, 3, size, size) and x.dtype == torch.uint8
    assert x.is_contiguous(memory_format=torch.channels_last)


# --- both loaders, then DALI ---------------------------------------------------------------------
@pytest.mark.parametrize("cls", [DaliLoader, FfcvLoader])
def test_pad_crop_matches_reference_and_sampler_order(cls, png_split):
    spec = AugmentSpec()
    loader, uniform, aware = train_loader(cls, png_split, spec)
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        steps = 0
        for step, b in enumerate(loader):
            for x in (b.x_a, b.x_c):
                assert_layout(x, 8, 32)
            np.testing.assert_array_equal(b.y_a.numpy(), png_split.labels[uniform.batch(epoch, step)])
            np.testing.assert_array_equal(b.y_c.numpy(), png_split.labels[aware.batch(epoch, step)])
            # Same crops and flips as every other loader for the same (seed, epoch, step), bit for bit.
            expected = reference_crops(png_split, uniform.batch(epoch, step), spec, 3, epoch, step)
            np.testing.assert_array_equal(nhwc(b.x_a), expected)
            steps += 1
        assert steps == len(loader) == N_PNG // 8
    loader.close()


@pytest.mark.parametrize("cls", [DaliLoader, FfcvLoader])
def test_pad_crop_outputs_are_windows_of_the_padded_image(cls, pattern_split):
    loader, uniform, _ = train_loader(cls, pattern_split, AugmentSpec(flip=False))
    seen = set()
    for step, b in enumerate(loader):
        for out, i in zip(nhwc(b.x_a), uniform.batch(0, step)):
            padded = np.pad(pattern_split.decode(int(i)), ((4, 4), (4, 4), (0, 0)))
            hits = [(dy, dx) for dy in range(9) for dx in range(9)
                    if np.array_equal(padded[dy:dy + 32, dx:dx + 32], out)]
            assert len(hits) == 1
            seen.add(hits[0])
    assert len(seen) > 10  # offsets really vary


@pytest.mark.parametrize("cls", [DaliLoader, FfcvLoader])
def test_resume_mid_epoch_gives_the_same_batches(cls, png_split):
    spec = AugmentSpec()
    loader, _, _ = train_loader(cls, png_split, spec)
    loader.set_epoch(1)
    full = list(loader)
    loader.load_state_dict({"epoch": 1, "step": 5})
    resumed = list(loader)
    assert len(resumed) == len(full) - 5
    for a, b in zip(full[5:], resumed):
        for u, v in zip(a, b):
            assert torch.equal(u, v)


def test_dali_rrc_with_jitter_on_jpeg(jpg_split):
    spec = AugmentSpec(kind="rrc", size=24, jitter=0.4)
    loader, uniform, aware = train_loader(DaliLoader, jpg_split, spec)
    for step, b in enumerate(loader):
        assert_layout(b.x_a, 8, 24)
        assert_layout(b.x_c, 8, 24)
        np.testing.assert_array_equal(b.y_c.numpy(), jpg_split.labels[aware.batch(0, step)])
        # The same boxes, flips and jitter factors; pixels differ only by resampling and rounding.
        expected = reference_crops(jpg_split, uniform.batch(0, step), spec, 3, 0, step)
        assert np.abs(nhwc(b.x_a).astype(int) - expected).mean() < 2.0
    assert step + 1 == N_JPG // 8


@pytest.mark.parametrize("world_size", [1, 2])
def test_dali_eval_covers_every_sample_once(png_split, world_size):
    labels, images = [], []
    for rank in range(world_size):
        ev = DaliEvalLoader(png_split, spec=EvalSpec(), batch_size=24, rank=rank, world_size=world_size)
        for b in ev:
            assert b.x_c is None and b.y_c is None
            assert b.x_a.is_contiguous(memory_format=torch.channels_last)
            labels.append(b.y_a)
            images.append(b.x_a)
    np.testing.assert_array_equal(torch.cat(labels).numpy(), png_split.labels)
    stored = np.stack([png_split.decode(i) for i in range(len(png_split))])
    np.testing.assert_array_equal(nhwc(torch.cat(images)), stored)  # 32-px eval is the identity


def test_dali_eval_resize_and_centre_crop(jpg_split):
    ev = DaliEvalLoader(jpg_split, spec=EvalSpec(size=32, resize=36), batch_size=16)
    shapes = [tuple(b.x_a.shape) for b in ev]
    assert shapes == [(16, 3, 32, 32), (16, 3, 32, 32), (8, 3, 32, 32)]


def _replace_sample(root: Path, i: int, damage) -> None:
    """Rewrite the shard holding sample i with damage(bytes) in place of its image."""
    split = ShardedSplit(root, "train")
    index = np.load(root / "train" / INDEX_FILE)
    k = int(index[i]["shard"])
    rows = np.flatnonzero(index["shard"] == k)
    records = [(damage(bytes(split.encoded(j))) if j == i else bytes(split.encoded(j)),
                split.ext(j), int(split.labels[j])) for j in rows]
    index[rows] = write_shard(root / "train" / shard_name(k), k, int(rows[0]), records)
    np.save(root / "train" / INDEX_FILE, index)


def test_dali_corrupt_jpegs_are_counted_and_replaced(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(32)]
    root = make_converted(tmp_path / "d", {"train": (images, np.arange(32) % CLASSES)}, CLASSES,
                          ext="jpg", shard_size=16)
    _replace_sample(root, 5, lambda b: b[:len(b) // 3])  # truncated: DALI's decoder fails
    _replace_sample(root, 20, lambda b: b"\0" * 64 + b[64:])  # no JPEG header: caught up front
    split = ShardedSplit(root, "train")
    for spec in (AugmentSpec(kind="rrc", size=24), AugmentSpec(kind="pad_crop", size=48, pad=0)):
        loader, uniform, aware = train_loader(DaliLoader, split, spec)
        batches = list(loader)
        assert len(batches) == 4 and loader.skipped == 2
        for step, b in enumerate(batches):  # stand-ins come from the same class
            np.testing.assert_array_equal(b.y_a.numpy(), split.labels[uniform.batch(0, step)])
            np.testing.assert_array_equal(b.y_c.numpy(), split.labels[aware.batch(0, step)])
    ev = DaliEvalLoader(split, spec=EvalSpec(size=32, resize=32), batch_size=8)
    labels = torch.cat([b.y_a for b in ev]).numpy()
    assert ev.skipped == 2  # dropped, never replaced
    np.testing.assert_array_equal(labels, np.delete(split.labels, [5, 20]))


def test_factory_builds_dali_and_ffcv(png_split):
    for name, cls in (("dali", DaliLoader), ("ffcv", FfcvLoader)):
        loader = make_train_loader(png_split, loader=name, batch_size=16, augment=AugmentSpec(),
                                   seed=0, device="cpu", workers=1)
        assert isinstance(loader, cls)
        b = next(iter(loader))
        assert_layout(b.x_a, 16, 32)
        loader.close()
        # Stage 2: the class-aware stream alone.
        stage2 = make_train_loader(png_split, loader=name, batch_size=16, uniform=False,
                                   class_aware_gamma=1.0, augment=AugmentSpec(), seed=0,
                                   device="cpu", workers=1, steps_per_epoch=3)
        batches = list(stage2)
        assert len(batches) == 3 and batches[0].x_a is None and batches[0].y_a is None
        assert_layout(batches[0].x_c, 16, 32)
    ev = make_eval_loader(png_split, loader="dali", batch_size=32, spec=EvalSpec(), device="cpu")
    assert isinstance(ev, DaliEvalLoader) and len(ev) == 2


def count_builds(monkeypatch) -> list:
    """Record every DALI pipeline the loaders build."""
    import pipeline.loaders.dali_support as support
    built, real = [], support.build_pipeline
    monkeypatch.setattr(support, "build_pipeline", lambda graph, **kw: built.append(kw) or real(graph, **kw))
    return built


def assert_same_batches(got, want) -> None:
    got, want = list(got), list(want)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        for u, v in zip(a, b):
            assert (u is None and v is None) or torch.equal(u, v)


def test_dali_builds_its_pipeline_once_for_every_epoch(png_split, monkeypatch):
    built = count_builds(monkeypatch)
    spec = AugmentSpec()
    loader, _, _ = train_loader(DaliLoader, png_split, spec)
    epochs = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        epochs.append(list(loader))
    loader.set_epoch(1)
    for k, _ in enumerate(loader):  # an unfinished pass (an interrupted run, a benchmark) ...
        if k == 2:
            break
    loader.load_state_dict({"epoch": 2, "step": 3})  # ... then a resume mid-epoch
    resumed = list(loader)
    assert len(built) == 1
    # The old behaviour, a new pipeline for every pass, gives the same images and labels.
    for epoch in range(3):
        fresh, _, _ = train_loader(DaliLoader, png_split, spec)
        fresh.set_epoch(epoch)
        assert_same_batches(fresh, epochs[epoch])
    assert_same_batches(resumed, epochs[2][3:])
    assert len(built) == 4


def test_dali_eval_builds_its_pipeline_once(jpg_split, monkeypatch):
    built = count_builds(monkeypatch)
    ev = DaliEvalLoader(jpg_split, spec=EvalSpec(size=32, resize=36), batch_size=16)
    first = list(ev)
    next(iter(ev))  # an unfinished pass
    assert_same_batches(ev, first)
    assert len(built) == 1
    assert_same_batches(DaliEvalLoader(jpg_split, spec=EvalSpec(size=32, resize=36), batch_size=16), first)


def test_dali_jitter_in_torch_runs_on_cpu_and_matches_jitter_in_dali(jpg_split):
    """The GPU-decoding route (factors through the pipeline, jitter in torch) on CPU decoding."""
    spec = AugmentSpec(kind="rrc", size=24, jitter=0.4)
    in_dali, uniform, aware = train_loader(DaliLoader, jpg_split, spec)
    in_torch, _, _ = train_loader(DaliLoader, jpg_split, spec, jitter_in_torch=True)
    assert in_torch._jitter_in_torch and not in_dali._jitter_in_torch
    steps = 0
    for step, (a, b) in enumerate(zip(in_dali, in_torch)):
        assert_layout(b.x_a, 8, 24)
        assert_layout(b.x_c, 8, 24)
        np.testing.assert_array_equal(b.y_a.numpy(), a.y_a.numpy())
        np.testing.assert_array_equal(b.y_c.numpy(), jpg_split.labels[aware.batch(0, step)])
        # The same crops and factors. torch's jitter is the reference's definition (measured mean
        # difference 0.16-0.22 levels, from resampling); DALI's operators skip the clamp after
        # brightness and round before saturation (measured 0.3-1.4 from the reference).
        expected = reference_crops(jpg_split, uniform.batch(0, step), spec, 3, 0, step)
        assert np.abs(nhwc(b.x_a).astype(int) - expected).mean() < 0.5
        assert (b.x_a.int() - a.x_a.int()).abs().float().mean() < 2.0
        steps += 1
    assert steps == N_JPG // 8
    no_jitter, _, _ = train_loader(DaliLoader, jpg_split, AugmentSpec(kind="rrc", size=24),
                                   jitter_in_torch=True)
    assert not no_jitter._jitter_in_torch  # nothing to move to torch


def test_gpu_decoders_are_built_with_the_cpu_chroma_upsampling(monkeypatch):
    """The `mixed` graphs, built against a recording stand-in for `fn` (no GPU needed)."""
    from unittest import mock

    import pipeline.loaders.dali as dali
    fake = mock.MagicMock()
    fake.external_source.side_effect = lambda **kw: [mock.MagicMock() for _ in range(kw["num_outputs"])]
    monkeypatch.setattr(dali, "fn", fake)
    dali._train_graph(None, 2, AugmentSpec(kind="rrc", size=24, jitter=0.4), "mixed", True)
    dali._train_graph(None, 2, AugmentSpec(), "mixed", False)
    dali._eval_graph(None, EvalSpec(), "mixed")
    calls = fake.decoders.image_slice.call_args_list + fake.decoders.image.call_args_list
    assert len(calls) == 5
    assert all(c.kwargs["device"] == "mixed" and c.kwargs["jpeg_fancy_upsampling"] is True for c in calls)


# --- FFCV ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("world_size", [1, 2])
def test_ffcv_eval_covers_every_sample_once(png_split, world_size):
    labels, images = [], []
    for rank in range(world_size):
        for b in FfcvEvalLoader(png_split, spec=EvalSpec(), batch_size=24, rank=rank,
                                world_size=world_size):
            assert b.x_a.is_contiguous(memory_format=torch.channels_last)
            labels.append(b.y_a)
            images.append(b.x_a)
    np.testing.assert_array_equal(torch.cat(labels).numpy(), png_split.labels)
    stored = np.stack([png_split.decode(i) for i in range(len(png_split))])
    np.testing.assert_array_equal(nhwc(torch.cat(images)), stored)


def test_ffcv_without_beton_says_how_to_add_it(jpg_split):
    with pytest.raises(DataError, match="--ffcv"):
        train_loader(FfcvLoader, jpg_split, AugmentSpec(kind="rrc", size=24))


@pytest.mark.parametrize("flip, jitter", [(True, 0.4), (True, 0.0), (False, 0.4)])
def test_ffcv_flip_jitter_is_torchvisions_flip_and_jitter(flip, jitter):
    """The fused operation, run as plain Python on small images, against the per-image definition."""
    images = np.random.default_rng(0).integers(0, 256, (6, 5, 7, 3), dtype=np.uint8)
    op = FlipJitter(flip, jitter).generate_code()
    np.random.seed(1)
    out = op(images.copy(), None)
    np.random.seed(1)  # the same draws, in the operation's order
    flips = np.random.rand(6) < (0.5 if flip else 0.0)
    factors = np.random.uniform(1 - jitter, 1 + jitter, (6, 3))
    assert flips.any() == flip
    for img, got, f, mirrored in zip(images, out, factors, flips):
        want = img[:, ::-1] if mirrored else img
        if jitter:
            want = np.round(color_jitter_np(want.astype(np.float32), f)).astype(np.uint8)
        assert np.abs(got.astype(int) - want).max() <= 1


def test_ffcv_rrc_with_jitter_on_jpeg(tmp_path):
    split = make_jpg_split(tmp_path / "jpg")
    write_beton(split, split.root / beton_name("train"), workers=1)
    loader, _, aware = train_loader(FfcvLoader, split, AugmentSpec(kind="rrc", size=24, jitter=0.4))
    for step, b in enumerate(loader):
        assert_layout(b.x_a, 8, 24)
        assert_layout(b.x_c, 8, 24)
        np.testing.assert_array_equal(b.y_c.numpy(), split.labels[aware.batch(0, step)])
    assert step + 1 == N_JPG // 8
    ev = FfcvEvalLoader(split, spec=EvalSpec(size=32, resize=36), batch_size=16)
    assert [tuple(b.x_a.shape) for b in ev] == [(16, 3, 32, 32), (16, 3, 32, 32), (8, 3, 32, 32)]
