"""A converted validation split (`val_split`, e.g. the val split of `iccl convert --val-per-class N`)
as what stage 2 tunes on: nothing is held out of training, and `iccl stage2 --from` may name it
for a run trained without it."""
from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import make_converted, make_tiny_lt, random_images, tiny_config
from pipeline.atomic import write_json
from pipeline.errors import DataError
from pipeline.format import META_FILE, read_meta
from tools.cli import main as cli
from train.config import resolve
from train.runner import train

SPEED = ["--loader", "resident", "--workers", "0"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """An ICCL run (no carve) on data with train (24 / 12 / 8 / 4), val (3 per class) and test."""
    root = tmp_path_factory.mktemp("valsplit")
    report = train(tiny_config(make_tiny_lt(root / "data", val_per_class=3), amp="fp32"), root / "iccl")
    assert "stage1_val" not in report  # no validation split was asked for
    return root


def test_conflicting_validation_settings_are_refused():
    with pytest.raises(DataError, match="two validation splits"):
        resolve("synthetic-lt", overrides={"val_split": "val", "val_fraction": "0.1"})
    with pytest.raises(DataError, match="reported on"):
        resolve("synthetic-lt", overrides={"val_split": "test"})  # the preset's eval_split
    with pytest.raises(DataError, match="trained on"):
        resolve("synthetic-lt", overrides={"val_split": "train"})
    with pytest.raises(DataError, match="named test"):  # even where the runs report on val
        resolve("synthetic-lt", overrides={"val_split": "test", "eval_split": "val"})
    resolve("synthetic-lt", overrides={"eval_split": ""})  # no val_split: not compared with the others
    with pytest.raises(DataError, match="val_split=val"):  # a search without a split names both ways out
        resolve("synthetic-lt", overrides={"stage2": "tau_norm"})
    tuned = resolve("synthetic-lt", overrides={"stage2": "tau_norm", "val_split": "val"})
    assert len(tuned.s2_tau_norm_grid) > 1 and tuned.val_fraction == 0


@pytest.mark.slow
def test_stage2_from_a_run_tunes_on_the_converted_split(run, tmp_path, monkeypatch, capsys):
    """The search reads the 12 images of val (test has 16); the chosen τ is the grid's best there,
    and the model's own evaluation on val gives the number the search recorded for it."""
    from train import stage2_methods
    read = []
    real = stage2_methods._val_features
    monkeypatch.setattr(stage2_methods, "_val_features",
                        lambda ctx, net: read.append(real(ctx, net)) or read[-1])
    out = tmp_path / "la"
    assert cli(["-q", "stage2", "--from", str(run / "iccl"), "--out", str(out), *SPEED,
                "--set", "stage2=logit_adjust", "--set", "val_split=val"]) == 0
    report = json.loads((out / "report.json").read_text())
    scores = report["stage2_choice"]["val_top1_by_value"]
    chosen = report["stage2_choice"]["chosen"]["tau"]
    assert len(scores) == 13 and scores[str(chosen)] == max(scores.values())
    val = report["stage2_val"]
    assert val["num_samples"] == 12  # the converted split, not a carve
    assert val["class_mean"] == pytest.approx(scores[str(chosen)], abs=1e-9)
    assert report["stage2"]["num_samples"] == 16  # reported on the test split
    assert [len(labels) for _, labels in read] == [12]
    assert report["stage1_val"]["num_samples"] == 12  # the source run had none: evaluated here
    assert json.loads((out / "config.json").read_text())["val_split"] == "val"
    assert cli(["-q", "eval", "--run", str(out), "--split", "val"]) == 2
    assert "flatters the choice" in capsys.readouterr().err
    assert cli(["-q", "eval", "--run", str(out), "--split", "test"]) == 0


@pytest.mark.slow
def test_training_with_val_split_keeps_every_training_image(run, tmp_path):
    report = train(tiny_config(run / "data", "ce", {"val_split": "val"}, epochs=1), tmp_path / "ce")
    assert report["stage1_val"]["num_samples"] == 12 and report["stage2_val"]["num_samples"] == 12
    steps = {json.loads(line).get("steps") for line in (tmp_path / "ce" / "metrics.jsonl").open()}
    assert steps - {None} == {3}  # 48 images in batches of 16 (a carve of 10 % would leave 43: 2 steps)


@pytest.mark.slow
def test_a_missing_split_names_the_fix(run, tmp_path, capsys):
    assert cli(["-q", "stage2", "--from", str(run / "iccl"), "--out", str(tmp_path / "x"), *SPEED,
                "--set", "stage2=tau_norm", "--set", "val_split=holdout"]) == 2
    err = capsys.readouterr().err
    assert "no split named holdout for val_split" in err and "--val-per-class" in err
    assert not (tmp_path / "x" / "config.json").exists()  # refused before anything is written


def test_reproduce_refuses_data_converted_with_other_options(tmp_path):
    from tools.cmd_reproduce import _check_data

    data = make_converted(tmp_path / "data", {"train": (random_images(4, 8, seed=1), np.arange(4) % 2)}, 2)
    meta = read_meta(data)
    meta["source"] = {"kind": "cifar", "imbalance": 100.0, "val_per_class": 0}
    write_json(data / META_FILE, meta)

    class Args:
        dataset, imbalance, val_per_class = "cifar10-lt", 100.0, 0
    _check_data(data, Args)  # what it was converted with
    Args.val_per_class = 200
    with pytest.raises(DataError, match="with --val-per-class 0, not ratio 100.0 with --val-per-class 200"):
        _check_data(data, Args)
    Args.val_per_class, Args.imbalance = 0, 50.0
    with pytest.raises(DataError, match="choose another --out"):
        _check_data(data, Args)
