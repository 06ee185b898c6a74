"""The one corrupt-sample rule (pipeline/loaders/corrupt.py): the order of the stand-ins, the limit,
and the same error from every loader that replaces (reference / resident decode, DALI)."""
from __future__ import annotations

import numpy as np
import pytest

from helpers import make_converted, random_images
from pipeline.dataset import ShardedSplit
from pipeline.errors import DataError
from pipeline.loaders.corrupt import MAX_STAND_INS, candidates, stand_in
from pipeline.loaders.reference import decode_or_replace, pil_decode


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> ShardedSplit:
    """40 images: samples 0..35 of class 0, 36..39 of class 1."""
    labels = np.array([0] * 36 + [1] * 4)
    root = make_converted(tmp_path_factory.mktemp("c"), {"train": (random_images(40, 8, seed=0), labels)}, 2)
    return ShardedSplit(root, "train")


def test_candidates_same_class_after_then_before_then_sample_order():
    labels = np.array([0, 1, 0, 1, 0])
    # class 0 after 2: [4]; before 2: [0]; then the next samples in order, wrapping: 3 4 0 1
    np.testing.assert_array_equal(candidates(labels, 2), [4, 0, 3, 4, 0, 1])
    assert len(candidates(np.zeros(100, int), 7)) == MAX_STAND_INS == 32
    np.testing.assert_array_equal(candidates(np.zeros(100, int), 90)[:12], list(range(91, 100)) + [0, 1, 2])


def test_stand_in_returns_the_first_usable_and_counts_the_rejected(split):
    assert stand_in(split, 36, lambda j: j != 37) == (38, 1)  # class 1: 37 rejected, then 38


def test_exhausted_candidates_are_one_clear_error_for_every_loader(split):
    with pytest.raises(DataError, match=r"nor do the 32 samples tried in its place.*iccl verify"):
        stand_in(split, 0, lambda j: False)

    def broken(data, ext):
        raise ValueError("corrupt")
    with pytest.raises(DataError, match=r"sample 3 does not decode, nor do the 32 samples"):
        decode_or_replace(split, 3, broken)  # reference and resident loaders

    dali = pytest.importorskip("pipeline.loaders.dali_support")
    found = []
    samples = dali.Samples(split, found.append)
    samples.retire(range(1, 33))  # sample 1 and its first 31 candidates (2..32)
    idx, _ = samples.usable(np.array([0, 1]))
    np.testing.assert_array_equal(idx, [0, 33])  # the 32nd candidate stands in
    samples.retire([33])
    with pytest.raises(DataError, match=r"sample 1 does not decode, nor do the 32 samples"):
        samples.usable(np.array([1]))
    assert found == [32, 1]  # distinct corrupt samples, as retired


def test_reference_replacement_uses_the_rule(split):
    bad = {bytes(split.encoded(i)) for i in (37, 38)}

    def decode(data, ext):
        if bytes(data) in bad:
            raise ValueError("corrupt")
        return pil_decode(data)
    img, label, met = decode_or_replace(split, 37, decode)  # class 1 is 36..39: 38 fails, 39 works
    np.testing.assert_array_equal(img, split.decode(39))
    assert (label, met) == (1, 2)
