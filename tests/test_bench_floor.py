"""The floor of `iccl bench pipeline`: its OpenCV jitter means what the loaders' jitter means, and it
runs on both augmentation kinds."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import make_converted, random_images, smooth_images
from pipeline.augment import color_jitter
from pipeline.dataset import ShardedSplit
from pipeline.loaders.base import AugmentSpec
from tools.bench_floor import floor_rate, jitter_u8

pytest.importorskip("cv2")


@pytest.mark.parametrize("factors", [(1.0, 1.0, 1.0), (1.4, 0.6, 1.4), (0.6, 1.4, 0.6), (1.2, 1.3, 0.0)])
def test_jitter_matches_the_loaders_jitter(factors):
    img = smooth_images(1, 40, 56, seed=3)[0]
    ref = color_jitter(torch.from_numpy(img).permute(2, 0, 1)[None].double(),
                       torch.tensor([factors], dtype=torch.float64))[0].permute(1, 2, 0).numpy()
    got = jitter_u8(img, *factors).astype(np.float64)
    # uint8 rounding after the LUT and in the grey conversion: within 2 levels
    assert np.abs(got - ref).max() <= 2.0, np.abs(got - ref).max()


@pytest.mark.parametrize("kind", ["rrc", "pad_crop"])
def test_floor_rate_runs(tmp_path, kind):
    if kind == "rrc":
        imgs, ext, spec = smooth_images(12, 60, 80, seed=0), "jpg", AugmentSpec(kind="rrc", size=32, jitter=0.4)
    else:
        imgs, ext, spec = random_images(12, 32), "png", AugmentSpec(kind="pad_crop", size=32, pad=4)
    root = make_converted(tmp_path / kind, {"train": (imgs, np.arange(12) % 3)}, 3, ext=ext)
    assert floor_rate(ShardedSplit(root, "train"), np.arange(24) % 12, spec, workers=1, chunk=8) > 0
