"""Top-1 overall and by many / medium / few (Decoupling's `shot_acc`: a group's accuracy is the mean
of its classes' accuracies), against hand-computed values and a float64 numpy reference at
iNaturalist 2018's 8,142 classes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.format import shot_groups
from train.evaluate import evaluate, summarize


def test_summarize_by_hand():
    # class 0: 3/4, class 1: 1/2, class 2: no test samples, class 3: 0/1
    correct = torch.tensor([3.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    total = torch.tensor([4.0, 2.0, 0.0, 1.0], dtype=torch.float64)
    out = summarize(correct, total, {"many": [0, 1], "medium": [2], "few": [2, 3]})
    assert out["top1"] == pytest.approx(100 * 4 / 7)
    assert out["num_samples"] == 7
    assert out["many"] == pytest.approx(62.5)        # mean(75, 50)
    assert out["medium"] is None                     # its only class has no test samples
    assert out["few"] == pytest.approx(0.0)          # class 2 left out, class 3 at 0 %
    assert out["per_class"] == [75.0, 50.0, None, 0.0]


def _inat_like_counts(num_classes: int, seed: int) -> np.ndarray:
    """Training counts shaped like iNaturalist 2018's (max 1,000, min 2, long tail)."""
    rng = np.random.default_rng(seed)
    return np.clip((1000 * rng.pareto(1.2, num_classes) / 20).astype(int) + 2, 2, 1000)


def test_evaluate_8142_classes_matches_numpy():
    k, n, batch = 8142, 3 * 8142, 1024
    groups = shot_groups(_inat_like_counts(k, seed=0))
    assert all(groups.values())
    rng = np.random.default_rng(1)
    y = rng.permutation(np.repeat(np.arange(k), 3))
    # predicted class: right for about a third of the samples, else a random class
    pred = np.where(rng.random(n) < 1 / 3, y, rng.integers(0, k, n))
    batches = [(torch.arange(s, min(s + batch, n)), torch.from_numpy(y[s:s + batch]))
               for s in range(0, n, batch)]
    calls = []

    def predict(rows):
        calls.append(len(rows))
        logits = torch.rand(len(rows), k)
        logits[torch.arange(len(rows)), torch.from_numpy(pred[rows.numpy()])] = 2.0
        return logits

    out = evaluate(predict, batches, k, groups, torch.device("cpu"))
    assert calls == [len(b[0]) for b in batches]  # one forward per batch, nothing per class

    hit = (pred == y).astype(np.float64)
    acc = np.bincount(y, hit, minlength=k) / np.bincount(y, minlength=k)
    assert out["top1"] == pytest.approx(100 * hit.mean(), abs=1e-9)
    for name, ids in groups.items():
        assert out[name] == pytest.approx(100 * acc[ids].mean(), abs=1e-9)
    np.testing.assert_allclose(np.array(out["per_class"], dtype=np.float64), 100 * acc, atol=1e-4)
