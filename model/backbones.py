"""Encoders by name: the CIFAR ResNet-32 of this project, torchvision's ResNets, any timm model.

Naming rule (the `arch` setting):
    resnet32            the CIFAR ResNet-32 of the LDAM-DRW line (neither library has it)
    a TORCHVISION name  torchvision's model of that name (`torchvision.models.get_model`), with
                        its `fc` replaced by `nn.Identity`: (N, 3, H, W) -> pooled (N, C) features
    timm:NAME           timm's model NAME (`timm.create_model(NAME, pretrained=False,
                        num_classes=0)`: timm's own pooled, pre-classifier features)

Every encoder carries `out_dim`, the width of its features. Weights are never downloaded here:
all models are built with random initial weights; `model.pretrained` loads a local file. torchvision
and timm are imported only when such an encoder is asked for, so ResNet-32 runs need neither.
"""
from __future__ import annotations

from torch import nn

from .resnet_cifar import resnet32

__all__ = ["ARCHITECTURES", "TIMM_PREFIX", "TORCHVISION_ARCHS", "build_encoder", "check_arch"]

TIMM_PREFIX = "timm:"
# torchvision's classification models whose classifier is one `fc` layer on pooled features: the
# ResNet family. torchvision's other families are reachable through timm, under the same names.
TORCHVISION_ARCHS: tuple[str, ...] = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2",
)
# Every plain (prefix-free) name; with "timm:NAME" these are all the values `arch` takes.
ARCHITECTURES: tuple[str, ...] = ("resnet32", *TORCHVISION_ARCHS)


def check_arch(name: str) -> None:
    """Raise ValueError (saying the naming rule) unless `name` is an encoder `build_encoder` makes.

    A "timm:NAME" is checked against `timm.list_models()` (which imports timm).
    """
    rule = (f"use one of {', '.join(ARCHITECTURES)}, or timm:NAME with NAME any model of "
            f"`timm.list_models()` (e.g. timm:convnext_tiny, timm:resnet50)")
    if name in ARCHITECTURES:
        return
    if not name.startswith(TIMM_PREFIX):
        raise ValueError(f"unknown architecture {name!r}: {rule}")
    timm = _import("timm")
    model = name[len(TIMM_PREFIX):]
    if not timm.is_model(model):
        close = timm.list_models(f"*{model.split('.')[0][:6]}*")[:8]
        hint = f" (close names: {', '.join(close)})" if close else ""
        raise ValueError(f"unknown timm model {model!r}{hint}: {rule}")


def build_encoder(name: str) -> nn.Module:
    """A freshly initialised encoder for `name` (see the module docstring), with `out_dim` set.

    Raises:
        ValueError: an unknown name, or torchvision / timm not importable for a name that needs it.
    """
    check_arch(name)
    if name == "resnet32":
        return resnet32()
    if name.startswith(TIMM_PREFIX):
        timm = _import("timm")
        net = timm.create_model(name[len(TIMM_PREFIX):], pretrained=False, num_classes=0)
        # The width of what forward() returns without a classifier: `head_hidden_size` where a
        # model has a pre-logits layer (e.g. MobileNetV3: 288 channels, 1024 out), else num_features.
        net.out_dim = int(getattr(net, "head_hidden_size", None) or net.num_features)
        return net
    models = _import("torchvision.models")
    net = models.get_model(name, weights=None)
    net.out_dim = int(net.fc.in_features)
    net.fc = nn.Identity()
    return net


def _import(module: str):
    """Import torchvision / timm lazily, turning a broken install into one clear ValueError."""
    import importlib

    try:
        return importlib.import_module(module)
    except Exception as e:  # a torchvision built for another torch fails with RuntimeError, not ImportError
        raise ValueError(
            f"{module.split('.')[0]} is needed for this architecture but cannot be imported "
            f"({type(e).__name__}: {e}). Run `bash tools/setup.sh`, which installs the torchvision "
            f"and timm releases that match your torch.") from None
