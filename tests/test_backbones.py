"""Encoders from torchvision and timm, and local weights files loaded into them."""
from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

from model import ARCHITECTURES, build_network, check_arch, load_pretrained


def _library(name: str):
    """The module, or a skip: a torchvision built for another torch fails with RuntimeError."""
    try:
        return importlib.import_module(name)
    except Exception as e:
        pytest.skip(f"{name} is not importable here ({type(e).__name__}: {e})")


def _count(*modules: nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


# --- names --------------------------------------------------------------------------------

def test_architectures_and_the_naming_rule():
    assert ARCHITECTURES[0] == "resnet32" and {"resnet18", "resnet50", "resnext50_32x4d"} <= set(ARCHITECTURES)
    for name in ARCHITECTURES:
        check_arch(name)  # plain names need no library to be checked
    with pytest.raises(ValueError, match=r"unknown architecture 'vgg16': use one of resnet32, .*timm:NAME"):
        check_arch("vgg16")


def test_timm_names_are_checked_against_timm():
    _library("timm")
    check_arch("timm:convnext_atto")
    with pytest.raises(ValueError, match=r"unknown timm model 'convnext_nonesuch'.*close names: .*convnext"):
        check_arch("timm:convnext_nonesuch")


# --- torchvision ----------------------------------------------------------------------------

@pytest.mark.parametrize("arch, params", [
    # torchvision's own totals with the 1000-way fc (2048 x 1000 + 1000 = 2,049,000 for these two):
    ("resnet50", 25_557_032), ("resnext50_32x4d", 25_028_904)])
def test_torchvision_encoders_match_torchvision(arch, params):
    models = _library("torchvision.models")
    net = build_network(arch, 1000, 128)
    assert net.encoder.out_dim == 2048 and isinstance(net.encoder.fc, nn.Identity)
    assert _count(net.encoder, net.classifier) == params
    reference = models.get_model(arch, weights=None)
    expected = {k: v.shape for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    assert {k: v.shape for k, v in net.encoder.state_dict().items()} == expected


def test_torchvision_forward_shapes_and_unit_embeddings():
    _library("torchvision")
    torch.manual_seed(0)
    net = build_network("resnet18", 7, 32).eval()
    with torch.no_grad():
        feats, logits, z = net(torch.randn(2, 3, 64, 64))
    assert feats.shape == (2, 512) and logits.shape == (2, 7) and z.shape == (2, 32)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(2))


# --- timm -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name, width", [
    ("convnext_atto", 320),
    ("mobilenetv3_small_050", 1024),  # a pre-logits layer: 288 channels pooled, then 1024 out
])
def test_timm_encoders_give_timm_pooled_features(name, width):
    timm = _library("timm")
    torch.manual_seed(0)
    net = build_network(f"timm:{name}", 5, 16).eval()
    assert net.encoder.out_dim == width
    x = torch.randn(2, 3, 64, 64)
    reference = timm.create_model(name, pretrained=False, num_classes=0).eval()
    reference.load_state_dict(net.encoder.state_dict())
    with torch.no_grad():
        feats, logits, _ = net(x)
        torch.testing.assert_close(feats, reference(x))  # exactly timm's features, no head of its own
    assert feats.shape == (2, width) and logits.shape == (2, 5)


