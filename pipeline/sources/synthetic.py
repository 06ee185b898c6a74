"""A generated long-tailed image dataset: learnable, deliberately not trivial, made in seconds.

What it is for: the embedded demo and the tests, where a run must finish on a CPU in minutes and still
show what long-tailed training is about -- plain cross-entropy doing visibly worse on the tail than on
the head, and class rebalancing helping the tail. So the classes must be learnable by a small CNN in a
few epochs, yet overlap enough that the 5-50 images of a tail class do not pin the class down.

The generator. Every class k has a colour, an orientation and a spatial frequency:
- classes come in pairs (2j, 2j+1) that share the colour and the frequency and differ only in
  orientation, by 40 degrees (both within 0-85 degrees, so that a horizontal flip, which mirrors
  the angle, never turns one into the other); orientations jitter per image by 9 degrees, so a
  pair is told apart only by the direction of a noisy texture;
- colours of the pairs are spread round the hue circle at medium saturation, so with many classes
  neighbouring pairs also come close in colour.
An image is a noisy background with a textured blob on it:
- background: a random colour with a random linear gradient, plus, in half of the images, a
  distractor disc of another random colour at a random place;
- the blob: a Gaussian envelope of random width at a jittered position (up to an eighth of the image
  off centre), filled with the class colour (perturbed per image) modulated by a sinusoidal grating of
  the class orientation and frequency, with a random phase and a random amplitude;
- then per-image brightness and contrast changes and strong per-pixel Gaussian noise.
Position, phase and noise change from image to image, so nothing can be memorised pixel by pixel.
Everything is vectorised numpy over chunks of images; one `numpy.random.default_rng(seed)` draws
the class parameters, then the training images, then the test images, so the result is a function of
the arguments alone.

Training counts follow the CIFAR-LT profile n_i = int(max_per_class * R^(-i / (K-1))) (at least 1),
classes in label order, so class 0 is the head; the test set is balanced, and so is a validation
split ("val", val_per_class per class, drawn after the test images so that train and test do not
depend on it): generated data can afford a validation split that costs the tail classes nothing,
so choices (the demo preset's values, the stage-2 choices' tuned values) are made on "val", never
on "test".

For orientation, with the defaults (1,236 training images, 500 down to 5 per class) ResNet-32 trained
for 30 epochs on a CPU (SGD, one-cycle lr 0.1, pad-crop + flip) reached 59 % test accuracy with the
uniform sampler (the three head classes 94 %, the three tail classes 3 %) and 81 % with the
class-balanced sampler (head 92 %, tail 61 %).
"""
from __future__ import annotations

import colorsys
import math

import numpy as np

from pipeline.errors import DataError
from pipeline.sources.base import Source, SourceSplit
from pipeline.sources.long_tail import long_tail_counts

PAIR_ANGLE = math.radians(40)    # orientation difference between the two classes of a pair
ANGLE_JITTER = math.radians(9)   # per-image orientation noise (standard deviation)
PIXEL_NOISE = 0.16               # per-pixel noise, standard deviation in [0, 1] intensity units
CHUNK = 2048                     # images generated at once (bounds the float temporaries)


def make_synthetic_lt(num_classes: int = 10, image_size: int = 32, imbalance: float = 100.0,
                      max_per_class: int = 500, test_per_class: int = 100, val_per_class: int = 100,
                      seed: int = 0) -> Source:
    """The generated long-tailed dataset: splits train (long-tailed), test and val (balanced; no val
    split when val_per_class is 0). Images (N, image_size, image_size, 3) uint8, labels (N,) int64.

    Raises DataError for num_classes < 2, imbalance < 1, image_size < 8, max_per_class or
    test_per_class < 1, val_per_class < 0."""
    if num_classes < 2:
        raise DataError(f"synthetic data: num_classes {num_classes}, must be at least 2.")
    if not (imbalance >= 1 and math.isfinite(imbalance)):
        raise DataError(f"synthetic data: imbalance {imbalance}, must be a number >= 1.")
    if image_size < 8 or max_per_class < 1 or test_per_class < 1:
        raise DataError("synthetic data: image_size must be at least 8 and the per-class counts at least 1.")
    if val_per_class < 0:
        raise DataError(f"--val-per-class {val_per_class}: must be 0 (no validation split) or more.")

    rng = np.random.default_rng(seed)
    classes = _class_parameters(num_classes, rng)
    train_counts = [max(1, n) for n in long_tail_counts(max_per_class, num_classes, imbalance)]
    train_labels = np.repeat(np.arange(num_classes), train_counts)
    test_labels = np.repeat(np.arange(num_classes), test_per_class)
    splits = {
        "train": SourceSplit(train_labels, _render(train_labels, classes, image_size, rng)),
        "test": SourceSplit(test_labels, _render(test_labels, classes, image_size, rng)),
    }
    if val_per_class:
        val_labels = np.repeat(np.arange(num_classes), val_per_class)
        splits["val"] = SourceSplit(val_labels, _render(val_labels, classes, image_size, rng))
    description = {
        "kind": "synthetic",
        "generator": "coloured oriented gratings in pairs of classes, with clutter and noise "
                     "(pipeline/sources/synthetic.py)",
        "seed": seed, "image_size": image_size, "imbalance": float(imbalance),
        "max_per_class": max_per_class, "test_per_class": test_per_class, "val_per_class": val_per_class,
        "train_class_counts": train_counts,
    }
    names = [f"class{k:0{len(str(num_classes - 1))}d}" for k in range(num_classes)]
    return Source(f"synthetic{num_classes}-lt", names, splits, description)


