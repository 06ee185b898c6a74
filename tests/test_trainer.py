"""The two-stage trainer end to end on a tiny dataset: files, report, exact resume, NaN guard,
clear errors. (Learning quality is checked by the demo test and the CIFAR protocol.)"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import K, make_converted, make_tiny_lt, random_images
from pipeline.errors import DataError
from tools.cli import main as cli
from train import checkpoint
from train.config import resolve
from train.loop import TrainingDiverged
from train.runner import evaluate_run, train



@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_lt(tmp_path_factory.mktemp("tiny"))


def _cfg(data, **kw):
    base = dict(data=str(data), epochs=2, warmup_epochs=1, batch_size=16, s2_epochs=1, loader="resident",
                workers=0, log_every=1, eval_batch_size=16)
    overrides = {"lr_warmup_epochs": "0", "lr_steps": "1", "checkpoint_minutes": "0"}
    overrides.update(kw.pop("overrides", {}))
    base.update(kw)
    return resolve("synthetic-lt", base.pop("method", "iccl"), overrides, **base)


def _weights(path):
    return checkpoint.load(path)["net"]


def test_full_run_writes_a_complete_run_directory(tiny, tmp_path):
    report = train(_cfg(tiny), tmp_path / "run")
    for stage in ("stage1", "stage2"):
        assert set(report[stage]) >= {"top1", "many", "medium", "few", "per_class"}
        assert report[stage]["num_samples"] == 16
    for name in ("config.json", "checkpoint.pt", "stage1.pt", "final.pt", "report.json", "metrics.jsonl"):
        assert (tmp_path / "run" / name).is_file(), name
    for name in ("checkpoint.pt", "stage1.pt", "final.pt"):  # loadable without unpickling code
        torch.load(tmp_path / "run" / name, weights_only=True)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in lines} == {"stage1", "stage2"}
    assert all(np.isfinite(r["loss"]) for r in lines if "loss" in r)
    # stage 1 centroids: unit rows for the classes seen
    c = checkpoint.load(tmp_path / "run" / "stage1.pt")
    assert "net" in c and c["num_classes"] == K
    # iccl eval on the saved model reproduces the report
    again = evaluate_run(tmp_path / "run")
    assert again["top1"] == pytest.approx(report["stage2"]["top1"])
    # a finished run resumes to "done" without training again
    assert train(_cfg(tiny), tmp_path / "run")["stage2"]["top1"] == pytest.approx(report["stage2"]["top1"])


@pytest.mark.parametrize("method", ["iccl", "ce"])
def test_resume_mid_epoch_is_exact(tiny, tmp_path, monkeypatch, method):
    """A run killed in the middle of an epoch (in either stage) and resumed ends with exactly the
    weights of an uninterrupted run."""
    train(_cfg(tiny, method=method), tmp_path / "a")
    from train.stage1 import Stage1
    from train.stage2 import Stage2
    for cls, crash_at in ((Stage1, (1, 1)), (Stage2, (0, 1))):
        original = cls.train_step

        def crashing(self, batch, epoch, step, _orig=original, _at=crash_at):
            if (epoch, step) == _at:
                raise KeyboardInterrupt
            return _orig(self, batch, epoch, step)

        monkeypatch.setattr(cls, "train_step", crashing)
        with pytest.raises(KeyboardInterrupt):
            train(_cfg(tiny, method=method), tmp_path / "b")
        monkeypatch.setattr(cls, "train_step", original)
    train(_cfg(tiny, method=method), tmp_path / "b")
    for name in ("stage1.pt", "final.pt"):
        a, b = _weights(tmp_path / "a" / name), _weights(tmp_path / "b" / name)
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    # each epoch's mean loss covers the whole epoch, the steps before the crash included
    def epoch_means(run):
        lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
        return {(r["stage"], r["epoch"]): r["loss"] for r in lines if r.get("event") == "epoch"}
    a, b = epoch_means(tmp_path / "a"), epoch_means(tmp_path / "b")
    assert a.keys() == b.keys() and all(b[k] == pytest.approx(a[k], rel=1e-6) for k in a)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny, tmp_path, monkeypatch):
    import train.stage1 as s1
    original = s1.stage1_loss

    def poisoned(net, centroids, phase, *a, **kw):
        loss, z = original(net, centroids, phase, *a, **kw)
        return (loss * float("nan") if phase == "iccl" else loss), z

    monkeypatch.setattr(s1, "stage1_loss", poisoned)
    with pytest.raises(TrainingDiverged, match="nan"):
        train(_cfg(tiny), tmp_path / "run")
    state = checkpoint.load(tmp_path / "run" / "checkpoint.pt")
    assert (state["stage"], state["epoch"], state["step"]) == (1, 1, 0)
    assert all(torch.isfinite(v).all() for v in state["net"].values() if v.is_floating_point())


def test_resuming_with_other_settings_or_data_is_refused(tiny, tmp_path):
    train(_cfg(tiny, overrides={"checkpoint_minutes": "10"}), tmp_path / "run")
    with pytest.raises(DataError, match="other settings"):
        train(_cfg(tiny, overrides={"checkpoint_minutes": "10", "tau": "0.5"}), tmp_path / "run")
    other = tmp_path / "other"
    make_converted(other, {"train": (random_images(12, 32), np.arange(12) % 3),
                           "test": (random_images(6, 32), np.arange(6) % 3)}, 3)
    with pytest.raises(DataError, match="3 classes"):
        evaluate_run(tmp_path / "run", data=str(other))


def test_cli_train_eval_and_errors(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--preset", "synthetic-lt", "--data", str(tiny), "--out", str(run), "--epochs", "2",
            "--batch-size", "16", "--loader", "resident", "--workers", "0",
            "--set", "warmup_epochs=1", "--set", "s2_epochs=1", "--set", "lr_steps=1"]
    assert cli(["-q"] + args) == 0
    assert "stage 2" in capsys.readouterr().out
    out_json = tmp_path / "eval.json"
    assert cli(["-q", "eval", "--run", str(run), "--json", str(out_json)]) == 0
    assert json.loads(out_json.read_text())["num_samples"] == 16
    assert cli(["-q", "eval", "--run", str(tmp_path / "nothing")]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert cli(["-q", "train", "--preset", "synthetic-lt", "--data", str(tmp_path / "missing"),
                "--out", str(tmp_path / "r2")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_cli_several_seeds_print_mean_and_std(tiny, tmp_path, capsys):
    args = ["-q", "train", "--preset", "synthetic-lt", "--data", str(tiny), "--out", str(tmp_path / "s"),
            "--epochs", "2", "--batch-size", "16", "--loader", "resident", "--workers", "0", "--seeds", "0,1",
            "--set", "warmup_epochs=1", "--set", "s2_epochs=1", "--set", "lr_steps=1"]
    assert cli(args) == 0
    out = capsys.readouterr().out
    assert "±" in out and "n=2" in out
    a = checkpoint.load(tmp_path / "s" / "seed-0" / "final.pt")
    b = checkpoint.load(tmp_path / "s" / "seed-1" / "final.pt")
    assert (a["config"]["seed"], b["config"]["seed"]) == (0, 1)
    assert not torch.equal(a["net"]["classifier.weight"], b["net"]["classifier.weight"])


@pytest.mark.slow
def test_demo_learns_and_rebalancing_helps_the_tail(tmp_path, capsys):
    """`iccl demo` end to end (~2 min on 2 cores). Deterministic on a given CPU (seed 0), but the
    precision follows the CPU (`amp=auto`), so the numbers do too. Measured: with bf16 (a CPU with
    AVX512-BF16) 65.9 overall / 31.7 few after stage 1 and 74.2 / 62.7 after stage 2; in fp32 (an
    AVX2-only CPU) 76.4 / 65.3 and 80.6 / 72.7. Both tell the paper's story, stage 2 lifting both;
    the thresholds hold for both with a margin."""
    assert cli(["-q", "demo", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "run-iccl" / "report.json").read_text())
    s1, s2 = report["stage1"], report["stage2"]
    assert s1["top1"] > 50.0  # chance is 10%
    assert s2["top1"] > s1["top1"] + 2.0  # rebalancing lifts the overall accuracy (+8.3 / +4.2 measured)
    assert s2["few"] > s1["few"] + 4.0  # classifier rebalancing lifts the tail (+31.0 / +7.3 measured)