@pytest.mark.parametrize("arch", ["resnet18", "timm:convnext_atto"])
def test_channels_last_and_bf16_autocast_forward_backward(arch):
    """The trainer's setting: channels_last weights and inputs, bf16 autocast, a backward pass."""
    _library("timm" if arch.startswith("timm:") else "torchvision")
    torch.manual_seed(0)
    net = build_network(arch, 4, 16)
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        ref = net.eval().forward_features(x)
    net = net.to(memory_format=torch.channels_last).train()
    xl = x.to(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(net.eval().forward_features(xl), ref, rtol=1e-4, atol=1e-4)
    net.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats, logits, z = net(xl)
        loss = nn.functional.cross_entropy(logits.float(), torch.tensor([0, 1, 2, 3])) + z.sum()
    assert logits.dtype == torch.bfloat16 and z.dtype == torch.float32
    loss.backward()
    grads = [p.grad for p in net.encoder.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


# --- local weights files ----------------------------------------------------------------------

def test_torchvision_pth_loads_into_the_encoder_and_never_the_classifier(tmp_path):
    models = _library("torchvision.models")
    torch.manual_seed(1)
    source = models.resnet18(weights=None, num_classes=1000)
    for m in source.modules():  # non-default statistics, so that loading them is visible
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    torch.manual_seed(2)
    net = build_network("resnet18", 10, 32)
    head = net.classifier.weight.clone()
    report = load_pretrained(net.encoder, path)
    saved = torch.load(path, weights_only=True)
    for k, v in net.encoder.state_dict().items():
        assert torch.equal(v, saved[k]), k
    assert torch.equal(net.classifier.weight, head)
    assert report["missing"] == [] and report["unexpected"] == ["fc.weight", "fc.bias"]
    assert report["loaded"] == len(net.encoder.state_dict())


def test_timm_safetensors_and_nested_pth_load(tmp_path):
    timm = _library("timm")
    from safetensors.torch import save_file

    torch.manual_seed(3)
    source = timm.create_model("convnext_atto", pretrained=False, num_classes=1000)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, tmp_path / "model.safetensors")
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "ckpt.pth")
    for name in ("model.safetensors", "ckpt.pth"):
        torch.manual_seed(4)
        net = build_network("timm:convnext_atto", 6, 16)
        report = load_pretrained(net.encoder, tmp_path / name)
        for k, v in net.encoder.state_dict().items():
            assert torch.equal(v, state[k]), (name, k)
        assert report["missing"] == [] and sorted(report["unexpected"]) == ["head.fc.bias", "head.fc.weight"]


def test_nothing_is_downloaded_and_wrong_files_are_named(tmp_path):
    net = build_network("resnet32", 10, 16)
    for value in ("imagenet", "https://example.org/resnet50.pth", "hf-hub:timm/resnet50.a1_in1k",
                  str(tmp_path / "absent.pth")):
        with pytest.raises(ValueError, match="not a local file. Nothing is downloaded"):
            load_pretrained(net.encoder, value)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable weights file"):
        load_pretrained(net.encoder, tmp_path / "junk.pth")
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"other shapes .*conv1\.weight: file \(64, 3, 7, 7\), model \(16, 3, 3, 3\)"):
        load_pretrained(net.encoder, tmp_path / "other.pth")
    torch.save({"features.0.weight": torch.zeros(3)}, tmp_path / "vgg.pth")
    with pytest.raises(ValueError, match="none of its 1 tensors names an encoder tensor"):
        load_pretrained(net.encoder, tmp_path / "vgg.pth")


def test_weights_of_a_deeper_relative_and_unreadable_files_are_refused_in_one_line(tmp_path, monkeypatch):
    net = build_network("resnet32", 10, 16)
    own = net.encoder.state_dict()
    # resnet34 weights for resnet18 fit every tensor of the smaller net and add blocks it lacks
    torch.save({**own, "layer3.5.conv1.weight": torch.zeros(64, 64, 3, 3), "fc.weight": torch.zeros(1, 64)},
               tmp_path / "deeper.pth")
    with pytest.raises(ValueError, match=r"1 of its tensors are not in this encoder nor a classifier head "
                                         r"\(e\.g\. layer3\.5\.conv1\.weight\): the file is for another"):
        load_pretrained(net.encoder, tmp_path / "deeper.pth")
    (tmp_path / "notes.pth").write_text("plain text\n" * 3)
    with pytest.raises(ValueError) as e:
        load_pretrained(net.encoder, tmp_path / "notes.pth")
    assert "not a readable weights file" in str(e.value) and "\n" not in str(e.value)
    torch.save(own, tmp_path / "mine.pth")  # `--set pretrained=~/...`: no shell expands that `~`
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_pretrained(net.encoder, "~/mine.pth")["loaded"] == len(own)
