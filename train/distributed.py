"""Process-group set-up for `torchrun` (one or many machines); nothing home-made.

`torchrun` sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; a plain `iccl train`
has none of them and runs as a single process without a process group.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_from_env(device: torch.device) -> DistInfo:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on CPU), if any.

    On CUDA the process's GPU (`device`, cuda:LOCAL_RANK from `pipeline.device.pick_device`) is
    made the current device BEFORE the group exists, and handed to it as `device_id`: otherwise
    every rank's current device is cuda:0, so NCCL's communicators, barrier tensors, pin-memory
    threads and FFCV's streams of all ranks land on GPU 0 (torch warns that this can hang), and
    `device_id` lets NCCL bind its communicator to the right GPU eagerly."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group(backend="nccl", device_id=device)
        else:
            dist.init_process_group(backend="gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def shutdown() -> None:
    """Leave the process group (NCCL frees its communicators and warns when a process exits
    without this). Safe without a group, and to call twice; a later `init_from_env` joins anew."""
    global _host_group
    if dist.is_initialized():
        dist.destroy_process_group()
    _host_group = None


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over processes in place (identity without a process group)."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


_host_group = None


def host_reduce(values: list[int], op: str = "max") -> list[int]:
    """Small integers reduced over processes ("max", or "sum"), unchanged without a process
    group: how every rank takes the same decision (checkpoint now, stop now) and counts agree.
    It goes through a gloo group on the host, so the device is never synchronised (tens of
    microseconds a call). Every rank must call it at the same point."""
    global _host_group
    if not dist.is_initialized():
        return list(values)
    if _host_group is None:
        _host_group = (dist.group.WORLD if dist.get_backend() == "gloo"
                       else dist.new_group(backend="gloo"))
    t = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=_host_group)
    return t.tolist()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
