"""The ICCL network: encoder f, linear classifier h and projection head g.

``forward`` returns all three outputs so that stage 1 needs one pass per input (the
concatenated batch [x_a; x_mix], or each branch); stage 2 uses ``forward_features`` + ``classifier``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import ARCHITECTURES, build_encoder, check_arch

__all__ = ["ARCHITECTURES", "ICCLNet", "build_network", "check_arch"]


class ICCLNet(nn.Module):
    """Encoder + linear classifier + MLP projection head with L2-normalised output.

    Args:
        encoder: module mapping images to (N, encoder.out_dim) features.
        num_classes: number of classifier outputs.
        proj_dim: dimension of the embedding z.
        proj_hidden: hidden width of the projection MLP; defaults to the feature dim.
    """

    def __init__(
        self, encoder: nn.Module, num_classes: int, proj_dim: int, proj_hidden: int | None = None
    ) -> None:
        super().__init__()
        out_dim = int(encoder.out_dim)
        hidden = out_dim if proj_hidden is None else proj_hidden
        self.encoder = encoder
        self.classifier = nn.Linear(out_dim, num_classes)
        self.projector = nn.Sequential(
            nn.Linear(out_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, proj_dim)
        )
        self.num_classes = num_classes
        self.proj_dim = proj_dim

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder features v = f(x), shape (N, out_dim)."""
        return self.encoder(x)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Unit-norm float32 embedding z = g(v) / ||g(v)||, shape (N, proj_dim)."""
        z = self.projector(features)
        # Normalising in bf16 would leave ||z|| off 1 by ~1e-2, which τ = 0.1 amplifies
        # tenfold in the centroid logits; do it in float32 whatever autocast says.
        with torch.autocast(device_type=z.device.type, enabled=False):
            return F.normalize(z.float(), dim=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(features, logits, z)``."""
        features = self.forward_features(x)
        return features, self.classifier(features), self.project(features)


def build_network(
    arch: str, num_classes: int, proj_dim: int, proj_hidden: int | None = None
) -> ICCLNet:
    """Build an :class:`ICCLNet` on the encoder `arch` names (the rule: `model.backbones`).

    Raises:
        ValueError: an unknown name (see :func:`check_arch`).
    """
    return ICCLNet(build_encoder(arch), num_classes, proj_dim, proj_hidden)
