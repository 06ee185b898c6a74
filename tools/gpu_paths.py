"""The GPU-only code paths, each run once on a CUDA machine by `tools/gpu_check.py`: every function
returns a one-line detail and raises (AssertionError, ...) when the path misbehaves."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
import time
from pathlib import Path

import torch


@contextlib.contextmanager
def no_tf32():
    """fp32 convolutions and matmuls in full precision inside the block (restored after): with
    TF32 (cuDNN's default for convolutions) two fp32 layouts differ by ~1e-3 relative, which
    would fail a 1e-3 comparison for no fault of channels_last."""
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    saved = conv.fp32_precision, matmul.fp32_precision
    conv.fp32_precision = matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        conv.fp32_precision, matmul.fp32_precision = saved


def dali_mixed(data: Path) -> str:
    from pipeline.dataset import ShardedSplit
    from pipeline.loaders import make_train_loader
    from pipeline.loaders.base import AugmentSpec
    split = ShardedSplit(data, "train")
    loader = make_train_loader(split, loader="dali", batch_size=64, class_aware_gamma=0.0,
                               augment=AugmentSpec(kind="rrc", size=224, jitter=0.4), seed=0,
                               device=torch.device("cuda"), workers=4, steps_per_epoch=2)
    batch = next(iter(loader))  # an unfinished pass, then two whole epochs on the same pipeline
    for epoch in (1, 2):
        loader.set_epoch(epoch)
        assert len(list(loader)) == 2
    builds = loader.pipeline_builds
    loader.close()
    assert builds == 1, f"{builds} pipelines built for 3 passes"
    assert batch.x_a.is_cuda and batch.x_a.dtype == torch.uint8 and batch.x_a.shape == (64, 3, 224, 224)
    assert batch.x_a.is_contiguous(memory_format=torch.channels_last)
    from pipeline.samplers import UniformSampler
    expected = split.labels[UniformSampler(len(split), 64, seed=0).batch(0, 0)]
    assert torch.equal(batch.y_a.cpu(), torch.as_tensor(expected))
    return (f"uint8 {tuple(batch.x_a.shape)} channels_last on {batch.x_a.device}, labels match the "
            f"sampler, jitter in torch, one pipeline for 3 passes")


def _step_loss(net, x, y, amp: bool):
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
        _, logits, _ = net(x)
        return torch.nn.functional.cross_entropy(logits.float(), y)


def bf16_autocast() -> str:
    from model.network import build_network
    torch.manual_seed(0)
    net = build_network("resnet50", 1000, 128).cuda()
    x, y = torch.randn(32, 3, 224, 224, device="cuda"), torch.randint(0, 1000, (32,), device="cuda")
    fp32, bf16 = _step_loss(net, x, y, False), _step_loss(net, x, y, True)
    bf16.backward()
    rel = abs(fp32.item() - bf16.item()) / abs(fp32.item())
    assert rel < 2e-2, rel
    return f"ResNet-50 loss fp32 {fp32.item():.4f} vs bf16 {bf16.item():.4f} (rel {rel:.1e}), backward ok"


def channels_last() -> str:
    from model.network import build_network
    torch.manual_seed(0)
    net = build_network("resnext50_32x4d", 1000, 128).cuda().eval()
    x = torch.randn(16, 3, 224, 224, device="cuda")
    with torch.no_grad(), no_tf32():
        a = net(x)[1]
        net = net.to(memory_format=torch.channels_last)
        b = net(x.contiguous(memory_format=torch.channels_last))[1]
    err = (a - b).abs().max().item() / a.abs().max().item()
    assert err < 1e-3, err
    return f"ResNeXt-50 fp32 logits NCHW vs channels_last, TF32 off: max rel diff {err:.1e}"


def compiled_step() -> str:
    from tools.bench_train import bench_context, random_batch
    from model.centroids import CentroidBank
    from train.config import resolve
    from train.runner import new_network, prepare
    from train.stage1 import Stage1
    results = {}
    for compile_ in (False, True):
        cfg = resolve("cifar10-lt", compile=compile_)  # wrap() compiles with dynamic=False
        cfg.warmup_epochs = 0
        ctx = bench_context(cfg, torch.device("cuda"))
        stage = Stage1(ctx, prepare(new_network(cfg, 10), ctx), CentroidBank(10, cfg.proj_dim).cuda())
        batch = random_batch(128, 32, 10, torch.device("cuda"))
        t = time.perf_counter()
        loss = stage.train_step(batch, 0, 0).item()
        results[compile_] = (loss, time.perf_counter() - t)
    (l0, _), (l1, tc) = results[False], results[True]
    assert abs(l0 - l1) / abs(l0) < 2e-2, (l0, l1)
    return f"first compiled step {tc:.1f} s; loss eager {l0:.4f} vs compiled {l1:.4f}"


def _nccl_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from model.centroids import CentroidBank
    from train.distributed import init_from_env, shutdown
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    device = torch.device("cuda", rank)
    if world > 1:
        init_from_env(device)  # the trainer's own set-up: bind the GPU, NCCL with device_id
    else:  # the trainer makes no group for one process; make one to run NCCL's set-up at least
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", rank=0, world_size=1, device_id=device)
    t = torch.full((4,), float(rank + 1), device="cuda")
    dist.all_reduce(t)
    bank = CentroidBank(10, 8).cuda()
    g = torch.Generator(device="cuda").manual_seed(rank)
    bank.update(torch.nn.functional.normalize(torch.randn(16, 8, device="cuda", generator=g), dim=1),
                torch.arange(16, device="cuda") % 10)
    lo, hi = bank.centroids.clone(), bank.centroids.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if rank == 0:
        Path(out).write_text(json.dumps({"sum": t[0].item(), "spread": (hi - lo).abs().max().item()}))
    shutdown()


def nccl() -> str:
    world = torch.cuda.device_count()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = Path(tempfile.mkdtemp()) / "nccl.json"
    torch.multiprocessing.spawn(_nccl_worker, args=(world, port, str(out)), nprocs=world)
    r = json.loads(out.read_text())
    assert r["sum"] == world * (world + 1) / 2 and r["spread"] == 0.0, r
    return nccl_detail(world)


def nccl_detail(world: int) -> str:
    if world == 1:
        return "1 GPU: one rank, proves nothing about communication (the NCCL set-up path ran)"
    return f"{world} GPUs: all_reduce ok, centroids identical on every rank"
