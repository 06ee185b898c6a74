"""Device selection, in one place: which device trains, and which autocast dtype it uses.

Every other module receives a `torch.device` from here and never asks CUDA questions itself.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from pipeline.errors import DataError


def pick_device(requested: str = "auto") -> torch.device:
    """"auto": this process's GPU (cuda:LOCAL_RANK, as set by torchrun) when CUDA is available,
    else the CPU. "cpu", "cuda" or "cuda:N" are taken as asked, with a clear error when CUDA is
    asked for but absent."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as e:
        raise DataError(f"--device {requested!r}: not a device ({e}); use auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DataError(f"--device {requested}: CUDA is not available on this machine "
                            f"(no GPU, or a CPU-only PyTorch build); use --device cpu or auto")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        elif device.index >= torch.cuda.device_count():
            raise DataError(f"--device {requested}: only {torch.cuda.device_count()} GPU(s) visible")
    elif device.type != "cpu":
        raise DataError(f"--device {requested}: unsupported; use auto, cpu, cuda or cuda:N")
    return device


def is_cuda(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda"


def upload(host: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A small host tensor (a step's labels, indices, crop or jitter parameters) on `device`
    without stalling the host: `non_blocking` copies are asynchronous only from pinned memory (a
    pageable source may synchronise with the GPU's queue), so on CUDA the tensor is first copied
    into PyTorch's caching pinned-host allocator (cheap when repeated). On the CPU: the tensor
    itself, no copy."""
    device = torch.device(device)
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


AMP_MODES = ("auto", "bf16", "fp32")


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: oneDNN then runs bf16 convolutions natively, about twice as fast as fp32
    (ResNet-32 step, measured). Without them it emulates bf16 and is several times slower than fp32."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def autocast_dtype(device: torch.device | str, amp: str = "auto") -> Optional[torch.dtype]:
    """The autocast dtype, None for plain fp32. "auto": bf16 on CUDA, and on a CPU with native bf16
    instructions (see cpu_has_native_bf16); fp32 elsewhere. "bf16" / "fp32" force the choice."""
    if amp not in AMP_MODES:
        raise DataError(f"amp={amp!r}: choose one of {', '.join(AMP_MODES)}")
    if amp == "fp32":
        return None
    if amp == "bf16" or is_cuda(device) or cpu_has_native_bf16():
        return torch.bfloat16
    return None
