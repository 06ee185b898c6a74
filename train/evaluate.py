"""Top-1 accuracy overall and by many / medium / few classes (the Decoupling `shot_acc` convention:
a group's accuracy is the mean of its classes' accuracies), plus per-class accuracy."""
from __future__ import annotations

from typing import Callable, Iterable

import torch

from train.distributed import all_reduce_sum


@torch.no_grad()
def evaluate(predict: Callable[[torch.Tensor], torch.Tensor], batches: Iterable,
             num_classes: int, groups: dict[str, list[int]], device: torch.device) -> dict:
    """`predict` maps a batch of uint8 images to logits; `batches` yields (x_u8, y) with every sample
    exactly once across processes. Counts are summed over processes, so every rank gets the result."""
    correct = torch.zeros(num_classes, dtype=torch.float64, device=device)
    total = torch.zeros(num_classes, dtype=torch.float64, device=device)
    for x, y, *_ in batches:  # eval loaders yield Batch(x, y, None, None)
        y = y.to(device, non_blocking=True)
        hit = (predict(x).argmax(dim=1) == y).to(torch.float64)
        correct.index_add_(0, y, hit)
        total.index_add_(0, y, torch.ones_like(hit))
    all_reduce_sum(correct)
    all_reduce_sum(total)
    return summarize(correct.cpu(), total.cpu(), groups)


def summarize(correct: torch.Tensor, total: torch.Tensor, groups: dict[str, list[int]]) -> dict:
    """`correct`, `total`: (num_classes,) float64 per-class counts -> {"top1", "num_samples", one
    entry per group (percent; None when no class of the group has test samples), "per_class"
    (percent, None for classes without test samples)}. Vectorised: a few tensor ops whatever the
    number of classes (iNaturalist 2018 has 8,142), no Python loop over classes."""
    present = total > 0
    per_class = torch.where(present, correct / total.clamp(min=1), torch.full_like(total, float("nan")))
    out = {"top1": 100.0 * float(correct.sum() / total.sum().clamp(min=1)),
           "num_samples": int(total.sum())}
    for name, ids in groups.items():
        ids = torch.as_tensor(ids, dtype=torch.int64)
        ids = ids[present[ids]]
        out[name] = 100.0 * float(per_class[ids].mean()) if len(ids) else None
    rounded = (100.0 * per_class).round(decimals=4).tolist()  # NaN where absent
    out["per_class"] = [a if p else None for a, p in zip(rounded, present.tolist())]
    return out
