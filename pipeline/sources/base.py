"""What a source reader hands to the converter."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np


@dataclass
class SourceSplit:
    """The samples of one split, in the order they will be stored.

    `items[i]` is either a path to an image file (str) or a (H, W, 3) uint8 RGB array (sources that
    come as pixel arrays: CIFAR, synthetic); `origins[i]`, when given, says where the sample was listed
    (e.g. "ImageNet_LT_train.txt:17") so that an error can point at the line to fix.
    """

    labels: np.ndarray
    items: Sequence
    origins: Sequence[str] | None = None

    def __post_init__(self):
        self.labels = np.asarray(self.labels, dtype=np.int64)
        assert len(self.labels) == len(self.items)
        assert self.origins is None or len(self.origins) == len(self.items)


@dataclass
class Source:
    name: str                      # e.g. "cifar10-lt"
    classes: list[str]             # class names; label k is classes[k]
    splits: dict[str, SourceSplit]  # "train" plus "val" and/or "test"
    description: dict = field(default_factory=dict)  # paths, checksums verified, construction options
