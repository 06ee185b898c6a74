"""Classifier rebalancing after representation learning: the math of the stage-2 family.

Every function maps a trained linear classifier (weight W of shape (K, d), bias b of shape (K,))
and training statistics to a new classifier, or is a loss for retraining one; `train.stage2_methods`
runs them. Each result is again a plain linear layer, so a rebalanced model is saved, loaded and
evaluated like any other. Sources (docs/METHOD.md, "The stage-2 family"):

- τ-normalised classifier: Kang et al., "Decoupling Representation and Classifier for Long-Tailed
  Recognition", ICLR 2020, Sec. 4: w_k / ||w_k||^τ.
- LWS (learnable weight scaling), same paper: logits_k = f_k · (w_k·v + b_k), only f trained.
- NCM (nearest class mean), same paper.
- Logit adjustment: Menon et al., "Long-Tail Learning via Logit Adjustment", ICLR 2021, Eq. 9:
  logits_k − τ·log π_k, π the training class prior.
- Label-aware smoothing: Zhong et al., "Improving Calibration for Long-Tailed Recognition"
  (MiSLAS), CVPR 2021, Eqs. 4-5.
"""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = [
    "LAS_SHAPES",
    "LearnableWeightScaling",
    "class_means",
    "fold_scales",
    "label_aware_epsilons",
    "label_aware_smoothing",
    "logit_adjusted_bias",
    "ncm_classifier",
    "tau_normalized",
]

LAS_SHAPES = ("concave", "linear", "convex")


def tau_normalized(weight: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(w_k / ||w_k||_2^p for every row k, a zero bias): Decoupling's τ-normalised classifier, whose
    logits are w̃_k·v with no bias term. p = 0 keeps the weights, p = 1 gives unit-norm rows.

    weight: (K, d) float tensor; the result has its dtype. Raises ValueError for a zero row.
    """
    norms = weight.norm(dim=1, keepdim=True)
    if (norms == 0).any():
        raise ValueError("tau-normalisation: a classifier row is all zero (a class never trained)")
    return weight / norms.pow(p), torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)


def logit_adjusted_bias(bias: torch.Tensor, class_counts, tau: float) -> torch.Tensor:
    """b_k − τ·log π_k with π_k = n_k / Σ_j n_j: the post-hoc logit adjustment of Menon et al.
    (their Eq. 9), folded into the bias so that logits − τ·log π come out of the linear layer.

    bias: (K,) float tensor; class_counts: K counts, all > 0 (ValueError otherwise).
    """
    counts = torch.as_tensor(class_counts, dtype=torch.float64)
    if counts.shape != bias.shape or (counts <= 0).any():
        raise ValueError("logit adjustment needs one positive training count per class")
    log_prior = (counts / counts.sum()).log()
    return (bias.double() - tau * log_prior).to(bias.dtype)


def class_means(features: torch.Tensor, labels: torch.Tensor,
                num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-class feature sums (K, d) float64, per-class counts (K,) float64): summed rather than
    averaged so that several processes can add theirs before dividing."""
    sums = torch.zeros(num_classes, features.shape[1], dtype=torch.float64, device=features.device)
    sums.index_add_(0, labels, features.double())
    counts = torch.bincount(labels, minlength=num_classes).to(torch.float64)
    return sums, counts


def ncm_classifier(sums: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest class mean (Euclidean) as a linear layer: with μ_k the mean feature of class k,
    argmin_k ||v − μ_k||² = argmax_k (μ_k·v − ||μ_k||²/2), so W = μ, b = −||μ||²/2 (float64).
    Raises ValueError when a class has no sample."""
    if (counts <= 0).any():
        raise ValueError("NCM: a class has no training image to average")
    mu = sums / counts.unsqueeze(1)
    return mu, -0.5 * (mu * mu).sum(dim=1)


class LearnableWeightScaling(nn.Module):
    """One learnable scale per class, f (K,) initialised to 1: logits_k ← f_k · logits_k (LWS).
    Input and output (N, K)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.scales = nn.Parameter(torch.ones(num_classes))

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits * self.scales.to(logits.dtype)


def fold_scales(weight: torch.Tensor, bias: torch.Tensor,
                scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The linear layer equal to `scales * (weight @ v + bias)`: (f_k·w_k, f_k·b_k)."""
    f = scales.detach().to(weight.dtype)
    return weight * f.unsqueeze(1), bias * f


def label_aware_epsilons(class_counts, eps_head: float, eps_tail: float,
                         shape: str = "concave") -> torch.Tensor:
    """MiSLAS's per-class smoothing ε_k (their Eq. 5) as a float64 (K,) tensor, from the training
    counts n_k, n_1 = max n, n_K = min n and r_k = (n_k − n_K) / (n_1 − n_K):
      concave: ε_K + (ε_1 − ε_K)·sin(π r_k / 2)        (the MiSLAS default, used here)
      linear:  ε_K + (ε_1 − ε_K)·r_k
      convex:  ε_1 + (ε_1 − ε_K)·sin(3π/2 + π r_k / 2)
    ε_1 = `eps_head` (the most frequent class), ε_K = `eps_tail`. All classes equally frequent
    (n_1 = n_K): every ε_k = ε_1. Raises ValueError for an unknown shape."""
    n = torch.as_tensor(class_counts, dtype=torch.float64)
    hi, lo = float(n.max()), float(n.min())
    r = (n - lo) / (hi - lo) if hi > lo else torch.ones_like(n)
    if shape == "concave":
        return eps_tail + (eps_head - eps_tail) * torch.sin(math.pi / 2 * r)
    if shape == "linear":
        return eps_tail + (eps_head - eps_tail) * r
    if shape == "convex":
        return eps_head + (eps_head - eps_tail) * torch.sin(1.5 * math.pi + math.pi / 2 * r)
    raise ValueError(f"label-aware smoothing shape {shape!r}: use one of {', '.join(LAS_SHAPES)}")


def label_aware_smoothing(logits: torch.Tensor, y: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """MiSLAS's label-aware smoothing loss (their Eq. 4): −mean_i Σ_k q_ik log p_ik with
    q_iy = 1 − ε_y on the label and ε_y / (K − 1) on every other class.

    logits (N, K), y (N,) int64, eps (K,) per-class ε; log-softmax in float32 at least."""
    log_p = logits.log_softmax(dim=1, dtype=torch.promote_types(logits.dtype, torch.float32))
    k = log_p.shape[1]
    e = eps.to(device=log_p.device, dtype=log_p.dtype)[y]
    picked = log_p.gather(1, y.unsqueeze(1)).squeeze(1)
    others = log_p.sum(dim=1) - picked
    return -((1 - e) * picked + e / (k - 1) * others).mean()
