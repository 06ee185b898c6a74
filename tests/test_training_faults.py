"""What goes wrong in training is visible and no work is lost: corrupt images reported, checkpoints
on time, stop signals save the current step, sane stage-2 losses in short runs (precise batch-norm
statistics), --seeds folders resumable and evaluable, progress from rank 0 only."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from helpers import K, make_converted, make_tiny_lt, random_images
from model.network import build_network
from pipeline.dataset import ShardedSplit
from tools.cli import main as cli
from train import checkpoint
from train.bn_stats import recompute_bn_stats
from train.config import resolve
from train.metrics import read as read_metrics
from train.runner import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_lt(tmp_path_factory.mktemp("tiny"))


def _cfg(data, method="iccl", **overrides):
    base = {"warmup_epochs": "1", "lr_steps": "1", "log_every": "1", "eval_batch_size": "16",
            "checkpoint_minutes": "10", "s2_epochs": "1"}
    base.update({k: str(v) for k, v in overrides.items()})
    return resolve("synthetic-lt", method, base, data=str(data), epochs=2, batch_size=16, loader="resident",
                   workers=0)


def _weights(path):
    return checkpoint.load(path)["net"]


# --- stage-2 losses: precise batch-norm statistics ----------------------------------------------
@pytest.mark.parametrize("method, finetune", [("iccl", False), ("iccl", True), ("ce", False)])
def test_a_short_runs_stage2_loss_stays_in_a_sane_range(tiny, tmp_path, method, finetune):
    """Before the batch-norm statistics were recomputed at the end of stage 1, this run's stage-2
    losses were 6-9 (and 400,000-560,000 for the 2-epoch demo): the evaluation-mode features of a
    2-epoch network were scaled by running averages that had seen 6 batches. A sane stage-2 loss
    is that of a classifier near chance or better: under 2 ln K."""
    run = tmp_path / "run"
    train(_cfg(tiny, method, s2_finetune_encoder=str(finetune).lower()), run)
    losses = [r["loss"] for r in read_metrics(run / "metrics.jsonl")
              if r["stage"] == "stage2" and "step" in r]
    assert len(losses) == 3 and max(losses) < 2 * math.log(K), losses


class _Loader(list):
    skipped = 0

    def load_state_dict(self, state):
        self.state = state


def test_precise_bn_is_the_average_of_the_last_epochs_batch_statistics():
    """recompute_bn_stats against a float64 reference for the first batch-norm layer: the mean
    over the epoch's batches of each batch's per-channel mean and unbiased variance."""
    torch.manual_seed(0)
    net = build_network("resnet32", 3, 8).double()
    batches = [torch.randn(6, 3, 8, 8, dtype=torch.float64) * (1 + i) + i for i in range(3)]
    loader = _Loader(batches)
    stage = SimpleNamespace(epochs=5, net=net, loader=lambda epoch: loader,
                            forward_inputs=lambda batch, epoch, step: [batch])
    ctx = SimpleNamespace(autocast=nullcontext, dist=SimpleNamespace(enabled=False))
    net.eval()
    recompute_bn_stats(ctx, stage)
    assert loader.state["epoch"] == 4 and not net.training
    with torch.no_grad():
        pre = [net.encoder.conv1(x) for x in batches]
    means = torch.stack([p.mean(dim=(0, 2, 3)) for p in pre]).mean(0)
    variances = torch.stack([p.var(dim=(0, 2, 3), unbiased=True) for p in pre]).mean(0)
    torch.testing.assert_close(net.encoder.bn1.running_mean, means, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(net.encoder.bn1.running_var, variances, rtol=1e-10, atol=1e-12)


def test_unfused_forward_is_refused_with_several_processes_before_anything_is_written(tiny, tmp_path,
                                                                                    monkeypatch):
    import train.context
    from pipeline.errors import DataError
    from train.config import resolve
    monkeypatch.setattr(train.context, "init_from_env", lambda device: SimpleNamespace(
        world_size=2, rank=0, enabled=True, is_main=True))
    cfg = resolve("synthetic-lt", "iccl", {"fused_forward": "false"}, data=str(tiny), batch_size=4)
    with pytest.raises(DataError, match="one process"):
        train.context.build_context(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    ce = resolve("synthetic-lt", "ce", {"fused_forward": "false"}, data=str(tiny), batch_size=4)
    train.context.build_context(ce, tmp_path / "ce").close()  # CE has one forward: nothing to refuse
    # The CIFAR rule (w^u = 0 after the warm-up): the clean forward records no graph, so it runs.
    rule = resolve("synthetic-lt", "iccl", {"fused_forward": "false", "w_u_zero_after_warmup": "true"},
                   data=str(tiny), batch_size=4)
    train.context.build_context(rule, tmp_path / "rule").close()


def test_precise_bn_sees_the_forwards_training_ran():
    """Stage1.forward_inputs: the warm-up's x_a; in the interpolative phase one fused [x_a; x_mix],
    or x_a and x_mix apart with fused_forward=false (batch statistics of each branch alone)."""
    from train.stage1 import Stage1
    x_a, x_mix = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    for fused, phase, expected in ((True, "warmup", [x_a]), (True, "iccl", [torch.cat([x_a, x_mix])]),
                                   (False, "iccl", [x_a, x_mix])):
        stage = SimpleNamespace(cfg=SimpleNamespace(fused_forward=fused), phase=lambda epoch, p=phase: p,
                                _inputs=lambda batch, e, s, p: (x_a, None if p == "warmup" else x_mix, None))
        got = Stage1.forward_inputs(stage, None, 0, 0)
        assert len(got) == len(expected) and all(torch.equal(g, e) for g, e in zip(got, expected))


# --- checkpoints on time, whatever the log interval ---------------------------------------------
@pytest.mark.parametrize("minutes, expected_mid_epoch", [("0.0000001", 4), ("10", 0)])
def test_checkpoint_minutes_is_honoured_whatever_log_every_is(tiny, tmp_path, monkeypatch, minutes,
                                                              expected_mid_epoch):
    """With log_every far beyond the epoch's 3 steps, a due checkpoint still comes after the very
    next step: 2 mid-epoch saves per stage-1 epoch (after steps 1 and 2; the epoch end saves the
    third), none when not due."""
    saved = []
    real = checkpoint.save

    def recording(path, state):
        if path.name == "checkpoint.pt" and state["stage"] == 1:
            saved.append((state["epoch"], state["step"]))
        real(path, state)
    monkeypatch.setattr(checkpoint, "save", recording)
    train(_cfg(tiny, log_every=1000, checkpoint_minutes=minutes), tmp_path / "run")
    mid = [s for s in saved if s[1] != 0]
    assert len(mid) == expected_mid_epoch and (expected_mid_epoch == 0 or mid == [(0, 1), (0, 2), (1, 1), (1, 2)])
    assert [s for s in saved if s[1] == 0] == [(1, 0), (2, 0)]  # every epoch end


# --- corrupt training images: said once, counted in report.json --------------------------------
def test_a_corrupt_training_image_is_said_once_and_counted_in_the_report(tmp_path, capfd):
    labels = np.arange(32) % K
    root = make_converted(tmp_path / "data", {"train": (random_images(32, 32, seed=3), labels),
                                              "test": (random_images(8, 32, seed=4), np.arange(8) % K)}, K)
    split = ShardedSplit(root, "train")
    row = split.index[5]
    path = split.shard_path(int(row["shard"]))
    data = bytearray(path.read_bytes())
    data[int(row["offset"]) + 20:int(row["offset"]) + int(row["size"])] = bytes(int(row["size"]) - 20)
    path.write_bytes(bytes(data))  # sample 5: a PNG whose data after the header is zeros
    cfg = resolve("synthetic-lt", "iccl", {"warmup_epochs": "1", "lr_steps": "1", "log_every": "1",
                                           "checkpoint_minutes": "10"},
                  data=str(root), epochs=2, batch_size=8, loader="reference", workers=0)
    report = train(cfg, tmp_path / "run")
    err = capfd.readouterr().err
    assert err.count("corrupt training image") == 1, err
    counts = report["corrupt_training_images"]
    assert counts["stage1"] >= 1 and set(counts) == {"stage1", "stage2"}
    assert json.loads((tmp_path / "run" / "report.json").read_text())["corrupt_training_images"] == counts


# --- stop signals ----------------------------------------------------------------------------------
def _train_cmd(data, out, *extra):
    return [sys.executable, "-m", "tools.cli", "train", "--preset", "synthetic-lt", "--data", str(data),
            "--out", str(out), "--epochs", "2", "--batch-size", "4", "--loader", "resident",
            "--workers", "0", "--set", "warmup_epochs=1", "--set", "lr_steps=1", "--set", "s2_epochs=1",
            "--set", "log_every=1", "--set", "eval_batch_size=16", *extra]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_mid_epoch_saves_that_step_and_the_rerun_is_exact(tiny, tmp_path, sig):
    """`iccl train` in a subprocess, sent SIGTERM / SIGINT in the middle of stage 1's first epoch
    (12 steps): it saves the step it was on and exits 130; the rerun resumes from that step and
    ends with bit-identical weights to an uninterrupted run."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(_train_cmd(tiny, tmp_path / "a"), cwd=ROOT, env=env, check=True, capture_output=True)
    run = tmp_path / "b"
    proc = subprocess.Popen(_train_cmd(tiny, run), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # wait for step 3 of the first epoch
        lines = read_metrics(run / "metrics.jsonl") if (run / "metrics.jsonl").is_file() else []
        if any(r.get("epoch") == 0 and r.get("step", 0) >= 3 for r in lines):
            break
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert f"{sig.name}: saved" in " ".join(err.split()) and "Traceback" not in err
    state = checkpoint.load(run / "checkpoint.pt")
    logged = [r for r in read_metrics(run / "metrics.jsonl") if "step" in r]
    assert (state["stage"], state["epoch"]) == (1, 0) and 3 <= state["step"] < 12
    assert state["step"] == logged[-1]["step"]  # the step it was on, not an earlier one
    done = subprocess.run(_train_cmd(tiny, run), cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"stage 1, epoch 1 of 2, step {state['step']}" in done.stderr  # one line: status lines never wrap
    for name in ("stage1.pt", "final.pt"):
        a, b = _weights(tmp_path / "a" / name), _weights(run / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_stop_signals_are_handled_only_inside_training():
    before = signal.getsignal(signal.SIGTERM)
    with checkpoint.stop_signals():
        assert checkpoint.stop_requested() is None
        os.kill(os.getpid(), signal.SIGTERM)  # requested, not fatal
        assert checkpoint.stop_requested() == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):  # a second signal stops at once
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is before and checkpoint.stop_requested() is None


# --- --seeds folders ---------------------------------------------------------------------------------
def test_a_seeds_folder_resumes_evaluates_and_has_a_summary(tiny, tmp_path, capsys, monkeypatch):
    out = tmp_path / "s"
    args = ["-q", "train", "--preset", "synthetic-lt", "--data", str(tiny), "--out", str(out),
            "--epochs", "2", "--batch-size", "16", "--loader", "resident", "--workers", "0",
            "--seeds", "0,1", "--set", "warmup_epochs=1", "--set", "s2_epochs=1", "--set", "lr_steps=1"]
    import train.runner
    real_train, calls = train.runner.train, []

    def interrupted_in_seed_1(cfg, run_dir):
        calls.append(cfg.seed)
        if cfg.seed == 1 and len(calls) == 2:
            raise KeyboardInterrupt  # the folder is left with seed 0 done, seed 1 not started
        return real_train(cfg, run_dir)
    monkeypatch.setattr(train.runner, "train", interrupted_in_seed_1)
    assert cli(args) == 130
    assert not (out / "summary.json").exists() and (out / "seed-0" / "final.pt").is_file()
    capsys.readouterr()
    assert cli(["-q", "train", "--out", str(out)]) == 0  # resumes the folder: seed 0 done, seed 1 trained
    assert calls == [0, 1, 0, 1]
    assert "n=2" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    reports = [json.loads((out / f"seed-{s}" / "report.json").read_text()) for s in (0, 1)]
    top1 = [r["stage2"]["top1"] for r in reports]
    assert summary["seeds"] == [0, 1] and summary["runs"] == ["seed-0", "seed-1"]
    assert summary["stage2"]["top1"] == pytest.approx(round(float(np.mean(top1)), 2))
    assert summary["stage2"]["top1_std"] == pytest.approx(round(float(np.std(top1, ddof=1)), 2))
    assert summary["per_seed"]["seed-1"]["stage2"]["top1"] == top1[1]
    result = tmp_path / "eval.json"
    assert cli(["-q", "eval", "--run", str(out), "--json", str(result)]) == 0
    assert "n=2" in capsys.readouterr().out
    assert json.loads(result.read_text())["mean"]["top1"] == summary["stage2"]["top1"]
    assert cli(["-q", "train", "--out", str(tmp_path / "nothing"), "--seeds", "0,1"]) == 2


# --- progress under torchrun ---------------------------------------------------------------------------
def test_only_rank_0_prints_progress_and_status(monkeypatch, capfd):
    from pipeline.progress import progress, say
    for rank, shown in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        say("status line")
        with progress(2, "work", every_s=0.0) as bar:
            bar.advance(2)
        err = capfd.readouterr().err
        assert ("status line" in err and "work: 2/2" in err) == shown, (rank, err)
        assert shown or err == ""
