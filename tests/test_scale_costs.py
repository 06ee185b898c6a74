"""Per-step work of the loaders' host side does not grow with the dataset: what the main process
hands to a worker per step, and what the FFCV order holds per epoch, are sized by the batch and
the steps, never by the number of samples (compared at two dataset sizes, 20x apart, with
iNaturalist's 8,142 classes)."""
from __future__ import annotations

import pickle

import numpy as np
import pytest

from pipeline.loaders.reference import _StepKeys
from pipeline.samplers import ClassAwareSampler, UniformSampler

BATCH, STEPS = 256, 8


def _labels(n: int) -> np.ndarray:
    w = 1.0 / np.arange(1, 8143)
    counts = np.maximum(1, np.floor(n * w / w.sum())).astype(int)
    return np.repeat(np.arange(8142), counts)


def _samplers(n: int):
    labels = _labels(n)
    return (UniformSampler(len(labels), BATCH, seed=0),
            ClassAwareSampler(labels, 0.0, BATCH, seed=0, steps_per_epoch=STEPS))


def test_reference_step_keys_are_sized_by_the_batch():
    sizes = {}
    for n in (20_000, 400_000):
        keys = _StepKeys(*_samplers(n), STEPS)
        sizes[n] = [len(pickle.dumps(k)) for k in keys]  # what goes to a worker each step
    assert sizes[20_000] == sizes[400_000]
    assert max(sizes[400_000]) < 2 * BATCH * 8 + 1024  # two int64 index arrays and a header


@pytest.mark.slow  # importing ffcv (numba) takes ~15 s here
def test_ffcv_order_is_sized_by_the_steps():
    ffcv = pytest.importorskip("pipeline.loaders.ffcv")
    for n in (20_000, 400_000):
        order = ffcv._StepOrder(list(_samplers(n)), STEPS)
        assert len(order.sample_order(0)) == 2 * BATCH * STEPS
