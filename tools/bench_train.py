"""`iccl bench train`: images per second of the stage-1 step, ours against a paper-codebase baseline.

Variants, measured in one run on the same model and the same inputs:
  naive       what a paper codebase does: mixing on the host in float32, two separate forward passes
              (uniform and interpolative), NCHW, no autocast, no compilation;
  fused       our step (train.stage1.Stage1.train_step): on-device mixing fused with normalisation,
              the preset's forwards (fused_forward: one over [x_a; x_mix], or one per branch), channels_last, autocast where it helps (bf16 on CUDA and
              on CPUs with native bf16 instructions, see pipeline.device), compiled with --compile;
  end-to-end  the fused step fed by the real loader (decode + augment + transfer included).
Warm-up steps are excluded (compilation time is reported on its own); CUDA is synchronised before the
clock is read. Utilisation = achieved FLOP/s (FLOPs of one step counted by torch's flop counter)
over the FLOP/s of a large matmul measured in the same run.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from pathlib import Path

import torch

from model.centroids import CentroidBank
from model.losses import (interpolative_ce, interpolative_centroid_contrastive, uniform_ce)
from pipeline.cpus import usable_cpus
from pipeline.device import autocast_dtype, pick_device
from pipeline.loaders.base import Batch
from pipeline.progress import progress
from train.config import resolve
from train.context import Context, build_context
from train.distributed import DistInfo
from train.metrics import MetricsLog
from train.runner import new_network, prepare
from train.stage1 import Stage1


VARIANTS = ("naive", "fused", "end-to-end")


def dtype_name(dtype: torch.dtype | None) -> str:
    """"bfloat16", ...; None (no autocast) is "float32"."""
    return str(dtype or torch.float32).removeprefix("torch.")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class NaiveStage1:
    """The baseline step: host-side float32 mixing, two forward passes, NCHW, fp32, eager."""

    def __init__(self, cfg, net, bank, device):
        self.cfg, self.net, self.bank, self.device = cfg, net, bank, device
        self.optimizer = torch.optim.SGD(net.parameters(), lr=cfg.scaled_lr(cfg.lr), momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay)
        mean = torch.tensor(cfg.mean).view(1, 3, 1, 1) * 255
        std = torch.tensor(cfg.std).view(1, 3, 1, 1) * 255
        self.mean, self.std = mean, std

    def loss(self, x_a_u8, y_a, x_c_u8, y_c, lam) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        xa = x_a_u8.cpu().float()
        xc = x_c_u8.cpu().float()
        l4 = lam.cpu().view(-1, 1, 1, 1)
        x_mix = ((l4 * xa + (1 - l4) * xc - self.mean) / self.std).contiguous().to(self.device)
        x_a = ((xa - self.mean) / self.std).contiguous().to(self.device)
        _, logits_a, z_a = self.net(x_a)
        _, logits_m, z_m = self.net(x_mix)
        c = self.bank.centroids
        loss = cfg.w_il * (interpolative_ce(logits_m, y_a, y_c, lam)
                           + interpolative_centroid_contrastive(z_m, c, y_a, y_c, lam, cfg.tau))
        if cfg.w_u_after_warmup:
            loss = loss + cfg.w_u_after_warmup * uniform_ce(logits_a, y_a)
        return loss, z_a

    def train_step(self, batch: Batch, lam: torch.Tensor) -> torch.Tensor:
        self.net.train()
        loss, z_a = self.loss(batch.x_a, batch.y_a, batch.x_c, batch.y_c, lam)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.bank.update(z_a.detach(), batch.y_a)
        return loss


def bench_context(cfg, device) -> Context:
    """A context without datasets, for the variants fed with ready-made batches."""
    return Context(cfg=cfg, run_dir=Path(tempfile.gettempdir()), device=device, dist=DistInfo(),
                   train=None, eval=None, metrics=MetricsLog(Path(os.devnull), enabled=False),
                   amp_dtype=autocast_dtype(device, cfg.amp))


def random_batch(n: int, size: int, num_classes: int, device, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x = lambda: torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g) \
        .permute(0, 3, 1, 2).to(device)  # NHWC storage viewed as NCHW: channels_last, as loaders give
    y = lambda: torch.randint(0, num_classes, (n,), generator=g).to(device)
    return Batch(x(), y(), x(), y())


def matmul_flops(device, dtype: torch.dtype | None = None, n: int = 2048, reps: int = 5) -> float:
    """FLOP/s of a large matmul in `dtype` (None: float32), the machine's practical peak for a step
    computing in that dtype."""
    a = torch.randn(n, n, device=device, dtype=dtype or torch.float32)
    b = torch.randn(n, n, device=device, dtype=dtype or torch.float32)
    a @ b
    best = float("inf")
    for _ in range(3):  # the best of three windows: a peak, not an average over interruptions
        sync(device)
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 * reps / best


def step_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def time_steps(fn, steps: int, warmup: int, device, task=None) -> tuple[float, float]:
    """(seconds per measured step, seconds of the warm-up steps)."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    sync(device)
    t1 = time.perf_counter()
    for _ in range(steps):
        fn()
        if task:
            task.advance(1)
    sync(device)
    return (time.perf_counter() - t1) / steps, t1 - t0


