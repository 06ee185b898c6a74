"""tools/gpu_check.py on the CPU: argument parsing, the plan (every command a valid `iccl` command
line), the time limit, the table, the recipe summary, and the helpers of the GPU checks."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch

from tools import gpu_check
from tools.cli import build_parser
from tools.gpu_paths import nccl_detail, no_tf32


def test_defaults_quick_limit_and_out_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("OUT", str(tmp_path))
    args = gpu_check.parse_args(["--quick"])
    assert args.time_limit == 480 and args.out == tmp_path
    monkeypatch.delenv("OUT")
    args = gpu_check.parse_args(["--time-limit", "100"])
    assert args.time_limit == 100 and not args.quick and args.out != tmp_path
    assert gpu_check.parse_args([]).time_limit == 1800
    with pytest.raises(SystemExit) as e:
        gpu_check.parse_args(["--time-limit", "5"])
    assert e.value.code == 2


@pytest.mark.parametrize("cifar", [False, True])
def test_plan_is_the_checks_then_the_benchmarks_then_the_recipe(tmp_path, cifar):
    argv = ["--quick", "--out", str(tmp_path / "o"), "--work", str(tmp_path / "w")]
    steps = gpu_check.plan(gpu_check.parse_args(argv + (["--cifar-source", "c.tar.gz"] if cifar else [])))
    names = [s.name for s in steps]
    assert names[:6] == ["bench data", "DALI mixed decode", "bf16 autocast", "channels_last (TF32 off)",
                         "torch.compile (static shapes)", "NCCL"]
    assert [n.split(" (")[0] for n in names[6:]] == ["bench pipeline", "bench train", "bench train",
                                                      "CIFAR-10-LT ICCL recipe"]
    parser = build_parser()
    for s in steps[6:]:
        for command in s.commands:  # each is `python -m tools.cli -q ...`, with options that exist
            assert command[1:4] == ["-m", "tools.cli", "-q"]
            parser.parse_args(command[3:])
    recipe = steps[-1].commands
    assert recipe[0][4:6] == (["convert", "cifar10-lt"] if cifar else ["convert", "synthetic-lt"])
    assert recipe[1][4] == "train" and "resident" in recipe[1] and "--epochs" not in recipe[1]
    assert steps[-1].share_s == float("inf")  # the time left
    # Caps of everything before the recipe fit the quick limit, leaving it time.
    assert sum(s.share_s for s in steps[:-1]) < 480 - gpu_check.END_MARGIN_S


@pytest.mark.parametrize("quick", [True, False])
def test_resnet50_timing_stays_inside_one_epoch_of_the_bench_pictures(tmp_path, quick):
    """Warm-up + timed steps of the end-to-end ResNet-50 bench fit one epoch of the pictures
    (an epoch end drains the loader's prefetch queue, which the first H200 run timed 3 times)."""
    args = gpu_check.parse_args((["--quick"] if quick else []) + ["--out", str(tmp_path), "--work", str(tmp_path)])
    step = next(s for s in gpu_check.plan(args) if s.name.startswith("bench train (ResNet-50"))
    command = step.commands[0]
    value = lambda opt: int(command[command.index(opt) + 1])  # noqa: E731
    photos = Path(command[command.index("--data") + 1])
    assert int(photos.name.split("-")[1]) >= (value("--warmup") + value("--steps")) * value("--batch-size")


def test_converted_cifar_data_is_trained_on_as_it_is(tmp_path, monkeypatch, capsys):
    (tmp_path / "c10").mkdir()
    with pytest.raises(SystemExit) as e:  # not a converted dataset: refused before any GPU time
        gpu_check.parse_args(["--cifar-data", str(tmp_path / "c10")])
    assert e.value.code == 2 and "meta.json" in capsys.readouterr().err
    (tmp_path / "c10" / "meta.json").write_text("{}")
    monkeypatch.chdir(tmp_path)  # relative paths are resolved: the subprocesses run in the checkout
    args = gpu_check.parse_args(["--quick", "--cifar-data", "c10", "--cifar-source", "s.tar.gz",
                                 "--work", "w"])
    assert args.cifar_data == tmp_path / "c10" and args.work == tmp_path / "w"
    recipe = gpu_check.plan(args)[-1].commands
    assert len(recipe) == 1 and recipe[0][4] == "train" and str(tmp_path / "c10") in recipe[0]


def test_subprocesses_keep_the_callers_python_path(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/opt/site")
    assert gpu_check.python_path().split(":") == [str(gpu_check.ROOT), "/opt/site"]
    monkeypatch.delenv("PYTHONPATH")
    assert gpu_check.python_path() == str(gpu_check.ROOT)


def test_dry_run_needs_no_gpu_and_a_real_run_says_it_needs_one(capsys, tmp_path):
    assert gpu_check.main(["--dry-run", "--quick", "--out", str(tmp_path)]) == 0
    assert "time limit 480 s" in capsys.readouterr().out
    if not torch.cuda.is_available():
        assert gpu_check.main(["--quick", "--out", str(tmp_path)]) == 2
        assert "needs a GPU" in capsys.readouterr().err


def test_steps_are_bounded_by_the_time_limit(monkeypatch, tmp_path):
    monkeypatch.setattr(gpu_check, "MIN_STEP_S", 0.5)
    slow = gpu_check.Step("slow", 1, run=lambda: time.sleep(5) or "done")
    t = time.monotonic()
    assert gpu_check.run_step(slow, 100, tmp_path).status == "timeout"
    sub = gpu_check.Step("slow sub", 100, commands=[[sys.executable, "-c", "import time; time.sleep(5)"]])
    assert gpu_check.run_step(sub, 1, tmp_path).status == "timeout"  # the time left bounds it
    assert time.monotonic() - t < 4
    assert gpu_check.run_step(slow, 0.2, tmp_path).status == "skipped"
    quick = gpu_check.Step("quick", 0.1, run=lambda: "done")  # a share under MIN_STEP_S still runs
    assert gpu_check.run_step(quick, 100, tmp_path).status == "ok"
    assert (tmp_path / "slow-sub.log").read_text().startswith("$ ")


def test_failures_are_rows_not_crashes(tmp_path):
    def broken():
        raise AssertionError("max rel diff 3e-2")
    row = gpu_check.run_step(gpu_check.Step("check", 30, run=broken), 100, tmp_path)
    assert (row.status, row.detail) == ("FAIL", "AssertionError: max rel diff 3e-2")
    fails = [sys.executable, "-c", "print('boom'); raise SystemExit(3)"]
    cmd = gpu_check.Step("bench x", 30, commands=[fails])
    row = gpu_check.run_step(cmd, 100, tmp_path)
    assert row.status == "FAIL" and "exit 3" in row.detail and "boom" in row.detail


def test_table_is_markdown_with_one_row_per_check():
    rows = [gpu_check.Row("NCCL", "ok", nccl_detail(1), 2.04), gpu_check.Row("a|b", "FAIL", "x\ny", 0)]
    text = gpu_check.format_table(rows, "GPU check: H200")
    assert text.splitlines() == [
        "### GPU check: H200", "", "| check | result | detail | s |", "|---|---|---|---|",
        "| NCCL | ok | 1 GPU: one rank, proves nothing about communication (the NCCL set-up path ran) "
        "| 2.0 |",
        "| a|b | FAIL | x y | 0.0 |"]
    assert "2 GPUs" in nccl_detail(2)


def test_recipe_summary_from_the_report_or_the_metrics(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert gpu_check.recipe_summary(run, True) == "CIFAR-10-LT: stopped after no epoch"
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(m) for m in [
        {"stage": "stage1", "event": "epoch", "epoch": 0}, {"stage": "stage1", "epoch": 1, "step": 5},
        {"stage": "stage1", "event": "epoch", "epoch": 41}]))
    assert gpu_check.recipe_summary(run, False).endswith("stopped after stage1 epoch 42")
    (run / "report.json").write_text(json.dumps({
        "stage1": {"top1": 71.2, "many": 76.9, "medium": 48.3},
        "stage2": {"top1": 80.5, "many": 82.0, "medium": 74.25}, "train_seconds_this_session": 97.4}))
    assert gpu_check.recipe_summary(run, True) == ("CIFAR-10-LT: stage 1 71.20, ICCL 80.50 "
                                                   "(many 82.00, medium 74.25; paper 82.1); 97 s of training")


def test_no_tf32_turns_tf32_off_inside_and_restores_it():
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = conv.fp32_precision, matmul.fp32_precision
    with no_tf32():
        assert (conv.fp32_precision, matmul.fp32_precision) == ("ieee", "ieee")
    assert (conv.fp32_precision, matmul.fp32_precision) == before
