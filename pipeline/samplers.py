"""Index samplers (docs/METHOD.md, Eq. 2): the class-agnostic epoch permutation and the class-aware sampler.

Both emit, for every (epoch, step), the indices this rank loads at that step, as a pure function of
(seed, epoch, step, rank): a run resumed mid-epoch, or a loader that asks for step s directly
(random access), sees exactly the batches of an uninterrupted run. `batch_size` is always the
GLOBAL batch of one optimiser step; each of `world_size` ranks receives `batch_size // world_size`.

numpy only: samplers run on the host, in the main process, and hand index arrays to the loaders.
"""
from __future__ import annotations

from typing import Iterator, Optional

import numpy as np

# Second element of the class-aware seed sequence: keeps its random stream apart from the uniform
# sampler's permutation stream, which is seeded by [seed, epoch].
_CLASS_AWARE_STREAM = 1


def class_probabilities(class_counts, gamma: float) -> np.ndarray:
    """p_k ∝ n_k^(−γ) over the classes with n_k > 0; classes without images get p_k = 0.

    γ = −1 reproduces the data's own class frequencies (uniform over images), γ = 0 is
    class-balanced, γ = 1 the reverse sampler.
    """
    counts = np.asarray(class_counts, dtype=np.float64)
    if counts.ndim != 1 or (counts < 0).any():
        raise ValueError("class_counts must be a 1-d array of non-negative counts")
    present = counts > 0
    if not present.any():
        raise ValueError("class_counts: every class is empty")
    weights = np.zeros_like(counts)
    # Work in log space: n^(-γ) for large n and γ < 0 stays well-conditioned after the shift.
    log_w = -gamma * np.log(counts[present])
    weights[present] = np.exp(log_w - log_w.max())
    return weights / weights.sum()


def _per_rank(batch_size: int, world_size: int, rank: int) -> int:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if batch_size < 1 or batch_size % world_size:
        raise ValueError(f"the global batch size {batch_size} must be a positive multiple of the "
                         f"number of processes ({world_size}); change --batch-size or the process count")
    return batch_size // world_size


class UniformSampler:
    """Class-agnostic sampler: one permutation per epoch, split into global batches, each global
    batch split into contiguous, disjoint per-rank slices.

    The permutation comes from `np.random.default_rng([seed, epoch])`, identical on all ranks, so
    the ranks together read every sample at most once per epoch and, for any world size, exactly
    the samples of the single-process run with the same seed and global batch. The last
    incomplete global batch is dropped.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1):
        self.local_batch = _per_rank(batch_size, world_size, rank)
        if num_samples < batch_size:
            raise ValueError(f"{num_samples} samples are fewer than one global batch of {batch_size}; "
                             f"lower the batch size")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.steps_per_epoch = num_samples // batch_size
        self._perm_epoch: Optional[int] = None
        self._perm: Optional[np.ndarray] = None

    def permutation(self, epoch: int) -> np.ndarray:
        """The epoch's sample order (cached: every step of an epoch slices the same array)."""
        if self._perm_epoch != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm = rng.permutation(self.num_samples).astype(np.int64)
            self._perm_epoch = epoch
        return self._perm

    def batch(self, epoch: int, step: int) -> np.ndarray:
        """Indices (int64, `batch_size // world_size`) this rank loads at (epoch, step)."""
        if not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"step {step} outside [0, {self.steps_per_epoch})")
        start = step * self.batch_size + self.rank * self.local_batch
        return self.permutation(epoch)[start:start + self.local_batch].copy()

    def epoch_batches(self, epoch: int, start_step: int = 0) -> Iterator[np.ndarray]:
        for step in range(start_step, self.steps_per_epoch):
            yield self.batch(epoch, step)


class ClassAwareSampler:
    """Class-aware sampler: class k with probability p_k ∝ n_k^(−γ), then an image of class k
    uniformly, both with replacement.

    Every (seed, epoch, step) has its own generator, `default_rng([seed, 1, epoch, step])`, so any
    step can be drawn directly. The whole global batch is drawn and each rank takes its slice, so
    N processes load exactly the images one process would (with replacement there is no overlap to
    avoid: two slots of a batch may draw the same image). `steps_per_epoch` is a choice of the caller
    (usually the uniform sampler's, so that both streams advance together).
    """

    def __init__(self, labels, gamma: float, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, *, steps_per_epoch: int, num_classes: Optional[int] = None):
        self.local_batch = _per_rank(batch_size, world_size, rank)
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
        labels = np.asarray(labels, dtype=np.int64)
        if labels.ndim != 1 or len(labels) == 0 or labels.min() < 0:
            raise ValueError("labels must be a non-empty 1-d array of class ids >= 0")
        self.batch_size, self.gamma, self.seed = batch_size, gamma, seed
        self.rank, self.world_size, self.steps_per_epoch = rank, world_size, steps_per_epoch
        self.class_counts = np.bincount(labels, minlength=num_classes or 0)
        self.probabilities = class_probabilities(self.class_counts, gamma)
        # Draw only among present classes: an empty class can then never be picked, even at the
        # edges of the CDF where rounding could otherwise land on a zero-width bin.
        self._classes = np.flatnonzero(self.class_counts)
        cdf = np.cumsum(self.probabilities[self._classes])
        self._cdf = cdf / cdf[-1]
        # Sample ids grouped by class: image j of class k is _by_class[_offset[k] + j].
        self._by_class = np.argsort(labels, kind="stable").astype(np.int64)
        self._offset = np.concatenate([[0], np.cumsum(self.class_counts)[:-1]]).astype(np.int64)

    def batch(self, epoch: int, step: int) -> np.ndarray:
        """Indices (int64, `batch_size // world_size`) this rank loads at (epoch, step)."""
        if not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"step {step} outside [0, {self.steps_per_epoch})")
        rng = np.random.default_rng([self.seed, _CLASS_AWARE_STREAM, epoch, step])
        lo = self.rank * self.local_batch
        u = rng.random((2, self.batch_size))[:, lo:lo + self.local_batch]
        # Inverse CDF: the first class whose cumulative probability exceeds u.
        pick = np.minimum(np.searchsorted(self._cdf, u[0], side="right"), len(self._classes) - 1)
        k = self._classes[pick]
        n_k = self.class_counts[k]
        j = np.minimum((u[1] * n_k).astype(np.int64), n_k - 1)
        return self._by_class[self._offset[k] + j]

    def epoch_batches(self, epoch: int, start_step: int = 0) -> Iterator[np.ndarray]:
        for step in range(start_step, self.steps_per_epoch):
            yield self.batch(epoch, step)


def step_indices(uniform: Optional[UniformSampler], class_aware: Optional[ClassAwareSampler],
                 epoch: int, step: int) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    """(uniform-stream indices, class-aware-stream indices) of one step; None for an absent stream."""
    return (None if uniform is None else uniform.batch(epoch, step),
            None if class_aware is None else class_aware.batch(epoch, step))


def eval_indices(num_samples: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
    """This rank's evaluation samples: contiguous, disjoint blocks that together cover every sample
    exactly once (no padding with repeats, unlike DistributedSampler, so accuracies count each
    test image once; blocks differ in length by at most one)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    bounds = np.linspace(0, num_samples, world_size + 1).round().astype(np.int64)
    return np.arange(bounds[rank], bounds[rank + 1], dtype=np.int64)
