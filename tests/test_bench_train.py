"""`iccl bench train`: the naive baseline and our fused step compute the same loss on the same inputs,
and the benchmark reports its schema."""
from __future__ import annotations

import json

import pytest
import torch

from model.centroids import CentroidBank
from tools.bench_train import NaiveStage1, bench_context, random_batch
from train.config import resolve
from train.runner import new_network, prepare
from train.steps import LossWeights, stage1_loss


def losses(amp: str) -> tuple[float, float]:
    """(naive loss, fused loss) on the same inputs, the fused one under `amp`."""
    cfg = resolve("cifar10-lt", overrides={"w_u": "0.5", "w_u_zero_after_warmup": "false",
                                                "amp": amp})
    device = torch.device("cpu")
    ctx = bench_context(cfg, device)
    batch = random_batch(8, 32, 10, device, seed=3)
    lam = ctx.lambdas(0, 0, 8)
    bank = CentroidBank(10, cfg.proj_dim)
    bank.update(torch.nn.functional.normalize(torch.randn(40, cfg.proj_dim), dim=1), torch.arange(40) % 10)
    net = new_network(cfg, 10).eval()
    naive = NaiveStage1(cfg, net, bank, device)
    with torch.no_grad():
        want, _ = naive.loss(batch.x_a, batch.y_a, batch.x_c, batch.y_c, lam)
        fused_net = prepare(new_network(cfg, 10), ctx).eval()  # same seed: same weights, channels_last
        x_a, x_mix = ctx.mix(batch.x_a, batch.x_c, lam)
        with ctx.autocast():
            got, _ = stage1_loss(fused_net, bank.centroids, "iccl", x_a, batch.y_a, x_mix, batch.y_c, lam,
                                 LossWeights(w_u=0.5, w_il=cfg.w_il, tau=cfg.tau))
    return want.item(), got.item()


def test_naive_and_fused_losses_are_identical():
    """Batch norm in eval mode (running statistics): then one fused forward over [x_a; x_mix] and two
    separate forwards are the same computation, and host float32 mixing equals the on-device one."""
    want, got = losses("fp32")
    assert got == pytest.approx(want, rel=1e-5)


def test_bf16_autocast_loss_is_close_to_fp32():
    """The fused step under bf16 autocast (the default on CUDA and on CPUs with native bf16): bf16 keeps
    8 bits of mantissa, so a loss of ~O(1) summed over a few hundred logits stays within 2%."""
    want, got = losses("bf16")
    assert got != want  # autocast really ran in bf16
    assert got == pytest.approx(want, rel=2e-2)


@pytest.mark.slow
def test_bench_train_cli_json(tmp_path):
    from tools.cli import main
    out = tmp_path / "b.json"
    import numpy as np
    from helpers import make_converted, random_images
    data = make_converted(tmp_path / "d", {"train": (random_images(64, 32), np.arange(64) % 4)}, 4)
    assert main(["-q", "bench", "train", "--preset", "synthetic-lt", "--data", str(data), "--batch-size", "16",
                 "--steps", "2", "--warmup", "1", "--loader", "reference", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["variant"] for r in report["results"]] == ["naive", "fused", "end-to-end"]
    for r in report["results"]:
        assert r["images_per_s"] > 0 and r["ratio_to_naive"] > 0 and 0 < r["utilisation"]
    assert report["results"][0]["dtype"] == "float32"  # the baseline never autocasts
    assert {r["dtype"] for r in report["results"][1:]} == {report["autocast"] or "float32"}
