"""Samplers (docs/METHOD.md, Eq. 2): exact properties of the uniform sampler, statistics of the class-aware one.

Statistical checks use a chi-square goodness-of-fit statistic against a threshold from the normal
approximation of the chi-square distribution, df + Z * sqrt(2 df) with Z = 5 (a false alarm
probability below 1e-6 per check); seeds are fixed, so the tests are deterministic anyway.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.format import shot_groups
from pipeline.samplers import (ClassAwareSampler, UniformSampler, class_probabilities, eval_indices,
                               step_indices)

Z = 5.0
GAMMAS = (-1.0, 0.0, 0.5, 1.0)


def chi2_ok(observed, expected) -> tuple[bool, float, float]:
    observed, expected = np.asarray(observed, float), np.asarray(expected, float)
    stat = float(((observed - expected) ** 2 / expected).sum())
    df = len(expected) - 1
    limit = df + Z * np.sqrt(2 * df)
    return stat <= limit, stat, limit


def labels_for(counts) -> np.ndarray:
    return np.repeat(np.arange(len(counts)), counts)


def draw(sampler: ClassAwareSampler, total: int) -> np.ndarray:
    steps = -(-total // sampler.local_batch)
    return np.concatenate([sampler.batch(0, s) for s in range(steps)])


# --- class probabilities -------------------------------------------------------------------------
def test_class_probabilities_cases():
    counts = np.array([100, 10, 0, 1])
    np.testing.assert_allclose(class_probabilities(counts, -1), counts / counts.sum())
    np.testing.assert_allclose(class_probabilities(counts, 0), [1 / 3, 1 / 3, 0, 1 / 3])
    inv = np.array([1 / 100, 1 / 10, 0, 1])
    np.testing.assert_allclose(class_probabilities(counts, 1), inv / inv.sum())
    # Huge counts with negative gamma stay finite (log-space computation).
    p = class_probabilities([10**9, 10**9, 1], -3)
    assert np.isfinite(p).all() and abs(p.sum() - 1) < 1e-12 and p[2] < 1e-20


def test_class_probabilities_rejects_bad_counts():
    with pytest.raises(ValueError):
        class_probabilities([0, 0], 0)
    with pytest.raises(ValueError):
        class_probabilities([1, -1], 0)


# --- class-aware: statistics ---------------------------------------------------------------------
@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("counts", [[500, 100, 20, 5, 1], [3, 0, 30, 300]])
def test_class_frequencies_small_profiles(counts, gamma):
    labels = labels_for(counts)
    sampler = ClassAwareSampler(labels, gamma, 1000, seed=3, steps_per_epoch=200)
    drawn = labels[draw(sampler, 200_000)]
    p = class_probabilities(counts, gamma)
    present = p > 0
    observed = np.bincount(drawn, minlength=len(counts))
    assert observed[~present].sum() == 0, "an empty class was drawn"
    ok, stat, limit = chi2_ok(observed[present], len(drawn) * p[present])
    assert ok, f"chi2 {stat:.1f} > {limit:.1f}"


def test_gamma_minus_one_matches_data_frequencies():
    counts = np.array([400, 40, 4])
    labels = labels_for(counts)
    drawn = labels[draw(ClassAwareSampler(labels, -1.0, 1000, seed=0, steps_per_epoch=200), 200_000)]
    ok, stat, limit = chi2_ok(np.bincount(drawn, minlength=3), len(drawn) * counts / counts.sum())
    assert ok, f"chi2 {stat:.1f} > {limit:.1f}"


def test_uniform_within_each_class():
    counts = [50, 5, 200]
    labels = labels_for(counts)
    rng = np.random.default_rng(0)
    labels = labels[rng.permutation(len(labels))]  # class members scattered through the sample ids
    sampler = ClassAwareSampler(labels, 0.0, 1000, seed=1, steps_per_epoch=300)
    drawn = draw(sampler, 300_000)
    per_sample = np.bincount(drawn, minlength=len(labels))
    for k in range(len(counts)):
        members = np.flatnonzero(labels == k)
        assert set(np.unique(drawn[labels[drawn] == k])) <= set(members)
        obs = per_sample[members]
        ok, stat, limit = chi2_ok(obs, np.full(len(obs), obs.sum() / len(obs)))
        assert ok, f"class {k}: chi2 {stat:.1f} > {limit:.1f}"


@pytest.fixture(scope="module")
def real_counts(request):
    data = request.getfixturevalue("shared_data")
    path = data / "splits" / "train_class_counts_from_LiVT.json"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    d = json.loads(path.read_text())
    return {"ImageNet-LT": np.array(d["ImageNet_LT_train_cls_num"]),
            "iNat2018": np.array(d["iNaturalist18_train_cls_num"])}


@pytest.mark.parametrize("gamma", GAMMAS)
def test_imagenet_lt_class_frequencies(real_counts, gamma):
    counts = real_counts["ImageNet-LT"]
    labels = labels_for(counts)
    drawn = labels[draw(ClassAwareSampler(labels, gamma, 2000, seed=5, steps_per_epoch=100), 200_000)]
    ok, stat, limit = chi2_ok(np.bincount(drawn, minlength=len(counts)),
                              len(drawn) * class_probabilities(counts, gamma))
    assert ok, f"chi2 {stat:.1f} > {limit:.1f} over {len(counts)} classes"


@pytest.mark.parametrize("gamma", GAMMAS)
def test_inaturalist_class_frequencies(real_counts, gamma):
    """8142 classes, many with expected counts too small for a per-class chi-square: chi-square on
    the many / medium / few groups, and every class's deviation within MAX_Z binomial standard
    deviations (the maximum of 8142 standard normals is about 4; MAX_Z = 6 leaves room for the
    skewed tail of classes expecting only a few draws)."""
    max_z = 6.0
    counts = real_counts["iNat2018"]
    labels = labels_for(counts)
    n = 1_000_000
    drawn = labels[draw(ClassAwareSampler(labels, gamma, 10_000, seed=7, steps_per_epoch=100), n)]
    p = class_probabilities(counts, gamma)
    observed = np.bincount(drawn, minlength=len(counts))
    groups = [g for g in shot_groups(counts).values() if g]
    ok, stat, limit = chi2_ok([observed[g].sum() for g in groups], [n * p[g].sum() for g in groups])
    assert ok, f"groups: chi2 {stat:.1f} > {limit:.1f}"
    z = (observed - n * p) / np.sqrt(n * p * (1 - p))
    assert np.abs(z).max() < max_z, f"class {np.abs(z).argmax()} off by {np.abs(z).max():.1f} std"


# --- class-aware: determinism and ranks ----------------------------------------------------------
def test_class_aware_deterministic_and_varied():
    labels = labels_for([30, 20, 10])
    a = ClassAwareSampler(labels, 0.0, 32, seed=9, steps_per_epoch=10)
    b = ClassAwareSampler(labels, 0.0, 32, seed=9, steps_per_epoch=10)
    assert a.batch(2, 5).dtype == np.int64 and len(a.batch(2, 5)) == 32
    np.testing.assert_array_equal(a.batch(2, 5), b.batch(2, 5))
    assert not np.array_equal(a.batch(2, 5), a.batch(3, 5))
    assert not np.array_equal(a.batch(2, 5), a.batch(2, 6))
    other_seed = ClassAwareSampler(labels, 0.0, 32, seed=10, steps_per_epoch=10)
    assert not np.array_equal(a.batch(2, 5), other_seed.batch(2, 5))
    assert [x.tolist() for x in a.epoch_batches(1, 7)] == [a.batch(1, s).tolist() for s in range(7, 10)]


def test_class_aware_ranks():
    labels = labels_for([30, 20, 10])
    r0 = ClassAwareSampler(labels, 0.0, 32, seed=9, rank=0, world_size=2, steps_per_epoch=4)
    r1 = ClassAwareSampler(labels, 0.0, 32, seed=9, rank=1, world_size=2, steps_per_epoch=4)
    single = ClassAwareSampler(labels, 0.0, 32, seed=9, steps_per_epoch=4)
    assert len(r0.batch(0, 0)) == 16
    # The ranks' slices put together are exactly what one process draws for the global batch.
    for step in range(4):
        assert np.array_equal(np.concatenate([r0.batch(1, step), r1.batch(1, step)]), single.batch(1, step))
    with pytest.raises(ValueError, match="multiple"):
        ClassAwareSampler(labels, 0.0, 30, seed=0, world_size=4, steps_per_epoch=4)
    with pytest.raises(IndexError):
        r0.batch(0, 4)


# --- uniform sampler -----------------------------------------------------------------------------
def test_uniform_epoch_is_a_permutation_prefix():
    s = UniformSampler(103, 10, seed=1)
    assert s.steps_per_epoch == 10
    seen = np.concatenate(list(s.epoch_batches(0)))
    assert len(seen) == 100 and len(np.unique(seen)) == 100 and seen.dtype == np.int64
    assert not np.array_equal(seen, np.concatenate(list(s.epoch_batches(1))))


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_uniform_ranks_disjoint_and_complete(world_size):
    n, batch = 1003, 64
    single = UniformSampler(n, batch, seed=4)
    ranks = [UniformSampler(n, batch, seed=4, rank=r, world_size=world_size) for r in range(world_size)]
    for epoch in (0, 1):
        for step in range(single.steps_per_epoch):
            parts = [r.batch(epoch, step) for r in ranks]
            assert all(len(p) == batch // world_size for p in parts)
            # Together the ranks load exactly the single-process global batch of this step.
            np.testing.assert_array_equal(np.concatenate(parts), single.batch(epoch, step))
        per_rank = [np.concatenate(list(r.epoch_batches(epoch))) for r in ranks]
        union = np.concatenate(per_rank)
        assert len(np.unique(union)) == len(union) == single.steps_per_epoch * batch


def test_uniform_resume_equals_uninterrupted():
    s = UniformSampler(500, 32, seed=2, rank=1, world_size=2)
    full = list(s.epoch_batches(3))
    resumed = UniformSampler(500, 32, seed=2, rank=1, world_size=2)  # fresh process, no cache
    np.testing.assert_array_equal(np.concatenate(list(resumed.epoch_batches(3, start_step=5))),
                                  np.concatenate(full[5:]))


def test_uniform_rejects_bad_batches():
    with pytest.raises(ValueError, match="multiple"):
        UniformSampler(100, 10, seed=0, world_size=4)
    with pytest.raises(ValueError, match="fewer"):
        UniformSampler(5, 8, seed=0)
    with pytest.raises(ValueError):
        UniformSampler(100, 8, seed=0, rank=2, world_size=2)


def test_streams_are_independent():
    labels = np.arange(64) % 4
    uni = UniformSampler(64, 16, seed=0)
    aware = ClassAwareSampler(labels, -1.0, 16, seed=0, steps_per_epoch=4)
    a, c = step_indices(uni, aware, 0, 1)
    assert not np.array_equal(a, c)
    assert step_indices(None, aware, 0, 1)[0] is None and step_indices(uni, None, 0, 1)[1] is None


@pytest.mark.parametrize("n,world_size", [(10, 1), (10, 3), (7, 4), (2, 4)])
def test_eval_indices_cover_once(n, world_size):
    parts = [eval_indices(n, r, world_size) for r in range(world_size)]
    np.testing.assert_array_equal(np.concatenate(parts), np.arange(n))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


# --- past one machine: world sizes 8, 64, 512 (sampler arithmetic only, no processes) ------------
def _zipf_labels(num_classes: int, total: int, seed: int) -> np.ndarray:
    """A long-tailed label array over `num_classes` classes (every class at least one image)."""
    w = 1.0 / np.arange(1, num_classes + 1)
    counts = np.maximum(1, np.floor(total * w / w.sum())).astype(int)
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(num_classes), counts))


@pytest.mark.parametrize("world_size", [8, 64, 512])
def test_world_sizes_uniform(world_size):
    """Rank slices of every step: equal in size, pairwise disjoint, and in rank order exactly the
    one-process global batch; over an epoch no sample is read twice by any two ranks."""
    n, batch = 20_011, 2048
    single = UniformSampler(n, batch, seed=3)
    ranks = [UniformSampler(n, batch, seed=3, rank=r, world_size=world_size) for r in range(world_size)]
    for step in (0, 1, single.steps_per_epoch - 1):
        parts = [r.batch(2, step) for r in ranks]
        assert {len(p) for p in parts} == {batch // world_size}
        np.testing.assert_array_equal(np.concatenate(parts), single.batch(2, step))
    epoch = np.concatenate([b for r in ranks for b in r.epoch_batches(2)])
    assert len(epoch) == single.steps_per_epoch * batch == len(np.unique(epoch))


@pytest.mark.parametrize("world_size", [8, 64, 512])
def test_world_sizes_class_aware(world_size):
    """8,142 classes: the rank slices are equal in size, occupy disjoint slots of the global batch
    (draws are with replacement, so two slots may hold the same image whatever the world size),
    and in rank order are exactly the one-process draw."""
    labels = _zipf_labels(8142, 30_000, seed=1)
    batch = 1024
    single = ClassAwareSampler(labels, 0.0, batch, seed=5, steps_per_epoch=50)
    ranks = [ClassAwareSampler(labels, 0.0, batch, seed=5, rank=r, world_size=world_size,
                               steps_per_epoch=50) for r in range(world_size)]
    for epoch, step in ((0, 0), (3, 49)):
        parts = [r.batch(epoch, step) for r in ranks]
        assert {len(p) for p in parts} == {batch // world_size}
        np.testing.assert_array_equal(np.concatenate(parts), single.batch(epoch, step))


def test_world_size_512_needs_a_divisible_batch():
    with pytest.raises(ValueError, match="multiple"):
        UniformSampler(100_000, 1000, seed=0, rank=0, world_size=512)


# --- per-step cost does not grow with the dataset --------------------------------------------------
def _step_alloc_bytes(sampler, epoch: int, step: int) -> int:
    """Peak bytes numpy allocates while drawing one step (numpy reports to tracemalloc)."""
    import tracemalloc

    tracemalloc.start()
    try:
        sampler.batch(epoch, step)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_per_step_work_independent_of_dataset_size():
    """Memory touched by one step's draw, at 8,142 classes, for a dataset 1x and 20x as large:
    it depends on the batch (and the class count), not on the number of samples."""
    batch, sizes = 512, (20_000, 400_000)
    peaks = {}
    for n in sizes:
        labels = _zipf_labels(8142, n, seed=2)
        aware = ClassAwareSampler(labels, 0.0, batch, seed=0, steps_per_epoch=10)
        uni = UniformSampler(len(labels), batch, seed=0)
        uni.batch(0, 0)  # the epoch's permutation: once per epoch, not per step
        peaks[n] = (_step_alloc_bytes(aware, 0, 1), _step_alloc_bytes(uni, 0, 1))
    small, large = peaks[sizes[0]], peaks[sizes[1]]
    for a, b in zip(small, large):
        assert b <= 1.5 * a + 4096, peaks
    assert max(large) < 64 * batch * 8, peaks  # a few arrays of the batch, nowhere near 400k x 8 bytes
