"""`--set pretrained=PATH` and `--set arch=...` through `iccl train`: loaded, reported, errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import make_converted, random_images
from model import build_network
from tools.cli import main as cli
from train import checkpoint
from train.config import resolve
from train.runner import train

K = 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-pretrained")
    labels = np.repeat(np.arange(K), [12, 8, 4])
    make_converted(root, {"train": (random_images(24, 32, seed=3), labels),
                          "test": (random_images(6, 32, seed=4), np.arange(6) % K)}, K)
    return root


def test_pretrained_encoder_is_loaded_reported_and_the_classifier_is_not(tiny, tmp_path):
    torch.manual_seed(123)
    source = build_network("resnet32", 100, 64)  # a 100-way classifier: must not be used
    state = {**source.encoder.state_dict(), "fc.weight": torch.ones(100, 64), "fc.bias": torch.ones(100)}
    weights = tmp_path / "enc.pth"
    torch.save(state, weights)
    # lr 1e-12 in both stages (it must be > 0): the weights a run ends with are, to 1e-6, the ones it
    # started from, while a different initialisation differs by ~0.1.
    cfg = resolve("synthetic-lt", "iccl", {"lr": "1e-12", "s2_lr": "1e-12", "pretrained": str(weights),
                                           "lr_warmup_epochs": "0", "lr_steps": "1"},
                  data=str(tiny), epochs=1, batch_size=8, s2_epochs=1, loader="resident", workers=0)
    report = train(cfg, tmp_path / "run")
    net = checkpoint.load(tmp_path / "run" / "stage1.pt")["net"]
    for k, v in source.encoder.state_dict().items():
        if v.is_floating_point() and "running" not in k:  # batch-norm statistics do move in training
            assert torch.allclose(net[f"encoder.{k}"], v, rtol=0, atol=1e-6), k
    assert net["classifier.weight"].shape == (K, 64)
    rec = report["pretrained"]
    assert rec["missing"] == [] and rec["unexpected"] == ["fc.weight", "fc.bias"]
    assert rec["loaded"] == len(source.encoder.state_dict())
    assert json.loads((tmp_path / "run" / "report.json").read_text())["pretrained"] == rec
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [e["loaded"] for e in events if e.get("event") == "pretrained"] == [rec["loaded"]]


@pytest.mark.parametrize("setting, message", [
    ("pretrained=imagenet", "pretrained=imagenet: not a local file. Nothing is downloaded"),
    ("arch=resnet19", "arch='resnet19': unknown architecture 'resnet19'"),
])
def test_cli_errors_exit_2_with_the_fix(tiny, tmp_path, capsys, setting, message):
    code = cli(["train", "--preset", "synthetic-lt", "--data", str(tiny), "--out", str(tmp_path / "r"),
                "--epochs", "1", "--batch-size", "8", "--set", setting, "--set", "loader=resident"])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # refused before anything is written, the folder included
