"""Class centroids in the embedding space, updated by momentum (MoPro style, Eq. 1).

The update has per-sample semantics -- for each sample i of class k in batch order,
c_k <- m c_k + (1 - m) z_i, then every row is L2-normalised -- but is computed in
closed form without a Python loop: if class k has samples z_1..z_n in batch order,

    c_k <- m^n c_k + (1 - m) * sum_j m^(n - j) z_j.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = ["CentroidBank"]


def _gather_from_all_ranks(t: torch.Tensor) -> torch.Tensor:
    """Concatenate equally shaped tensors from every rank, in rank order."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


class CentroidBank(nn.Module):
    """K centroids of dimension ``dim`` held in the float32 buffer ``centroids``.

    The buffer starts at zero, so a class never seen keeps a zero row (and zero
    centroid logits) until its first sample arrives.
    """

    centroids: torch.Tensor

    def __init__(self, num_classes: int, dim: int, momentum: float = 0.99) -> None:
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        self.momentum = momentum
        self.register_buffer("centroids", torch.zeros(num_classes, dim, dtype=torch.float32))

    @torch.no_grad()
    def update(self, z: torch.Tensor, y: torch.Tensor, gather: bool = True) -> None:
        """Move the centroids of the classes in ``y`` towards the embeddings ``z``.

        Args:
            z: (N, dim) embeddings of clean samples, any float dtype.
            y: (N,) integer class labels.
            gather: when a process group is initialised, first all-gather ``z`` and
                ``y`` from every rank (equal N per rank) so that all ranks apply the
                same update and keep identical centroids.
        """
        num_classes, dim = self.centroids.shape
        if z.dim() != 2 or z.shape[1] != dim or y.shape != (z.shape[0],):
            raise ValueError(
                f"expected z of shape (N, {dim}) and y of shape (N,), "
                f"got {tuple(z.shape)} and {tuple(y.shape)}"
            )
        z = z.detach().float()
        y = y.detach().long()
        if gather and dist.is_available() and dist.is_initialized():
            z = _gather_from_all_ranks(z)
            y = _gather_from_all_ranks(y)

        # Accumulate in float64: the weights m^(n-j) span orders of magnitude.
        acc = torch.float64
        m = torch.tensor(self.momentum, dtype=acc, device=z.device)
        if y.device.type == "cpu" and y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            # Checked on the host only: on a GPU the check would stall every training step.
            raise ValueError(f"labels must lie in [0, {num_classes}), got {int(y.min())}..{int(y.max())}")
        # index_add_ rather than bincount: bincount must read the largest label back to the host
        # to size its output, a device sync per step on a GPU.
        counts = torch.zeros(num_classes, dtype=torch.long, device=y.device).index_add_(0, y, torch.ones_like(y))
        # Position of each sample among the samples of its class, in batch order:
        # a stable sort groups classes while keeping batch order inside each group.
        order = torch.sort(y, stable=True).indices
        y_sorted = y[order]
        group_start = torch.cumsum(counts, 0) - counts
        position = torch.arange(y.numel(), device=y.device) - group_start[y_sorted]
        exponent = counts[y_sorted] - 1 - position  # n - j with j counted from 1
        weights = (1 - m) * m.pow(exponent.to(acc))

        # Per-class weighted sums as differences of one running sum over the class-sorted
        # samples. Unlike index_add_ (atomics on CUDA) this is deterministic, so ranks
        # given identical inputs end with bit-identical centroids.
        running = torch.cumsum(z[order].to(acc) * weights[:, None], dim=0)
        running = torch.cat([running.new_zeros(1, dim), running])
        group_end = group_start + counts
        sums = running[group_end] - running[group_start]  # zero rows for absent classes
        decay = m.pow(counts.to(acc))  # 1 for classes absent from the batch
        new = decay[:, None] * self.centroids.to(acc) + sums
        self.centroids.copy_(F.normalize(new, dim=1))
