"""The shared batched augmentation ops against direct per-sample numpy / Pillow versions."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import hwc, np_pad_crop, random_images, smooth_images
from pipeline.augment import (STREAM_UNIFORM, center_crop_resize, color_jitter, crop_flip_gather, draw_params, pad_crop_flip,
                              pad_nhwc, random_resized_crop_params, resized_crop, step_generator)
from pipeline.loaders import AugmentSpec, EvalSpec
from pipeline.loaders.reference import color_jitter_np, eval_transform

# --- augment ops ---------------------------------------------------------------------------------
def test_crop_flip_gather_matches_per_sample_numpy():
    x = torch.from_numpy(np.stack(random_images(5, 8, seed=3)))  # NHWC
    offsets = torch.tensor([[0, 0], [4, 4], [2, 3], [4, 0], [1, 4]])
    flip = torch.tensor([False, True, True, False, True])
    idx = torch.tensor([4, 0, 2, 2, 1])
    out = crop_flip_gather(pad_nhwc(x, 2), idx, offsets, flip, 8)
    assert out.shape == (5, 3, 8, 8) and out.is_contiguous(memory_format=torch.channels_last)
    for b in range(5):
        want = np_pad_crop(x[idx[b]].numpy(), 2, *offsets[b].tolist(), 8, bool(flip[b]))
        np.testing.assert_array_equal(hwc(out)[b], want)
    # The centred crop without flip is the image itself; with flip, its mirror.
    flips = torch.tensor([False, True, False, True, False])
    centre = crop_flip_gather(pad_nhwc(x, 2), torch.arange(5), torch.full((5, 2), 2), flips, 8)
    np.testing.assert_array_equal(hwc(centre)[0], x[0].numpy())
    np.testing.assert_array_equal(hwc(centre)[1], x[1].numpy()[:, ::-1])


def test_pad_crop_flip_deterministic_and_in_range():
    x = torch.from_numpy(np.stack(random_images(64, 6, seed=4))).permute(0, 3, 1, 2)
    a = pad_crop_flip(x, 2, step_generator(0, 1, 2, 0, STREAM_UNIFORM))
    b = pad_crop_flip(x, 2, step_generator(0, 1, 2, 0, STREAM_UNIFORM))
    c = pad_crop_flip(x, 2, step_generator(0, 1, 3, 0, STREAM_UNIFORM))
    assert torch.equal(a, b) and not torch.equal(a, c)
    p = draw_params(AugmentSpec(size=6, pad=2), 4000, 6, 6, step_generator(0, 0, 0, 0, 0))
    assert p.offsets.min() == 0 and p.offsets.max() == 4  # every offset 0..2*pad reachable
    assert 0.45 < p.flip.float().mean() < 0.55
    no_flip = draw_params(AugmentSpec(size=6, pad=2, flip=False), 100, 6, 6, step_generator(0, 0, 0, 0, 0))
    assert not no_flip.flip.any()


def _torchvision_rrc(h, w, scale, ratio, target, log_r, u):
    """torchvision's RandomResizedCrop.get_params as a loop, fed the same uniforms."""
    area = h * w
    for t in range(10):
        ta = area * (scale[0] + (scale[1] - scale[0]) * target[t])
        ar = np.exp(np.log(ratio[0]) + (np.log(ratio[1]) - np.log(ratio[0])) * log_r[t])
        cw, ch = int(round(np.sqrt(ta * ar))), int(round(np.sqrt(ta / ar)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(u[0] * (h - ch + 1)), int(u[1] * (w - cw + 1)), ch, cw
    in_ratio = w / h
    if in_ratio < min(ratio):
        cw, ch = w, int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        ch, cw = h, int(round(h * max(ratio)))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


@pytest.mark.parametrize("h,w,scale,ratio", [(48, 64, (0.08, 1.0), (3 / 4, 4 / 3)),
                                             (20, 90, (0.9, 1.0), (3 / 4, 4 / 3)),  # fallbacks
                                             (90, 20, (0.9, 1.0), (3 / 4, 4 / 3)),
                                             (30, 30, (0.5, 1.0), (0.5, 2.0))])
def test_random_resized_crop_params_match_torchvision_algorithm(h, w, scale, ratio):
    n = 300
    boxes = random_resized_crop_params(n, h, w, scale, ratio, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)  # replay the same uniforms in the documented order
    target = torch.rand((n, 10), generator=g, dtype=torch.float64).numpy()
    log_r = torch.rand((n, 10), generator=g, dtype=torch.float64).numpy()
    u = torch.rand((n, 2), generator=g, dtype=torch.float64).numpy()
    want = [_torchvision_rrc(h, w, scale, ratio, target[i], log_r[i], u[i]) for i in range(n)]
    np.testing.assert_array_equal(boxes.numpy(), np.array(want))
    top, left, bh, bw = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + bh <= h).all() and (left + bw <= w).all()


def test_resized_crop_matches_pillow_when_enlarging():
    """Without shrinking, bilinear needs no antialiasing: grid_sample and Pillow agree to 1 level."""
    imgs = smooth_images(6, 20, 30, seed=6)
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2)
    boxes = torch.tensor([[0, 0, 20, 30], [3, 5, 10, 12], [10, 20, 10, 10], [0, 0, 5, 7],
                          [7, 1, 13, 29], [2, 2, 16, 16]])
    flip = torch.tensor([False, True, False, True, False, False])
    out = hwc(resized_crop(x, boxes, 32, flip).round().to(torch.uint8))
    for b, im in enumerate(imgs):
        t, l, bh, bw = boxes[b].tolist()
        want = np.asarray(Image.fromarray(im).resize((32, 32), Image.BILINEAR, box=(l, t, l + bw, t + bh)))
        want = want[:, ::-1] if flip[b] else want
        assert np.abs(out[b].astype(int) - want).max() <= 1, b


def test_color_jitter_tensor_matches_numpy():
    x = torch.from_numpy(np.stack(smooth_images(4, 9, 7, seed=8))).permute(0, 3, 1, 2).float()
    f = torch.tensor([[1.2, 0.8, 1.3], [0.7, 1.3, 0.6], [1.0, 1.0, 1.0], [1.4, 0.6, 0.0]])
    out = hwc(color_jitter(x, f))
    for b in range(4):
        np.testing.assert_allclose(out[b], color_jitter_np(hwc(x)[b], f[b].numpy()), atol=1e-3)
    np.testing.assert_allclose(out[2], hwc(x)[2], atol=1e-4)  # factors of 1 change nothing


def test_center_crop_resize_matches_pillow():
    imgs = smooth_images(3, 48, 64, seed=9)
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    out = center_crop_resize(x, 28, 32)
    assert out.shape == (3, 3, 28, 28) and out.is_contiguous(memory_format=torch.channels_last)
    for b, im in enumerate(imgs):
        assert np.abs(hwc(out)[b].astype(int) - eval_transform(im, EvalSpec(28, 32))).max() <= 2
    assert torch.equal(center_crop_resize(x[:, :, :32, :32], 32, 32), x[:, :, :32, :32])
