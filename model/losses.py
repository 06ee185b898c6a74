"""The ICCL losses (docs/METHOD.md, Eqs. 4-8) and the stage-2 distillation loss.

Every loss returns a scalar mean over the batch. Log-softmax runs in float32 (or
float64 when the inputs are float64) whatever the input dtype, so bf16 logits from
autocast lose no precision where it matters.
"""
from __future__ import annotations

import torch

__all__ = [
    "uniform_ce",
    "interpolative_ce",
    "centroid_logits",
    "centroid_contrastive",
    "interpolative_centroid_contrastive",
    "distillation_loss",
]


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float32 for half-precision inputs, the input dtype otherwise."""
    return torch.promote_types(t.dtype, torch.float32)


def _log_softmax(logits: torch.Tensor) -> torch.Tensor:
    return logits.log_softmax(dim=1, dtype=_compute_dtype(logits))


def _picked(log_probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """log_probs[i, y_i] for every row i."""
    return log_probs.gather(1, y.long().unsqueeze(1)).squeeze(1)


def uniform_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Eq. 6: -mean_i log p(y_i | x_i)."""
    return -_picked(_log_softmax(logits), y).mean()


def interpolative_ce(
    logits_mix: torch.Tensor, y_a: torch.Tensor, y_c: torch.Tensor, lam: torch.Tensor
) -> torch.Tensor:
    """Eq. 7: -mean_i [lam_i log p(y_a_i | x~_i) + (1 - lam_i) log p(y_c_i | x~_i)].

    ``lam`` holds one weight per sample: shape (N,), or any shape with N elements
    such as the (N, 1, 1, 1) used to mix the images.
    """
    log_probs = _log_softmax(logits_mix)
    n = log_probs.shape[0]
    if lam.numel() != n:
        raise ValueError(f"lam must hold one weight per sample ({n}), got shape {tuple(lam.shape)}")
    lam = lam.reshape(n).to(log_probs.dtype)
    return -(lam * _picked(log_probs, y_a) + (1 - lam) * _picked(log_probs, y_c)).mean()


def centroid_logits(z: torch.Tensor, centroids: torch.Tensor, tau: float) -> torch.Tensor:
    """Eq. 4 logits z . c_k / tau, shape (N, K); no gradient reaches the centroids.

    The product runs outside autocast: with tau = 0.1 the bf16 rounding of the dot
    products would be amplified tenfold, and the (N, d) x (d, K) product is cheap.
    """
    dtype = _compute_dtype(z)
    with torch.autocast(device_type=z.device.type, enabled=False):
        return z.to(dtype) @ centroids.detach().to(dtype).T / tau


def centroid_contrastive(
    z: torch.Tensor, centroids: torch.Tensor, y: torch.Tensor, tau: float
) -> torch.Tensor:
    """Warm-up L_cc: -mean_i log p(c_{y_i} | x_i) on clean embeddings."""
    return uniform_ce(centroid_logits(z, centroids, tau), y)


def interpolative_centroid_contrastive(
    z_mix: torch.Tensor,
    centroids: torch.Tensor,
    y_a: torch.Tensor,
    y_c: torch.Tensor,
    lam: torch.Tensor,
    tau: float,
) -> torch.Tensor:
    """Eq. 5: -mean_i [lam_i log p(c_{y_a_i} | x~_i) + (1 - lam_i) log p(c_{y_c_i} | x~_i)]."""
    return interpolative_ce(centroid_logits(z_mix, centroids, tau), y_a, y_c, lam)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    y: torch.Tensor,
    beta: float,
    T: float,
) -> torch.Tensor:
    """Stage 2: (1 - beta) CE(s, y) + beta T^2 KL(softmax(t/T) || softmax(s/T)).

    The KL divergence is summed over classes and averaged over samples; the teacher
    gets no gradient. ``beta = 0`` returns plain cross-entropy (cRT) exactly, without
    touching the teacher.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if T <= 0:
        raise ValueError(f"temperature T must be positive, got {T}")
    ce = uniform_ce(student_logits, y)
    if beta == 0:
        return ce
    log_s = _log_softmax(student_logits / T)
    log_t = _log_softmax(teacher_logits.detach() / T).to(log_s.dtype)
    kl = (log_t.exp() * (log_t - log_s)).sum(dim=1).mean()
    # T^2 keeps the soft-target gradients on the scale of the hard-target ones.
    return (1 - beta) * ce + beta * T * T * kl
