"""The one rule by which every training loader replaces a corrupt image.

A training sample whose image does not decode is replaced by a stand-in, so a long run never
stops on one bad file: the next samples of the same class (after it, then from the start of the
class), then the next samples in sample order, at most `MAX_STAND_INS` of them. When none of
those is usable the dataset is badly damaged: `DataError` says so and how to find out what is
wrong. Evaluation never replaces (a swapped test image would falsify the accuracy): it drops and
counts. Used by the reference and resident loaders (which decode each candidate to test it) and
by the DALI loader (which tests a candidate against the corrupt samples found so far).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from pipeline.dataset import ShardedSplit
from pipeline.errors import DataError

MAX_STAND_INS = 32  # candidates tried in place of one corrupt sample before giving up


def candidates(labels: np.ndarray, i: int) -> np.ndarray:
    """The stand-ins of sample i, in the order they are tried: int64 (<= MAX_STAND_INS,)."""
    same = np.flatnonzero(labels == labels[i])
    n = len(labels)
    following = (i + np.arange(1, min(n, MAX_STAND_INS + 1))) % n
    order = np.concatenate([same[same > i], same[same < i], following])
    return order[:MAX_STAND_INS]


def stand_in(split: ShardedSplit, i: int, usable: Callable[[int], bool]) -> tuple[int, int]:
    """(the first candidate of sample i that `usable` accepts, how many were rejected before it).

    Raises DataError when none of the MAX_STAND_INS candidates is usable."""
    for rejected, j in enumerate(candidates(split.labels, i)):
        if usable(int(j)):
            return int(j), rejected
    raise DataError(f"{split.dir}: sample {i} does not decode, nor do the {MAX_STAND_INS} samples "
                    f"tried in its place. Run `iccl verify {split.root}` to list the damaged images "
                    f"and re-convert the dataset.")
