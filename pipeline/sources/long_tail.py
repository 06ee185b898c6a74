"""The long-tailed subset of a balanced training set, as LDAM-DRW (Cao et al., 2019) and BBN (Zhou
et al., 2020) build CIFAR-LT, and a balanced validation split drawn from the images it leaves out.
Pure functions of the labels and a seed (numpy), shared by the CIFAR source and the synthetic data."""
from __future__ import annotations

import numpy as np

from pipeline.errors import DataError


def long_tail_counts(n_max: float, num_classes: int, imbalance: float) -> list[int]:
    """The exponential profile of CIFAR-LT: class i keeps int(n_max * (1/R) ** (i / (K - 1)))."""
    return [int(n_max * (1.0 / imbalance) ** (i / (num_classes - 1.0))) for i in range(num_classes)]


def long_tail_indices(labels: np.ndarray, num_classes: int, imbalance: float, seed: int = 0) -> np.ndarray:
    """Indices of the long-tailed subset, class by class, exactly as LDAM-DRW / BBN select them.

    Their code calls `np.random.seed(seed)` once and then `np.random.shuffle` per class; a
    RandomState of the same seed draws the same numbers without touching numpy's global state.
    """
    labels = np.asarray(labels)
    rng = np.random.RandomState(seed)
    n_max = len(labels) / num_classes
    picks = []
    for k, n in enumerate(long_tail_counts(n_max, num_classes, imbalance)):
        idx = np.where(labels == k)[0]
        rng.shuffle(idx)
        picks.append(idx[:n])
    return np.concatenate(picks)


def validation_indices(labels: np.ndarray, keep: np.ndarray, num_classes: int, per_class: int,
                       seed: int, source) -> tuple[np.ndarray, np.ndarray]:
    """(val, keep'): per_class training images of every class for the validation split, drawn
    without replacement by numpy.random.default_rng(seed) from the images outside `keep`; a class
    with too few of those (the head class of CIFAR-LT keeps all n_max of its images) gives up the
    rest from `keep`, which is returned without them. Both int64, val sorted by class."""
    rng = np.random.default_rng(seed)
    left_out = np.ones(len(labels), dtype=bool)
    left_out[keep] = False
    kept = np.zeros(len(labels), dtype=bool)
    kept[keep] = True
    picks = []
    for k in range(num_classes):
        pool = np.flatnonzero(left_out & (labels == k))
        if len(pool) < per_class:
            own = np.flatnonzero(kept & (labels == k))
            if len(pool) + len(own) - 1 < per_class:
                raise DataError(f"{source}: --val-per-class {per_class}: class {k} has only "
                                f"{len(pool) + len(own)} training images; ask for fewer.")
            pool = np.concatenate([pool, rng.choice(own, per_class - len(pool), replace=False)])
        chosen = np.sort(rng.choice(pool, per_class, replace=False))
        kept[chosen] = False
        picks.append(chosen)
    return np.concatenate(picks), keep[kept[keep]]
