"""Encoders and the ICCL network: sizes, torchvision naming, forward contracts, weight loading."""
import pytest
import torch
from torch import nn

from model import ICCLNet, build_network, load_torchvision_weights, resnet32, resnet50
from model import resnext50_32x4d
from model.resnet_cifar import _PadShortcut


def _count(*modules: nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


@pytest.fixture(scope="module")
def net50():
    torch.manual_seed(0)
    return build_network("resnet50", 1000, 128)


@pytest.fixture(scope="module")
def netx50():
    torch.manual_seed(0)
    return build_network("resnext50_32x4d", 1000, 128)


# --- parameter counts -------------------------------------------------------------------

def test_resnet50_parameter_count_matches_torchvision(net50):
    # torchvision.models.resnet50(): 25,557,032 parameters including fc (2048 x 1000 + 1000).
    assert _count(net50.encoder, net50.classifier) == 25_557_032


def test_resnext50_parameter_count_matches_torchvision(netx50):
    # torchvision.models.resnext50_32x4d(): 25,028,904 parameters including fc.
    assert _count(netx50.encoder, netx50.classifier) == 25_028_904


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


# --- torchvision naming -----------------------------------------------------------------

def _torchvision_bottleneck_shapes(groups: int, width_per_group: int) -> dict:
    """Every encoder state-dict entry of torchvision's Bottleneck ResNet-50 family."""
    shapes = {"conv1.weight": (64, 3, 7, 7)}

    def bn(prefix, c):
        shapes.update({f"{prefix}.weight": (c,), f"{prefix}.bias": (c,),
                       f"{prefix}.running_mean": (c,), f"{prefix}.running_var": (c,),
                       f"{prefix}.num_batches_tracked": ()})

    bn("bn1", 64)
    inplanes = 64
    for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3)), start=1):
        width = planes * width_per_group // 64 * groups
        for b in range(blocks):
            p = f"layer{i}.{b}"
            shapes[f"{p}.conv1.weight"] = (width, inplanes, 1, 1)
            bn(f"{p}.bn1", width)
            shapes[f"{p}.conv2.weight"] = (width, width // groups, 3, 3)
            bn(f"{p}.bn2", width)
            shapes[f"{p}.conv3.weight"] = (planes * 4, width, 1, 1)
            bn(f"{p}.bn3", planes * 4)
            if b == 0:
                shapes[f"{p}.downsample.0.weight"] = (planes * 4, inplanes, 1, 1)
                bn(f"{p}.downsample.1", planes * 4)
            inplanes = planes * 4
    return shapes


@pytest.mark.parametrize("fixture, groups, width", [("net50", 1, 64), ("netx50", 32, 4)])
def test_state_dict_names_and_shapes_match_torchvision(fixture, groups, width, request):
    net = request.getfixturevalue(fixture)
    got = {k: tuple(v.shape) for k, v in net.encoder.state_dict().items()}
    expected = _torchvision_bottleneck_shapes(groups, width)
    assert len(got) == 318  # torchvision's 320 entries minus fc.weight and fc.bias
    assert got == expected


def test_spot_checked_shapes(net50, netx50):
    assert net50.encoder.state_dict()["layer3.5.conv2.weight"].shape == (256, 256, 3, 3)
    assert netx50.encoder.state_dict()["layer1.0.conv2.weight"].shape == (128, 4, 3, 3)
    assert netx50.encoder.layer1[0].conv2.groups == 32


def test_downsampling_stride_is_on_the_3x3_conv(net50):
    # torchvision's "v1.5" placement; param counts alone cannot tell it from v1.
    block = net50.encoder.layer2[0]
    assert block.conv1.stride == (1, 1)
    assert block.conv2.stride == (2, 2)
    assert block.downsample[0].stride == (2, 2)


def test_zero_init_residual():
    enc = resnet50(zero_init_residual=True)
    for name, p in enc.named_parameters():
        if name.endswith("bn3.weight"):
            assert torch.count_nonzero(p) == 0, name
        elif "bn" in name and name.endswith(".weight"):
            assert torch.all(p == 1), name
    assert all(torch.all(b.bn3.weight == 1) for b in resnext50_32x4d().layer1)


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


def test_bottleneck_forward_shapes(net50):
    net50.eval()
    with torch.no_grad():
        feats, logits, z = net50(torch.randn(2, 3, 64, 64))
    assert feats.shape == (2, 2048) and logits.shape == (2, 1000) and z.shape == (2, 128)
    assert net50.encoder.out_dim == 2048


@pytest.mark.parametrize("arch, size", [("resnet32", 32), ("resnext50_32x4d", 64)])
def test_channels_last_input_gives_the_same_output(arch, size):
    torch.manual_seed(0)
    net = build_network(arch, 10, 32).eval()
    x = torch.randn(2, 3, size, size)
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


def test_unknown_architecture_lists_valid_names():
    with pytest.raises(ValueError, match="resnet32, resnet50, resnext50_32x4d"):
        build_network("resnet18", 10, 64)


# --- loading torchvision checkpoints ----------------------------------------------------

def _torchvision_style_state(net: ICCLNet, num_classes: int) -> dict:
    """A state dict laid out as torchvision saves it, with fresh random values."""
    g = torch.Generator().manual_seed(1)
    state = {k: torch.randn(v.shape, generator=g) if v.is_floating_point() else v + 3
             for k, v in net.encoder.state_dict().items()}
    width = net.encoder.out_dim
    state["fc.weight"] = torch.randn(num_classes, width, generator=g)
    state["fc.bias"] = torch.randn(num_classes, generator=g)
    return state


def test_load_torchvision_weights_into_encoder_and_matching_classifier(net50):
    state = _torchvision_style_state(net50, 1000)
    assert load_torchvision_weights(net50, state) == []
    for k, v in net50.encoder.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert torch.equal(net50.classifier.weight, state["fc.weight"])
    assert torch.equal(net50.classifier.bias, state["fc.bias"])


def test_load_skips_classifier_of_other_size_and_unknown_keys():
    net = build_network("resnet32", 10, 64)
    state = _torchvision_style_state(net, 100)
    state["extra.buffer"] = torch.zeros(1)
    head_before = net.classifier.weight.clone()
    assert load_torchvision_weights(net, state) == ["fc.weight", "fc.bias", "extra.buffer"]
    assert torch.equal(net.classifier.weight, head_before)
    assert torch.equal(net.encoder.conv1.weight, state["conv1.weight"])


def test_load_accepts_checkpoints_without_num_batches_tracked():
    net = build_network("resnet32", 10, 64)
    state = {k: v for k, v in _torchvision_style_state(net, 10).items()
             if not k.endswith("num_batches_tracked")}
    assert load_torchvision_weights(net, state) == []
    assert torch.equal(net.encoder.bn1.running_var, state["bn1.running_var"])
    assert net.encoder.bn1.num_batches_tracked == 0


def test_load_rejects_missing_or_misshaped_encoder_keys():
    net = build_network("resnet32", 10, 64)
    state = _torchvision_style_state(net, 10)
    del state["layer2.1.conv1.weight"]
    with pytest.raises(ValueError, match=r"missing: layer2\.1\.conv1\.weight"):
        load_torchvision_weights(net, state)
    state = _torchvision_style_state(net, 10)
    state["bn1.weight"] = torch.ones(17)
    with pytest.raises(ValueError, match=r"shape mismatch: bn1\.weight: checkpoint \(17,\)"):
        load_torchvision_weights(net, state)
