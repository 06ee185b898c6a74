"""The stage-2 family end to end on a tiny dataset: `iccl stage2 --from RUN`, each choice from the same
stage1.pt, the validation carve, what is recorded, what is refused. (The math of each choice is
checked against hand-computed cases in test_rebalance.py.)"""
from __future__ import annotations

import json

import pytest
import torch

from helpers import K, make_tiny_lt, tiny_config
from tools.cli import main as cli
from train import checkpoint
from train.config import STAGE2_CHOICES, resolve
from train.runner import train

SPEED = ["--loader", "resident", "--workers", "0"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An ICCL run with a validation carve (val_fraction 0.25: 6 / 3 / 2 / 1 images held out)."""
    root = tmp_path_factory.mktemp("family")
    train(tiny_config(make_tiny_lt(root / "data"), overrides={"val_fraction": "0.25"}), root / "iccl")
    return root


def test_the_carve_is_evaluated_with_its_class_mean(runs):
    """With val_fraction > 0 each stage is also evaluated on the carve (6 / 3 / 2 / 1 images), whose
    class_mean is the mean of its per-class accuracies (the carve is imbalanced, the test split not)."""
    report = json.loads((runs / "iccl" / "report.json").read_text())
    for stage in ("stage1_val", "stage2_val"):
        val = report[stage]
        assert val["num_samples"] == 12
        assert val["class_mean"] == pytest.approx(sum(val["per_class"]) / K)
        # per-class accuracies are multiples of 1/6, 1/3, 1/2, 1/1 (in %)
        for acc, n in zip(val["per_class"], (6, 3, 2, 1)):
            assert (acc / 100 * n) == pytest.approx(round(acc / 100 * n), abs=1e-3)
    assert report["stage1"]["num_samples"] == 16  # the test split, as before


def _stage2(runs, out, *sets):
    args = ["-q", "stage2", "--from", str(runs / "iccl"), "--out", str(out), *SPEED]
    for s in sets:
        args += ["--set", s]
    return cli(args)


@pytest.mark.slow
@pytest.mark.parametrize("choice", STAGE2_CHOICES)
def test_every_choice_runs_from_an_existing_stage1(runs, tmp_path, choice):
    out = tmp_path / choice
    assert _stage2(runs, out, f"stage2={choice}", "s2_epochs=1") == 0
    report = json.loads((out / "report.json").read_text())
    assert report["stage2_choice"]["stage2"] == choice and 0 <= report["stage2"]["top1"] <= 100
    src = json.loads((out / "stage1_source.json").read_text())
    assert src["stage1"] == str((runs / "iccl" / "stage1.pt").resolve()) and len(src["stage1_sha256"]) == 64
    source = json.loads((runs / "iccl" / "report.json").read_text())
    assert report["stage1"] == source["stage1"] and report["stage1_val"] == source["stage1_val"]
    assert not (out / "stage1.pt").exists()  # nothing copied
    assert json.loads((out / "config.json").read_text())["stage2"] == choice
    stage1 = checkpoint.load(runs / "iccl" / "stage1.pt")["net"]
    final = checkpoint.load(out / "final.pt")["net"]
    if choice != "distill":  # every baseline keeps the representation frozen (batch norm included)
        for k, v in stage1.items():
            if k.startswith("encoder."):
                assert torch.equal(v, final[k]), k
    if choice in ("tau_norm", "logit_adjust", "mislas"):
        chosen = report["stage2_choice"]["chosen"]
        scores = report["stage2_choice"]["val_top1_by_value"]
        assert len(scores) > 1 and max(scores.values()) == scores[str(next(iter(chosen.values())))]
    if choice == "ncm":
        w, b = final["classifier.weight"].double(), final["classifier.bias"].double()
        assert torch.allclose(b, -0.5 * (w * w).sum(1), atol=1e-5)
    if choice == "tau_norm":
        p = report["stage2_choice"]["chosen"]["tau_norm_p"]
        w0 = stage1["classifier.weight"].double()
        want = w0 / w0.norm(dim=1, keepdim=True) ** p
        assert torch.allclose(final["classifier.weight"].double(), want, atol=1e-6)
        assert torch.equal(final["classifier.bias"], torch.zeros(K))
    if choice == "lws":  # the weights change only by one scale per class
        ratio = final["classifier.weight"] / stage1["classifier.weight"]
        assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-4)
    assert cli(["-q", "eval", "--run", str(out)]) == 0
    assert cli(["-q", "eval", "--run", str(out), "--stage", "1"]) == 0  # follows stage1_source.json


@pytest.mark.slow
def test_rerun_resumes_and_changing_stage1_or_tuning_without_validation_is_refused(runs, tmp_path, capsys):
    out = tmp_path / "lws"
    assert _stage2(runs, out, "stage2=lws") == 0
    first = checkpoint.load(out / "final.pt")["net"]["classifier.weight"]
    assert _stage2(runs, out, "stage2=lws") == 0  # done: resumes to the same result
    assert torch.equal(first, checkpoint.load(out / "final.pt")["net"]["classifier.weight"])
    assert _stage2(runs, tmp_path / "x", "stage2=crt", "tau=0.5") == 2
    assert "fixed by the stage 1" in capsys.readouterr().err
    assert _stage2(runs, tmp_path / "v", "stage2=crt", "val_split=val") == 2  # the carve stays
    assert "drop --set val_split" in capsys.readouterr().err
    assert _stage2(runs, tmp_path / "y", "stage2=nope") == 2
    assert "choose one of" in capsys.readouterr().err
    assert cli(["-q", "stage2", "--from", str(tmp_path / "nothing"), "--out", str(tmp_path / "z")]) == 2
    assert "no such folder" in capsys.readouterr().err
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "config.json").write_text("{}")
    assert cli(["-q", "stage2", "--from", str(tmp_path / "unfinished"), "--out", str(tmp_path / "z")]) == 2
    assert "stage1.pt: missing" in capsys.readouterr().err
    with pytest.raises(Exception, match="val_fraction"):
        resolve("synthetic-lt", overrides={"stage2": "logit_adjust"})
    one = resolve("synthetic-lt", overrides={"stage2": "logit_adjust", "s2_logit_adjust_grid": "1.0"})
    assert one.s2_logit_adjust_grid == (1.0,)


@pytest.mark.slow
def test_choices_run_one_per_choice_and_print_one_table(runs, tmp_path, capsys):
    out = tmp_path / "family"
    base = ["-q", "stage2", "--from", str(runs / "iccl"), "--out", str(out), *SPEED]
    assert cli(base + ["--choices", "crt,bogus"]) == 2
    assert "bogus" in capsys.readouterr().err and not out.exists()  # refused before anything trains
    assert cli(base + ["--choices", "crt", "--set", "stage2=lws"]) == 2
    capsys.readouterr()
    assert cli(base + ["--choices", "ncm,logit_adjust"]) == 0
    table = capsys.readouterr().out
    assert "stage 1" in table and "ncm" in table and "logit_adjust" in table
    assert (out / "ncm" / "final.pt").is_file() and (out / "logit_adjust" / "final.pt").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("choice", ["lws", "mislas"])
def test_stage2_run_killed_mid_epoch_resumes_exactly(runs, tmp_path, monkeypatch, choice):
    """The learnt per-class scales are checkpointed: a stage-2 run killed mid-epoch and rerun ends
    with exactly the classifier of an uninterrupted one (a one-value grid: no search)."""
    from train.stage2 import Stage2
    sets = (f"stage2={choice}", "s2_epochs=2", "s2_mislas_eps_head=0.3")
    assert _stage2(runs, tmp_path / "a", *sets) == 0
    original = Stage2.train_step

    def crashing(self, batch, epoch, step):
        if (epoch, step) == (1, 1):
            raise KeyboardInterrupt
        return original(self, batch, epoch, step)

    monkeypatch.setattr(Stage2, "train_step", crashing)
    assert _stage2(runs, tmp_path / "b", *sets) == 130
    monkeypatch.setattr(Stage2, "train_step", original)
    assert _stage2(runs, tmp_path / "b", *sets) == 0
    a = checkpoint.load(tmp_path / "a" / "final.pt")["net"]
    b = checkpoint.load(tmp_path / "b" / "final.pt")["net"]
    for k in ("classifier.weight", "classifier.bias"):
        assert torch.equal(a[k], b[k]), k