def run(preset: str, data: str | None, batch_size: int | None, steps: int, warmup: int,
        compile_: bool, device_name: str, variants: list[str], loader: str, workers: int,
        overrides: dict[str, str] | None = None) -> dict:
    device = pick_device(device_name)
    if device.type == "cpu":
        torch.set_num_threads(usable_cpus())
    cfg = resolve(preset, "iccl", overrides, batch_size=batch_size, compile=compile_, loader=loader,
                  workers=workers, data=data or "", device=device_name)
    cfg.warmup_epochs = 0  # measure the interpolative (two-stream) step, the one that dominates
    if "end-to-end" in variants and not data:
        raise_needs_data()
    ctx = build_context(cfg, Path(tempfile.mkdtemp()), with_eval=False) if data else bench_context(cfg, device)
    num_classes = ctx.train.num_classes if data else 100
    n = cfg.batch_size
    batch = random_batch(n, cfg.image_size, num_classes, device)
    lam = ctx.lambdas(0, 0, n)
    results = []
    fused_dtype = ctx.amp_dtype
    # Each variant is measured against the peak of the dtype its convolutions run in.
    peaks = {"naive": matmul_flops(device)}
    peaks["fused"] = peaks["end-to-end"] = matmul_flops(device, fused_dtype) if fused_dtype else peaks["naive"]

    # FLOPs per variant, counted on eager steps: they differ where a branch needs no backward (with
    # w^u = 0 the naive step never back-propagates its clean forward; one fused forward must,
    # because batch norm couples the two halves of its batch; the unfused one does not either).
    naive = NaiveStage1(cfg, new_network(cfg, num_classes).to(device),
                        CentroidBank(num_classes, cfg.proj_dim).to(device), device)
    eager = Stage1(bench_context(dataclasses.replace(cfg, compile=False), device),
                   prepare(new_network(cfg, num_classes), ctx), CentroidBank(num_classes, cfg.proj_dim).to(device))
    flops = {"naive": step_flops(lambda: naive.train_step(batch, lam)),
             "fused": step_flops(lambda: eager.train_step(batch, 0, 0))}
    flops["end-to-end"] = flops["fused"]

    def measure(name, step):
        with progress(steps, f"bench train: {name}", unit="steps") as task:
            per_step, warm_s = time_steps(step, steps, warmup, device, task)
        results.append({"variant": name, "images_per_s": 2 * n / per_step, "step_ms": 1000 * per_step,
                        "warmup_s": round(warm_s, 2), "batch_size": n, "images_per_step": 2 * n,
                        "flops_per_step": flops[name], "utilisation": flops[name] / per_step / peaks[name],
                        "dtype": dtype_name(fused_dtype if name != "naive" else None)})

    if "naive" in variants:
        measure("naive", lambda: naive.train_step(batch, lam))
    if "fused" in variants or "end-to-end" in variants:
        stage = Stage1(ctx, prepare(new_network(cfg, num_classes), ctx),
                       CentroidBank(num_classes, cfg.proj_dim).to(device))
        if "fused" in variants:
            measure("fused", lambda: stage.train_step(batch, 0, 0))
        if "end-to-end" in variants:
            it = _endless(ctx, cfg)
            measure("end-to-end", lambda: stage.train_step(next(it), 0, 0))
            ctx.close()
    base = next((r["images_per_s"] for r in results if r["variant"] == "naive"), None)
    for r in results:
        r["ratio_to_naive"] = r["images_per_s"] / base if base else None
    return {"results": results, "preset": preset, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "matmul_flops_per_s": {"float32": peaks["naive"], "autocast": peaks["fused"]},
            "autocast": dtype_name(fused_dtype), "w_u_after_warmup": cfg.w_u_after_warmup,
            "compile": cfg.compile, "threads": torch.get_num_threads(),
            "torch": torch.__version__}


def _endless(ctx, cfg):
    loader = ctx.train_loader(uniform=True, class_aware_gamma=cfg.gamma, batch_size=cfg.batch_size)
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def raise_needs_data():
    from pipeline.errors import DataError
    raise DataError("the end-to-end variant needs --data DIR (a converted dataset); "
                    "or choose --variants naive,fused")
