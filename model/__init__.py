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
from .network import ARCHITECTURES, ICCLNet, build_network, load_torchvision_weights
from .resnet import resnet50, resnext50_32x4d
from .resnet_cifar import resnet32

__all__ = [
    "ARCHITECTURES",
    "CentroidBank",
    "ICCLNet",
    "build_network",
    "centroid_contrastive",
    "centroid_logits",
    "distillation_loss",
    "interpolative_centroid_contrastive",
    "interpolative_ce",
    "load_torchvision_weights",
    "resnet32",
    "resnet50",
    "resnext50_32x4d",
    "uniform_ce",
]
