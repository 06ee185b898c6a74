"""Presets, overrides and schedules."""
import math

import pytest

from pipeline.errors import DataError
from train.config import PRESETS, Config, resolve
from train.schedule import cosine_lr, step_lr


def test_presets_carry_the_paper_recipes():
    c = resolve("cifar10-lt")
    assert (c.arch, c.epochs, c.batch_size, c.lr, c.weight_decay) == ("resnet32", 200, 128, 0.1, 2e-4)
    assert (c.lr_steps, c.lr_step_factor, c.lr_warmup_epochs, c.warmup_epochs) == ((120, 160), 0.01, 5, 100)
    assert c.w_u_after_warmup == 0.0 and c.s2_gamma == 1.0 and c.s2_beta == 0.5 and c.s2_finetune_encoder
    i = resolve("imagenet-lt")
    assert (i.arch, i.epochs, i.batch_size, i.weight_decay, i.schedule, i.proj_dim) == \
        ("resnext50_32x4d", 90, 256, 5e-4, "cosine", 128)
    n = resolve("inat2018")
    assert (n.arch, n.batch_size, n.lr, n.weight_decay, n.eval_split) == ("resnet50", 512, 0.2, 1e-4, "val")
    assert not n.s2_finetune_encoder
    assert set(PRESETS) == {"cifar10-lt", "cifar100-lt", "imagenet-lt", "inat2018", "synthetic-lt"}


def test_ce_method_is_crt_in_stage_2():
    c = resolve("cifar10-lt", "ce")
    assert c.method == "ce" and c.s2_beta == 0.0 and c.s2_gamma == 0.0 and c.s2_reinit_classifier
    assert not resolve("cifar10-lt").s2_reinit_classifier


def test_overrides_are_typed_and_validated():
    c = resolve("cifar10-lt", overrides={"lr_steps": "60,80", "compile": "yes", "proj_hidden": "32",
                                         "tau": "0.2", "epochs": "100", "warmup_epochs": "50"})
    assert c.lr_steps == (60, 80) and c.compile is True and c.proj_hidden == 32 and c.tau == 0.2
    with pytest.raises(DataError, match="no such setting"):
        resolve("cifar10-lt", overrides={"nope": "1"})
    with pytest.raises(DataError, match="expected a value"):
        resolve("cifar10-lt", overrides={"epochs": "ten"})
    with pytest.raises(DataError, match="warmup_epochs"):
        resolve("cifar10-lt", overrides={"epochs": "10"})  # T_w = 100 > 10 epochs
    with pytest.raises(DataError, match="unknown preset"):
        resolve("cifar1000-lt")


def test_config_round_trip_and_lr_scaling():
    c = resolve("imagenet-lt", batch_size=512)
    assert Config.from_dict(c.to_dict()) == c
    assert c.scaled_lr(c.lr) == pytest.approx(0.2)  # lr scales linearly with the global batch


def test_step_schedule_matches_ldam_drw():
    # LDAM-DRW: lr * epoch/5 for (1-based) epochs 1..5, then x0.01 at 120 and again at 160.
    assert step_lr(0.1, 0, 5, (120, 160), 0.01) == pytest.approx(0.02)
    assert step_lr(0.1, 4, 5, (120, 160), 0.01) == pytest.approx(0.1)
    assert step_lr(0.1, 2.5, 5, (120, 160), 0.01) == pytest.approx(0.07)
    assert step_lr(0.1, 119.9, 5, (120, 160), 0.01) == pytest.approx(0.1)
    assert step_lr(0.1, 120, 5, (120, 160), 0.01) == pytest.approx(1e-3)
    assert step_lr(0.1, 199, 5, (120, 160), 0.01) == pytest.approx(1e-5)


def test_cosine_schedule():
    assert cosine_lr(0.2, 0, 90) == pytest.approx(0.2)
    assert cosine_lr(0.2, 45, 90) == pytest.approx(0.1)
    assert cosine_lr(0.2, 90, 90) == pytest.approx(0.0, abs=1e-12)
    assert cosine_lr(0.2, 30, 90) == pytest.approx(0.1 * (1 + math.cos(math.pi / 3)))


def test_changing_epochs_keeps_the_recipe_shape():
    c = resolve("cifar10-lt", epochs=50)
    assert (c.warmup_epochs, c.lr_steps, c.lr_warmup_epochs) == (25, (30, 40), 1)
    assert resolve("cifar10-lt", epochs=400).lr_warmup_epochs == 10
    assert resolve("cifar10-lt", epochs=50, overrides={"lr_warmup_epochs": "5"}).lr_warmup_epochs == 5
    # a 2-epoch run reaches the base learning rate (it never did with 5 warm-up epochs)
    from train.schedule import step_lr
    c = resolve("synthetic-lt", epochs=2)
    assert c.lr_warmup_epochs == 0 and step_lr(c.lr, 0.5, c.lr_warmup_epochs, c.lr_steps, 0.01) == c.lr
    assert resolve("imagenet-lt", epochs=30).warmup_epochs == 15  # cosine: no steps to scale
    c = resolve("cifar10-lt", epochs=50, overrides={"warmup_epochs": "10"})
    assert c.warmup_epochs == 10 and c.lr_steps == (30, 40)


def test_list_settings_needs_no_run_directory(capsys):
    from tools.cli import main
    assert main(["train", "--preset", "cifar10-lt", "--list-settings"]) == 0
    settings = dict(line.split(" = ", 1) for line in capsys.readouterr().out.splitlines())
    assert settings["arch"] == "resnet32" and settings["amp"] == "auto"
    assert main(["train", "--preset", "cifar10-lt"]) == 2  # training does need --out
    assert "--out DIR is required" in capsys.readouterr().err
