"""The stage-2 family's math (model.rebalance) against hand-computed cases, in float64."""
import math

import numpy as np
import pytest
import torch

from model.rebalance import (LearnableWeightScaling, class_means, fold_scales, label_aware_epsilons,
                             label_aware_smoothing, logit_adjusted_bias, ncm_classifier, tau_normalized)
from pipeline.holdout import carve_validation


def test_tau_norm_exact():
    w = torch.tensor([[3.0, 4.0], [0.0, 2.0], [1.0, 0.0]], dtype=torch.float64)  # norms 5, 2, 1
    w1, b1 = tau_normalized(w, 1.0)
    assert torch.equal(w1, torch.tensor([[0.6, 0.8], [0.0, 1.0], [1.0, 0.0]], dtype=torch.float64))
    assert torch.equal(b1, torch.zeros(3, dtype=torch.float64))
    w_half, _ = tau_normalized(w, 0.5)
    want = [[3 / math.sqrt(5), 4 / math.sqrt(5)], [0.0, 2 / math.sqrt(2)], [1.0, 0.0]]
    assert np.abs(w_half.numpy() - np.array(want)).max() < 1e-15
    assert torch.equal(tau_normalized(w, 0.0)[0], w)
    with pytest.raises(ValueError, match="all zero"):
        tau_normalized(torch.zeros(2, 2), 1.0)


def test_logit_adjustment_exact():
    """Menon et al.: logits - tau * log(prior), here folded into the bias; prior 0.75 / 0.25."""
    b = torch.tensor([0.1, -0.2], dtype=torch.float64)
    got = logit_adjusted_bias(b, [30, 10], 1.0)
    assert abs(got[0].item() - (0.1 - math.log(0.75))) < 1e-15
    assert abs(got[1].item() - (-0.2 - math.log(0.25))) < 1e-15
    half = logit_adjusted_bias(b, [30, 10], 0.5)
    assert abs(half[1].item() - (-0.2 + 0.5 * math.log(4))) < 1e-15
    assert torch.equal(logit_adjusted_bias(b, [30, 10], 0.0), b)
    # the linear layer then outputs exactly W v + b - tau log prior
    w = torch.tensor([[1.0, 2.0], [-1.0, 0.5]], dtype=torch.float64)
    v = torch.tensor([0.3, -0.7], dtype=torch.float64)
    prior = torch.tensor([0.75, 0.25], dtype=torch.float64)
    assert torch.allclose(w @ v + got, w @ v + b - prior.log(), atol=1e-15, rtol=0)
    with pytest.raises(ValueError):
        logit_adjusted_bias(b, [30, 0], 1.0)


def test_ncm_on_separable_features_is_nearest_class_mean_by_hand():
    feats = torch.tensor([[0.0, 0.0], [2.0, 0.0],      # class 0: mean (1, 0)
                          [0.0, 4.0], [0.0, 6.0],      # class 1: mean (0, 5)
                          [5.0, 5.0]], dtype=torch.float64)  # class 2: mean (5, 5)
    labels = torch.tensor([0, 0, 1, 1, 2])
    sums, counts = class_means(feats, labels, 3)
    w, b = ncm_classifier(sums, counts)
    assert torch.equal(w, torch.tensor([[1.0, 0.0], [0.0, 5.0], [5.0, 5.0]], dtype=torch.float64))
    assert torch.equal(b, torch.tensor([-0.5, -12.5, -25.0], dtype=torch.float64))
    queries = torch.tensor([[1.2, 0.3], [0.4, 3.0], [4.0, 3.9], [2.6, 2.5]], dtype=torch.float64)
    # by hand: squared distances of (2.6, 2.5) to the means: 8.81, 13.01, 11.81 -> class 0
    assert (queries @ w.T + b).argmax(1).tolist() == [0, 1, 2, 0]
    dist = torch.cdist(queries, w)
    assert torch.equal((queries @ w.T + b).argmax(1), dist.argmin(1))
    with pytest.raises(ValueError, match="no training image"):
        ncm_classifier(sums, torch.tensor([2.0, 0.0, 1.0], dtype=torch.float64))


