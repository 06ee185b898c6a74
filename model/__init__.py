"""Networks, centroid bank and losses for ICCL (interpolative centroid contrastive learning)."""
from .centroids import CentroidBank
from .losses import (
    centroid_contrastive,
    centroid_logits,
    distillation_loss,
    interpolative_centroid_contrastive,
    interpolative_ce,
    uniform_ce,
)
from .network import ARCHITECTURES, ICCLNet, build_network, check_arch
from .pretrained import load_pretrained
from .resnet_cifar import resnet32

__all__ = [
    "ARCHITECTURES",
    "CentroidBank",
    "ICCLNet",
    "build_network",
    "check_arch",
    "centroid_contrastive",
    "centroid_logits",
    "distillation_loss",
    "interpolative_centroid_contrastive",
    "interpolative_ce",
    "load_pretrained",
    "resnet32",
    "uniform_ce",
]
