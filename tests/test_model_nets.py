"""ResNet-32 and the ICCL network: sizes, forward contracts (library encoders: test_backbones.py)."""
import pytest
import torch
from torch import nn

from model import ICCLNet, build_network, resnet32
from model.resnet_cifar import _PadShortcut


def _count(*modules: nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


# --- parameter counts -------------------------------------------------------------------

def test_resnet32_parameter_count():
    # Counted by hand for the LDAM-DRW ResNet-32 (option-A shortcuts have no weights):
    #   stem conv 3*16*9 + BN 2*16                                   =     464
    #   stage 1: 5 x (2 convs 16*16*9 + 2 BNs 2*16)                  =  23,360
    #   stage 2: (16*32*9 + 32*32*9 + 2*64) + 4 x (2*32*32*9 + 2*64) =  88,192
    #   stage 3: (32*64*9 + 64*64*9 + 2*128) + 4 x (2*64*64*9 + 2*128) = 351,488
    #   encoder total 463,504; linear head 64*10 + 10 = 650  ->  464,154.
    # (LDAM-DRW's own head is a bias-free NormedLinear, which would give 464,144.)
    net = build_network("resnet32", 10, 64)
    assert _count(net.encoder) == 463_504
    assert _count(net.encoder, net.classifier) == 464_154


# --- forward contracts ------------------------------------------------------------------

def test_resnet32_forward_shapes_and_unit_embeddings():
    torch.manual_seed(0)
    net = build_network("resnet32", 10, 64).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        feats, logits, z = net(x)
        torch.testing.assert_close(net.forward_features(x), feats)
        torch.testing.assert_close(logits, net.classifier(feats))
    assert feats.shape == (4, 64) and logits.shape == (4, 10) and z.shape == (4, 64)
    assert net.encoder.out_dim == 64
    torch.testing.assert_close(z.norm(dim=1), torch.ones(4))


def test_channels_last_input_gives_the_same_output():
    torch.manual_seed(0)
    net = build_network("resnet32", 10, 32).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = net.forward_features(x)
        out = net.to(memory_format=torch.channels_last).forward_features(
            x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_option_a_shortcut_subsamples_and_zero_pads_channels():
    x = torch.randn(2, 16, 4, 4)
    out = _PadShortcut(8)(x)
    assert out.shape == (2, 32, 2, 2)
    torch.testing.assert_close(out[:, 8:24], x[:, :, ::2, ::2])
    assert torch.count_nonzero(out[:, :8]) == 0 and torch.count_nonzero(out[:, 24:]) == 0
    enc = resnet32()
    assert isinstance(enc.layer2[0].shortcut, _PadShortcut)
    assert isinstance(enc.layer1[0].shortcut, nn.Identity)


def test_projector_layout_and_hidden_width():
    net = ICCLNet(resnet32(), num_classes=7, proj_dim=16)
    kinds = [type(m) for m in net.projector]
    assert kinds == [nn.Linear, nn.ReLU, nn.Linear]
    assert net.projector[0].weight.shape == (64, 64)  # hidden defaults to the feature dim
    assert net.projector[2].weight.shape == (16, 64)
    net = build_network("resnet32", 7, 16, proj_hidden=32)
    assert net.projector[0].weight.shape == (32, 64)
    assert net.classifier.weight.shape == (7, 64)


def test_embedding_is_float32_and_unit_norm_under_bf16_autocast():
    torch.manual_seed(0)
    net = build_network("resnet32", 10, 64).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        _, logits, z = net(torch.randn(2, 3, 32, 32))
    assert logits.dtype == torch.bfloat16  # the rest of the network does run in bf16
    assert z.dtype == torch.float32
    torch.testing.assert_close(z.norm(dim=1), torch.ones(2), rtol=0, atol=1e-6)


def test_unknown_architecture_says_the_naming_rule():
    with pytest.raises(ValueError, match=r"'resnet19'.*resnet32, resnet18, .*timm:NAME"):
        build_network("resnet19", 10, 64)
