"""The loss of one training step, for each phase of the method (docs/METHOD.md, Eqs. 4-8).

Pure functions of (network, centroids, normalised inputs): the trainer, the benchmark and the tests
call the same code. By default the network sees one fused forward over [x_a; x_mix] (the single-
forward trick for dual-sampler training), so batch-norm statistics are those of the concatenated
batch; `fused=False` runs one forward per branch (each normalised by its own statistics). The
CIFAR presets run unfused: on CIFAR-10-LT it was worth 3 points of stage-1 accuracy (README, "Where
the full budget falls short"), and with w^u = 0 the clean forward then needs no backward at all.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from model.losses import (centroid_contrastive, distillation_loss, interpolative_ce,
                          interpolative_centroid_contrastive, uniform_ce)

PHASES = ("ce", "warmup", "iccl")


@dataclass(frozen=True)
class LossWeights:
    w_u: float = 1.0   # uniform-branch CE (Eq. 6)
    w_il: float = 1.0  # interpolative CE + interpolative centroid contrastive (Eqs. 5, 7)
    tau: float = 0.1


def stage1_phase(method: str, epoch: int, warmup_epochs: int) -> str:
    """'ce' for the baseline; 'warmup' (uniform branch only) for the first T_w epochs; then 'iccl'."""
    if method == "ce":
        return "ce"
    return "warmup" if epoch < warmup_epochs else "iccl"


def stage1_loss(net, centroids: torch.Tensor | None, phase: str, x_a: torch.Tensor, y_a: torch.Tensor,
                x_mix: torch.Tensor | None = None, y_c: torch.Tensor | None = None,
                lam: torch.Tensor | None = None, weights: LossWeights = LossWeights(), fused: bool = True):
    """Returns (loss, z_a): z_a, the clean uniform-branch embeddings, feeds the centroid update
    (None in the 'ce' phase, which has no projection head loss)."""
    if phase == "ce":
        _, logits, _ = net(x_a)
        return uniform_ce(logits, y_a), None
    if phase == "warmup":
        # Eq. 6 + Eq. 4 on the clean embedding: w^u L_ce^u + L_cc (w^u is Eq. 8's, warm-up included).
        _, logits, z = net(x_a)
        return weights.w_u * uniform_ce(logits, y_a) + centroid_contrastive(z, centroids, y_a, weights.tau), z
    if fused:
        n = x_a.shape[0]
        _, logits, z = net(torch.cat([x_a, x_mix]))
        logits_a, logits_m = logits[:n], logits[n:]
        z_a, z_m = z[:n], z[n:]
    else:
        # With w^u = 0 the clean forward only feeds the centroid update (z_a is detached there), so
        # it records no graph: the same gradients and batch-norm updates, no activations kept, and
        # DistributedDataParallel sees one forward with a graph per backward, as it requires.
        with torch.set_grad_enabled(torch.is_grad_enabled() and bool(weights.w_u)):
            _, logits_a, z_a = net(x_a)
        _, logits_m, z_m = net(x_mix)
    loss = weights.w_il * (interpolative_ce(logits_m, y_a, y_c, lam)
                           + interpolative_centroid_contrastive(z_m, centroids, y_a, y_c, lam, weights.tau))
    if weights.w_u:
        loss = loss + weights.w_u * uniform_ce(logits_a, y_a)
    return loss, z_a


def stage2_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, y: torch.Tensor,
                beta: float, temperature: float) -> torch.Tensor:
    """Classifier rebalancing: (1 - beta) CE + beta T^2 KL(teacher || student); beta = 0 is cRT."""
    if beta == 0.0:
        return uniform_ce(student_logits, y)
    return distillation_loss(student_logits, teacher_logits, y, beta, temperature)
