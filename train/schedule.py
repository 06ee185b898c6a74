"""Learning-rate schedules as pure functions of training progress (fractional epoch)."""
from __future__ import annotations

import math


def step_lr(base: float, epoch: float, warmup_epochs: int, steps: tuple[int, ...], factor: float) -> float:
    """Linear warm-up, then multiply by `factor` at each epoch in `steps` (the LDAM-DRW / BBN CIFAR
    recipe: 5 warm-up epochs, x0.01 at 120 and 160 of 200). As there, warm-up starts at base/5
    (for 5 warm-up epochs) and rises linearly to `base`, reached in the last warm-up epoch."""
    if epoch < warmup_epochs:
        return base * min(1.0, (epoch + 1) / warmup_epochs)
    return base * factor ** sum(epoch >= s for s in steps)


def cosine_lr(base: float, epoch: float, total: int, warmup_epochs: int = 0) -> float:
    """Optional linear warm-up, then half a cosine from `base` to 0 over the remaining epochs."""
    if epoch < warmup_epochs:
        return base * min(1.0, (epoch + 1) / warmup_epochs)
    t = (epoch - warmup_epochs) / max(total - warmup_epochs, 1)
    return 0.5 * base * (1.0 + math.cos(math.pi * min(max(t, 0.0), 1.0)))
