"""Run every GPU-only code path once on a CUDA machine, then both benchmarks; print one table.

    python3 tools/gpu_check.py [--out DIR] [--json FILE] [--quick]

Checks: DALI decoding on the GPU ("mixed") through our loader; bf16 autocast of a train step (loss
within tolerance of fp32); channels_last (same outputs as NCHW); torch.compile of the fused step
(compile time, same loss); NCCL all-reduce and the centroid gather with every visible GPU; then
`iccl bench pipeline` on ImageNet-size JPEGs and `iccl bench train` (naive / fused / end-to-end).
Each check reports ok / FAIL with its detail instead of stopping the script. Takes a few minutes.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a plain checkout

import torch  # noqa: E402


def _check(rows: list, name: str, fn) -> None:
    t = time.perf_counter()
    try:
        detail = fn()
        rows.append((name, "ok", detail, time.perf_counter() - t))
    except Exception as e:  # a failed check is a result to show, not a reason to stop
        rows.append((name, "FAIL", f"{type(e).__name__}: {e}"[:300], time.perf_counter() - t))
        traceback.print_exc()


def dali_mixed(data: Path) -> str:
    from pipeline.dataset import ShardedSplit
    from pipeline.loaders import make_train_loader
    from pipeline.loaders.base import AugmentSpec
    split = ShardedSplit(data, "train")
    loader = make_train_loader(split, loader="dali", batch_size=64, class_aware_gamma=0.0,
                               augment=AugmentSpec(kind="rrc", size=224, jitter=0.4), seed=0,
                               device=torch.device("cuda"), workers=4)
    batch = next(iter(loader))
    loader.close()
    assert batch.x_a.is_cuda and batch.x_a.dtype == torch.uint8 and batch.x_a.shape == (64, 3, 224, 224)
    assert batch.x_a.is_contiguous(memory_format=torch.channels_last)
    from pipeline.samplers import UniformSampler
    expected = split.labels[UniformSampler(len(split), 64, seed=0).batch(0, 0)]
    assert torch.equal(batch.y_a.cpu(), torch.as_tensor(expected))
    return f"uint8 {tuple(batch.x_a.shape)} channels_last on {batch.x_a.device}, labels match the sampler"


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
    with torch.no_grad():
        a = net(x)[1]
        net = net.to(memory_format=torch.channels_last)
        b = net(x.contiguous(memory_format=torch.channels_last))[1]
    err = (a - b).abs().max().item() / a.abs().max().item()
    assert err < 1e-3, err
    return f"ResNeXt-50 logits NCHW vs channels_last: max rel diff {err:.1e}"


def compiled_step() -> str:
    from tools.bench_train import bench_context, random_batch
    from model.centroids import CentroidBank
    from train.config import resolve
    from train.runner import new_network, prepare
    from train.stage1 import Stage1
    results = {}
    for compile_ in (False, True):
        cfg = resolve("cifar10-lt", compile=compile_)
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
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
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
    dist.destroy_process_group()


def nccl() -> str:
    world = torch.cuda.device_count()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = Path(tempfile.mkdtemp()) / "nccl.json"
    torch.multiprocessing.spawn(_nccl_worker, args=(world, port, str(out)), nprocs=world)
    r = json.loads(out.read_text())
    assert r["sum"] == world * (world + 1) / 2 and r["spread"] == 0.0, r
    return f"{world} GPU(s): all_reduce ok, centroids identical on every rank"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "iccl-gpu-check")
    ap.add_argument("--json", type=Path, help="write the table and both benchmark reports here")
    ap.add_argument("--quick", action="store_true", help="smaller benchmarks (fewer images and steps)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this script checks the GPU paths and needs a GPU", file=sys.stderr)
        return 2
    from tools import bench_pipeline, bench_train
    from tools.bench_data import make_bench_data
    images = 512 if args.quick else 2000
    photos = args.out / f"photos-{images}"
    make_bench_data(photos, images=images)
    rows: list = []
    reports: dict = {}
    _check(rows, "DALI mixed decode", lambda: dali_mixed(photos))
    _check(rows, "bf16 autocast", bf16_autocast)
    _check(rows, "channels_last", channels_last)
    _check(rows, "torch.compile", compiled_step)
    _check(rows, "NCCL", nccl)

    def pipeline() -> str:
        r = bench_pipeline.run(photos, steps=10 if args.quick else 30, warmup=3, batch_size=128)
        reports["pipeline"] = r
        return "; ".join(f"{x['loader']} {x['images_per_s']:,.0f}/s" for x in r["results"] if x["images_per_s"]) \
            + f"; CPU decode ceiling {r['decode_ceiling_images_per_s']:,.0f}/s"

    def train() -> str:
        demo = args.out / "cifar-size"
        make_bench_data(demo, images=10000, tiny=True)
        r = bench_train.run("cifar10-lt", str(demo), 256, 10 if args.quick else 30, 5, False, "cuda",
                            ["naive", "fused", "end-to-end"], "auto", 4)
        reports["train"] = r
        return "; ".join(f"{x['variant']} {x['images_per_s']:,.0f}/s (x{x['ratio_to_naive']:.2f})"
                         for x in r["results"])

    _check(rows, "bench pipeline (ImageNet-size JPEG)", pipeline)
    _check(rows, "bench train (ResNet-32, batch 256)", train)

    from rich.console import Console
    from rich.table import Table
    table = Table(title=f"GPU check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    for c in ("check", "result", "detail", "s"):
        table.add_column(c)
    for name, status, detail, secs in rows:
        table.add_row(name, status, detail, f"{secs:.1f}")
    Console(width=200).print(table)
    if args.json:
        args.json.write_text(json.dumps({"checks": rows, "reports": reports}, indent=1, default=str))
    return 0 if all(r[1] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