def _class_parameters(num_classes: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Colour (K, 3), orientation (K,) and frequency (K,) of every class; pairs share all but orientation."""
    pairs = (num_classes + 1) // 2
    hue = (np.arange(pairs) + rng.uniform(0, 0.3)) / pairs
    colour = np.array([colorsys.hsv_to_rgb(h, 0.55, 0.85) for h in hue])
    # 0-45 degrees plus PAIR_ANGLE keeps a pair within 0-85 degrees: a horizontal flip (the
    # standard augmentation, angle -> 180 - angle) then moves a class away from its partner.
    base_angle = rng.uniform(0, math.radians(45), pairs)
    frequency = rng.uniform(1.5, 3.0, pairs)  # grating cycles across the image
    pair = np.arange(num_classes) // 2
    return {
        "colour": colour[pair],
        "angle": base_angle[pair] + (np.arange(num_classes) % 2) * PAIR_ANGLE,
        "frequency": frequency[pair],
    }


def _render(labels: np.ndarray, classes: dict[str, np.ndarray], size: int,
            rng: np.random.Generator) -> np.ndarray:
    """(N, size, size, 3) uint8 images of the given classes, CHUNK at a time."""
    out = np.empty((len(labels), size, size, 3), dtype=np.uint8)
    for start in range(0, len(labels), CHUNK):
        out[start:start + CHUNK] = _render_chunk(labels[start:start + CHUNK], classes, size, rng)
    return out


def _render_chunk(labels: np.ndarray, classes: dict[str, np.ndarray], size: int,
                  rng: np.random.Generator) -> np.ndarray:
    n = len(labels)
    # pixel centres in [-1, 1]; trailing axes of size 1 broadcast per image / per channel
    axis = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    y, x = np.meshgrid(axis, axis, indexing="ij")
    y, x = y[None], x[None]  # (1, S, S)

    def per_image(values):
        return np.asarray(values, dtype=np.float32)[:, None, None]  # (N, 1, 1)

    # background: a random colour with a random linear gradient
    gradient = per_image(rng.normal(0, 0.15, n)) * x + per_image(rng.normal(0, 0.15, n)) * y
    image = rng.uniform(0.15, 0.85, (n, 1, 1, 3)).astype(np.float32) + gradient[..., None]

    # distractor disc of a random colour in half of the images
    cx, cy = per_image(rng.uniform(-0.8, 0.8, n)), per_image(rng.uniform(-0.8, 0.8, n))
    radius = per_image(rng.uniform(0.15, 0.35, n))
    disc = ((x - cx) ** 2 + (y - cy) ** 2 < radius ** 2) & per_image(rng.random(n) < 0.5).astype(bool)
    disc_colour = rng.uniform(0, 1, (n, 1, 1, 3)).astype(np.float32)
    image = np.where(disc[..., None], disc_colour, image)

    # the class blob: Gaussian envelope times an oriented grating, in the class colour
    cx, cy = per_image(rng.uniform(-0.25, 0.25, n)), per_image(rng.uniform(-0.25, 0.25, n))
    width = per_image(rng.uniform(0.35, 0.6, n))
    envelope = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * width ** 2))
    angle = per_image(classes["angle"][labels] + rng.normal(0, ANGLE_JITTER, n))
    frequency = per_image(classes["frequency"][labels] * np.exp(rng.normal(0, 0.1, n)))
    phase = per_image(rng.uniform(0, 2 * math.pi, n))
    along = (x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)
    grating = 0.5 + 0.5 * np.sin(math.pi * frequency * along + phase)
    amplitude = per_image(rng.uniform(0.6, 1.0, n))
    alpha = (amplitude * envelope)[..., None]
    colour = (classes["colour"][labels] + rng.normal(0, 0.08, (n, 3)))[:, None, None, :].astype(np.float32)
    image = image * (1 - alpha) + alpha * colour * (0.35 + 0.65 * grating[..., None])

    # photometric changes and sensor noise
    contrast = rng.uniform(0.7, 1.3, (n, 1, 1, 1)).astype(np.float32)
    brightness = rng.normal(0, 0.08, (n, 1, 1, 1)).astype(np.float32)
    image = (image - 0.5) * contrast + 0.5 + brightness
    image += rng.normal(0, PIXEL_NOISE, image.shape).astype(np.float32)
    return np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8)
