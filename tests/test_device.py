"""Device and autocast choice (pipeline/device.py): the one place that asks what the hardware can do."""
from __future__ import annotations

import pytest
import torch

from pipeline import device as dev
from pipeline.errors import DataError


@pytest.mark.parametrize("native, amp, want", [
    (True, "auto", torch.bfloat16),   # AVX512-BF16 / AMX: bf16 convolutions are native and faster
    (False, "auto", None),            # emulated bf16 is slower than fp32: stay in fp32
    (False, "bf16", torch.bfloat16),  # forced
    (True, "fp32", None),             # forced
])
def test_cpu_autocast_choice(monkeypatch, native, amp, want):
    monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda: native)
    assert dev.autocast_dtype(torch.device("cpu"), amp) is want


def test_cuda_autocast_is_bf16_unless_forced_off(monkeypatch):
    monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda: False)
    assert dev.autocast_dtype("cuda:0") is torch.bfloat16
    assert dev.autocast_dtype("cuda:0", "fp32") is None


def test_bad_amp_and_device_are_clear_errors():
    with pytest.raises(DataError, match="amp='fp16'"):
        dev.autocast_dtype("cpu", "fp16")
    with pytest.raises(DataError, match="not a device"):
        dev.pick_device("gpu0")


def test_bad_amp_in_config_names_the_choices():
    from train.config import resolve
    with pytest.raises(DataError, match="amp='half'.*auto, bf16, fp32"):
        resolve("cifar10-lt", overrides={"amp": "half"})
