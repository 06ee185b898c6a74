"""A validation split carved from the training split, and a split restricted to some of its samples.

The carve is deterministic and per class, so that the tuned values of stage 2 (docs/METHOD.md,
"Validation split") are chosen on images neither stage trains on, never on the test set:

    for class k with n_k training images: m_k = floor(fraction * n_k), at least 1 when n_k >= 2
    and never n_k (a class keeps at least one training image); the held-out images are the first
    m_k of the class's images in the order of `np.random.default_rng([CARVE_SEED, k]).permutation`.

The carve depends on the labels and the fraction only (not on the run's seed): every seed of an
experiment is tuned on the same images.
"""
from __future__ import annotations

import copy

import numpy as np

from pipeline.dataset import ShardedSplit

CARVE_SEED = 20_211_020  # fixed: the carve is part of the dataset, not of a run


def carve_validation(labels: np.ndarray, fraction: float, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices), both sorted int64 arrays partitioning range(len(labels)).

    Raises ValueError when `fraction` is not in (0, 1).
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
    labels = np.asarray(labels, dtype=np.int64)
    held = []
    for k in range(num_classes):
        idx = np.flatnonzero(labels == k)
        n = len(idx)
        m = min(max(int(np.floor(fraction * n)), 1 if n >= 2 else 0), n - 1) if n else 0
        held.append(idx[np.random.default_rng([CARVE_SEED, k]).permutation(n)[:m]])
    val = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
    train = np.setdiff1d(np.arange(len(labels), dtype=np.int64), val, assume_unique=True)
    return train, val


def subset(split: ShardedSplit, indices: np.ndarray, name: str) -> ShardedSplit:
    """The same shards seen through `indices` only: sample i of the result is sample indices[i] of
    `split`. Loaders read samples through the index rows, so every loader takes it, except FFCV,
    whose `.beton` numbers the whole split (`name` differs from the split's, so the automatic
    choice never picks FFCV for it, and an explicit `--loader ffcv` reports the missing file)."""
    view = copy.copy(split)
    view.index = np.asarray(split.index[np.asarray(indices, dtype=np.int64)])
    view.labels = np.asarray(split.labels[indices], dtype=np.int64)
    view.split = name
    view._maps = {}
    return view
