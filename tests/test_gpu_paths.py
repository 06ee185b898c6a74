"""GPU-only branches checked on the CPU: pinned-memory uploads (pipeline/device.py) and static-shape
compilation (train/stage1.py `wrap`). The CUDA calls are recorded by stand-ins (no GPU needed)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pipeline.device import upload


class _Pinned:
    """What `pin_memory` returns in these tests: records the copy to the device."""

    def __init__(self, log):
        self.log = log

    def to(self, device, non_blocking=False):
        self.log.append(("to", device, non_blocking))
        return "on the device"


def test_upload_to_cuda_copies_from_pinned_memory_without_blocking(monkeypatch):
    log = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: log.append("pin") or _Pinned(log))
    assert upload(torch.arange(4), "cuda:1") == "on the device"
    assert log == ["pin", ("to", torch.device("cuda", 1), True)]


def test_upload_on_cpu_is_a_no_op(monkeypatch):
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: pytest.fail("pinned on the CPU"))
    t = torch.arange(4)
    assert upload(t, "cpu") is t


@pytest.mark.parametrize("loader", ["resident", "ffcv_pad_crop", "dali", "lambdas"])
def test_small_per_step_copies_go_through_upload(monkeypatch, loader):
    """Every per-step host -> device copy of crop parameters, labels, indices, factors and lambdas
    uses `upload` (so on CUDA it is pinned): the call sites, run on the CPU with a recording upload."""
    import pipeline.augment as augment
    calls = []

    def recording(host, dev):
        calls.append(tuple(host.shape))
        return host.to(dev)
    if loader == "ffcv_pad_crop":  # FFCV's pad-crop parameters
        monkeypatch.setattr(augment, "upload", recording)
        augment.pad_crop_flip(torch.zeros(5, 3, 8, 8, dtype=torch.uint8), 2,
                              augment.step_generator(0, 0, 0, 0, 0))
        assert calls == [(5, 3)]
    elif loader == "resident":
        import pipeline.loaders.resident as resident
        monkeypatch.setattr(resident, "upload", recording)
        fake = SimpleNamespace(augment=augment.AugmentSpec(kind="rrc", size=4, jitter=0.4), seed=0,
                               epoch=0, rank=0, height=8, width=8, device=torch.device("cpu"),
                               images=torch.zeros(3, 8, 8, 3, dtype=torch.uint8), labels=torch.arange(3))
        resident.ResidentLoader._stream(fake, torch.tensor([0, 2]).numpy(), 0, 0)
        assert calls == [(2, 6), (2, 3)]  # indices + boxes + flips, then the jitter factors
    elif loader == "dali":  # DALI's CPU outputs: labels, jitter factors (and CPU-decoded images)
        support = pytest.importorskip("pipeline.loaders.dali_support")
        from nvidia.dali.tensors import TensorListCPU
        monkeypatch.setattr(support, "upload", recording)
        out = support.to_torch(TensorListCPU(torch.arange(6.0).reshape(3, 2).numpy()), torch.device("cpu"))
        assert torch.equal(out, torch.arange(6.0).reshape(3, 2)) and calls == [(3, 2)]
    else:
        import train.context as context
        monkeypatch.setattr(context, "upload", recording)
        ctx = SimpleNamespace(cfg=SimpleNamespace(seed=0, alpha=1.0, alpha_b=1.0, lambda_per="sample"),
                              device=torch.device("cpu"),
                              dist=SimpleNamespace(rank=1, world_size=2))
        assert context.Context.lambdas(ctx, 0, 0, 4).shape == (4,)
        assert calls == [(4,)]


def test_compile_uses_static_shapes(monkeypatch):
    """The batch doubles when the warm-up ends: with dynamic=False torch compiles a second static
    graph instead of a dynamic-shape one."""
    from train import stage1
    seen = {}
    monkeypatch.setattr(torch, "compile", lambda module, **kw: seen.update(kw) or module)
    ctx = SimpleNamespace(dist=SimpleNamespace(enabled=False), cfg=SimpleNamespace(compile=True))
    net = torch.nn.Linear(2, 2)
    assert stage1.wrap(ctx, net) is net
    assert seen == {"dynamic": False}