def test_lws_learns_scales_that_balance_a_biased_classifier():
    """Class k's features sit at e_k (noise 0.5); the classifier is diag(3, 1): the head's weight is
    three times longer, so many tail samples go to the head. Balanced CE on the scales alone must
    learn f_1 / f_0 near 3 (the symmetric classifier), and balanced accuracy rises."""
    g = torch.Generator().manual_seed(0)
    n = 2000
    y = torch.arange(2 * n) % 2
    noise = torch.randn(2 * n, 2, generator=g, dtype=torch.float64)
    v = torch.nn.functional.one_hot(y, 2).double() + 0.5 * noise
    w, b = torch.tensor([[3.0, 0.0], [0.0, 1.0]], dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    lws = LearnableWeightScaling(2).double()
    opt = torch.optim.SGD(lws.parameters(), lr=0.5)
    for _ in range(300):
        loss = torch.nn.functional.cross_entropy(lws(v @ w.T + b), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    f = lws.scales.detach()
    assert 2.5 < (f[1] / f[0]).item() < 3.5
    w2, b2 = fold_scales(w, b, f)
    assert torch.allclose(v @ w2.T + b2, lws(v @ w.T + b).detach(), atol=1e-12, rtol=0)  # folding is exact

    def tail_acc(weight):
        return ((v @ weight.T).argmax(1) == y)[y == 1].double().mean().item()
    # expected: P(v_1 > 3 v_0) = Phi(1 / sqrt(2.5)) = 0.74 before, P(v_1 > v_0) = Phi(sqrt(2)) = 0.92 after
    assert tail_acc(w) < 0.78 and tail_acc(w2) > 0.89


def test_label_aware_epsilons_follow_mislas_eq5():
    counts = [100, 50, 10]  # r = (n - 10) / 90 = 1, 4/9, 0
    r = np.array([1.0, 40 / 90, 0.0])
    concave = label_aware_epsilons(counts, 0.3, 0.1, "concave").numpy()
    assert np.abs(concave - (0.1 + 0.2 * np.sin(np.pi / 2 * r))).max() < 1e-15
    assert abs(concave[1] - (0.1 + 0.2 * 0.6427876096865394)) < 1e-15  # sin(40 degrees)
    assert concave[0] == pytest.approx(0.3, abs=1e-15) and concave[2] == pytest.approx(0.1, abs=1e-15)
    linear = label_aware_epsilons(counts, 0.3, 0.1, "linear").numpy()
    assert np.abs(linear - (0.1 + 0.2 * r)).max() < 1e-15
    convex = label_aware_epsilons(counts, 0.3, 0.1, "convex").numpy()
    assert np.abs(convex - (0.3 + 0.2 * np.sin(1.5 * np.pi + np.pi / 2 * r))).max() < 1e-15
    assert convex[0] == pytest.approx(0.3) and convex[2] == pytest.approx(0.1)
    assert concave[1] > linear[1] > convex[1]  # the shapes' names
    assert torch.equal(label_aware_epsilons([5, 5], 0.3, 0.0), torch.full((2,), 0.3, dtype=torch.float64))
    with pytest.raises(ValueError):
        label_aware_epsilons(counts, 0.3, 0.1, "wavy")


def test_label_aware_smoothing_loss_is_the_smoothed_cross_entropy():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 3, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 2])
    eps = torch.tensor([0.3, 0.2, 0.0], dtype=torch.float64)
    log_p = torch.log_softmax(logits, 1).numpy()
    q = np.zeros((4, 3))
    for i, yi in enumerate(y.tolist()):
        q[i] = eps[yi].item() / 2
        q[i, yi] = 1 - eps[yi].item()
    want = -(q * log_p).sum(1).mean()
    assert abs(label_aware_smoothing(logits, y, eps).item() - want) < 1e-15
    # epsilon 0 everywhere is plain cross-entropy
    ce = torch.nn.functional.cross_entropy(logits, y).item()
    assert abs(label_aware_smoothing(logits, y, torch.zeros(3, dtype=torch.float64)).item() - ce) < 1e-15


def test_validation_carve_is_per_class_deterministic_and_disjoint():
    labels = np.repeat(np.arange(4), [50, 20, 5, 1])
    fit, val = carve_validation(labels, 0.1, 4)
    assert np.array_equal(np.sort(np.concatenate([fit, val])), np.arange(len(labels)))
    assert np.bincount(labels[val], minlength=4).tolist() == [5, 2, 1, 0]  # floor, >= 1, never a whole class
    again_fit, again_val = carve_validation(labels, 0.1, 4)
    assert np.array_equal(val, again_val) and np.array_equal(fit, again_fit)
    assert not np.array_equal(val, carve_validation(np.roll(labels, 3), 0.1, 4)[1])
    with pytest.raises(ValueError):
        carve_validation(labels, 0.0, 4)
