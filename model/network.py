"""The ICCL network: encoder f, linear classifier h and projection head g.

``forward`` returns all three outputs so that stage 1 needs one pass over the
concatenated batch [x_a; x_mix]; stage 2 uses ``forward_features`` + ``classifier``.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .resnet import resnet50, resnext50_32x4d
from .resnet_cifar import resnet32

__all__ = ["ARCHITECTURES", "ICCLNet", "build_network", "check_arch", "load_torchvision_weights"]

_ENCODERS: dict[str, Callable[[], nn.Module]] = {
    "resnet32": resnet32,
    "resnet50": resnet50,
    "resnext50_32x4d": resnext50_32x4d,
}
ARCHITECTURES: tuple[str, ...] = tuple(_ENCODERS)


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


def check_arch(arch: str) -> None:
    """Raise ValueError (naming the valid choices) unless `arch` is a network `build_network`
    makes. The one check of architecture names: the config validates `arch` through it."""
    if arch not in _ENCODERS:
        raise ValueError(
            f"unknown architecture {arch!r}; valid names are: {', '.join(ARCHITECTURES)}"
        )


def build_network(
    arch: str, num_classes: int, proj_dim: int, proj_hidden: int | None = None
) -> ICCLNet:
    """Build an :class:`ICCLNet` on one of :data:`ARCHITECTURES`."""
    check_arch(arch)
    return ICCLNet(_ENCODERS[arch](), num_classes, proj_dim, proj_hidden)


def load_torchvision_weights(net: ICCLNet, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Load a torchvision-format ResNet state dict into ``net``.

    Every encoder tensor must be present with the same shape, except BatchNorm
    ``num_batches_tracked`` counters, which older torchvision checkpoints lack (they
    are then left as they are). ``fc.weight`` / ``fc.bias`` go into the classifier
    when their shapes match it.

    Returns:
        The keys of ``state_dict`` that were not loaded, in their original order.

    Raises:
        ValueError: naming the encoder keys that are missing or shaped differently.
    """
    encoder_state = net.encoder.state_dict()
    missing = [
        k for k in encoder_state if k not in state_dict and not k.endswith("num_batches_tracked")
    ]
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)}, model {tuple(v.shape)}"
        for k, v in encoder_state.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    if missing or mismatched:
        lines = [f"missing: {k}" for k in missing] + [f"shape mismatch: {m}" for m in mismatched]
        raise ValueError(
            "checkpoint does not fit the encoder (is it for the same architecture?):\n  "
            + "\n  ".join(lines)
        )
    net.encoder.load_state_dict({k: state_dict[k] for k in encoder_state if k in state_dict},
                                strict=False)
    loaded = set(encoder_state)

    head = {"fc.weight": net.classifier.weight, "fc.bias": net.classifier.bias}
    if all(k in state_dict and state_dict[k].shape == p.shape for k, p in head.items()):
        net.classifier.load_state_dict({"weight": state_dict["fc.weight"],
                                        "bias": state_dict["fc.bias"]})
        loaded.update(head)
    return [k for k in state_dict if k not in loaded]
