"""Process-group set-up without a process group (train/distributed.py): on CUDA each rank binds its
GPU before the group exists and hands it over as `device_id`; the CPU (gloo) path is unchanged; the
group is left once when a command ends. The CUDA calls are recorded by mocks (no GPU needed)."""
from __future__ import annotations

import sys

import pytest
import torch

from train import distributed


@pytest.fixture
def calls(monkeypatch):
    """Record the torch.distributed / torch.cuda calls init_from_env makes, in order."""
    log = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kw: log.append(("init", kw)))
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: log.append(("set_device", d)))
    return log


def test_cuda_rank_binds_its_gpu_before_joining_and_passes_device_id(calls):
    gpu = torch.device("cuda", 1)
    info = distributed.init_from_env(gpu)
    assert calls == [("set_device", gpu), ("init", {"backend": "nccl", "device_id": gpu})]
    assert (info.rank, info.world_size, info.local_rank) == (1, 2, 1)


def test_cpu_rank_joins_gloo_without_touching_cuda(calls):
    info = distributed.init_from_env(torch.device("cpu"))
    assert calls == [("init", {"backend": "gloo"})]
    assert info.enabled and not info.is_main


def test_single_process_makes_no_group(calls, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.init_from_env(torch.device("cuda", 0)) == distributed.DistInfo()
    assert calls == []


def test_every_command_leaves_the_group_once(monkeypatch, tmp_path):
    from tools import cli
    left = []
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: not left)
    monkeypatch.setattr(distributed.dist, "destroy_process_group", lambda: left.append(1))
    assert "train.distributed" in sys.modules
    assert cli.main(["-q", "info", str(tmp_path / "missing")]) != 0  # ends with an error: still left
    assert left == [1]
    distributed.shutdown()  # a second call is harmless
    assert left == [1]
