"""The generated long-tailed dataset: deterministic, the CIFAR-LT profile, learnable but not trivial."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.errors import DataError
from pipeline.sources.synthetic import make_synthetic_lt


def test_default_counts_shapes_and_types():
    source = make_synthetic_lt()
    train, test = source.splits["train"], source.splits["test"]
    assert source.description["train_class_counts"] == [500, 299, 179, 107, 64, 38, 23, 13, 8, 5]
    assert np.bincount(train.labels).tolist() == [500, 299, 179, 107, 64, 38, 23, 13, 8, 5]
    assert np.bincount(test.labels).tolist() == [100] * 10
    assert train.items.shape == (1236, 32, 32, 3) and train.items.dtype == np.uint8
    assert test.items.shape == (1000, 32, 32, 3)
    assert np.bincount(source.splits["val"].labels).tolist() == [100] * 10
    assert len(source.classes) == 10 and len(set(source.classes)) == 10
    # the pixels use the range (no saturated or flat images)
    assert train.items.min() == 0 and train.items.max() == 255 and 90 < train.items.mean() < 165


def test_deterministic_in_the_seed():
    a, b = make_synthetic_lt(seed=3, max_per_class=50), make_synthetic_lt(seed=3, max_per_class=50)
    c = make_synthetic_lt(seed=4, max_per_class=50)
    for split in ("train", "test"):
        assert np.array_equal(a.splits[split].items, b.splits[split].items)
        assert np.array_equal(a.splits[split].labels, b.splits[split].labels)
    assert not np.array_equal(a.splits["train"].items, c.splits["train"].items)


def test_validation_split_leaves_train_and_test_alone():
    """The val split is drawn last: train and test are the same with or without it, and val is new images."""
    a, b = make_synthetic_lt(seed=2, max_per_class=40), make_synthetic_lt(seed=2, max_per_class=40, val_per_class=0)
    assert "val" not in b.splits and len(a.splits["val"].labels) == 1000
    for split in ("train", "test"):
        assert np.array_equal(a.splits[split].items, b.splits[split].items)
    assert not any(np.array_equal(a.splits["val"].items[0], t) for t in a.splits["test"].items)


def test_options():
    source = make_synthetic_lt(num_classes=7, image_size=24, imbalance=1000, max_per_class=10,
                               test_per_class=3)
    assert np.bincount(source.splits["train"].labels).tolist() == [10, 3, 1, 1, 1, 1, 1]  # at least 1
    assert source.splits["test"].items.shape == (21, 24, 24, 3)
    flat = make_synthetic_lt(num_classes=4, imbalance=1, max_per_class=6)
    assert np.bincount(flat.splits["train"].labels).tolist() == [6] * 4
    for bad in ({"num_classes": 1}, {"imbalance": 0.5}, {"image_size": 4}, {"val_per_class": -1}):
        with pytest.raises(DataError):
            make_synthetic_lt(**bad)


def _features(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two simple descriptors: an 8x8 colour thumbnail, and the low-frequency amplitude spectrum
    of the grey image (blind to position and phase, sensitive to orientation and frequency)."""
    x = images.astype(np.float32) / 255
    n, s = len(x), x.shape[1]
    thumb = x.reshape(n, 8, s // 8, 8, s // 8, 3).mean((2, 4)).reshape(n, -1)
    grey = x.mean(-1)
    spectrum = np.abs(np.fft.fftshift(np.fft.fft2(grey - grey.mean((1, 2), keepdims=True)), axes=(1, 2)))
    c = s // 2
    return thumb, np.log1p(spectrum[:, c - 4:c + 5, c - 4:c + 5].reshape(n, -1))


def _logistic_regression_accuracy(x_train, y_train, x_test, y_test, num_classes) -> float:
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = torch.tensor((x_train - mean) / std), torch.tensor((x_test - mean) / std)
    y_train = torch.tensor(y_train)
    torch.manual_seed(0)
    linear = torch.nn.Linear(x_train.shape[1], num_classes)
    opt = torch.optim.LBFGS(linear.parameters(), max_iter=300)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(x_train), y_train) + 1e-3 * linear.weight.pow(2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    with torch.no_grad():
        return (linear(x_test).argmax(1).numpy() == y_test).mean()


def _nearest_mean_accuracy(x_train, y_train, x_test, y_test, num_classes) -> float:
    means = np.stack([x_train[y_train == k].mean(0) for k in range(num_classes)])
    return (((x_test[:, None] - means[None]) ** 2).sum(-1).argmin(1) == y_test).mean()


def test_learnable_but_not_trivial():
    """On a balanced sample (200 per class), a linear classifier on simple features is far above
    chance (10 %) but far from perfect, while the nearest class mean of the thumbnails -- colour blobs,
    since position and phase vary -- is close to chance. Measured with seeds 0-2: 87-88 % and 18-19 %."""
    source = make_synthetic_lt(imbalance=1, max_per_class=200, test_per_class=100, seed=1)
    train, test = source.splits["train"], source.splits["test"]
    (thumb_train, spec_train), (thumb_test, spec_test) = _features(train.items), _features(test.items)
    both = _logistic_regression_accuracy(np.hstack([thumb_train, spec_train]), train.labels,
                                         np.hstack([thumb_test, spec_test]), test.labels, 10)
    assert 0.6 < both < 0.97
    colour = _nearest_mean_accuracy(thumb_train, train.labels, thumb_test, test.labels, 10)
    assert colour < 0.4
