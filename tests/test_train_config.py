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
    assert c.w_u_zero_after_warmup and c.w_u_after_warmup == 0.0
    assert c.s2_gamma == 1.0 and c.s2_beta == 0.5 and c.s2_finetune_encoder
    i = resolve("imagenet-lt")
    assert (i.arch, i.epochs, i.batch_size, i.weight_decay, i.schedule, i.proj_dim) == \
        ("resnext50_32x4d", 90, 256, 5e-4, "cosine", 128)
    n = resolve("inat2018")
    assert (n.arch, n.batch_size, n.lr, n.weight_decay, n.eval_split) == ("resnet50", 512, 0.2, 1e-4, "val")
    assert not n.s2_finetune_encoder
    assert set(PRESETS) == {"cifar10-lt", "cifar100-lt", "imagenet-lt", "inat2018", "photos", "synthetic-lt"}


def test_ce_method_is_crt_in_stage_2():
    c = resolve("cifar10-lt", "ce")
    assert c.method == "ce" and c.s2_beta == 0.0 and c.s2_gamma == 0.0 and c.s2_reinit_classifier
    assert c.stage2 == "crt" and not c.s2_finetune_encoder  # Decoupling's cRT: representation frozen
    assert not resolve("cifar10-lt").s2_reinit_classifier
    tuned = resolve("cifar10-lt", "ce", {"s2_finetune_encoder": "true"})  # fine-tuning stays a setting
    assert tuned.stage2 == "crt" and tuned.s2_finetune_encoder


def test_stage2_choice_brings_its_defaults_then_set_overrides():
    lws = resolve("cifar10-lt", overrides={"stage2": "lws", "s2_epochs": "3"})
    assert (lws.stage2, lws.s2_gamma, lws.s2_beta, lws.s2_finetune_encoder, lws.s2_epochs) == \
        ("lws", 0.0, 0.0, False, 3)
    # from a CE run's config (cRT's values saved), distill returns to the preset's stage 2
    saved = resolve("cifar10-lt", "ce").to_dict()
    d = resolve(overrides={"stage2": "distill"}, base=saved)
    assert (d.s2_gamma, d.s2_beta, d.s2_reinit_classifier, d.s2_finetune_encoder) == (1.0, 0.5, False, True)
    with pytest.raises(DataError, match="choose one of"):
        resolve("cifar10-lt", overrides={"stage2": "ldam"})
    with pytest.raises(DataError, match="s2_beta"):
        resolve("cifar10-lt", overrides={"stage2": "lws", "s2_beta": "0.5"})
    with pytest.raises(DataError, match="val_fraction"):
        resolve("cifar10-lt", overrides={"stage2": "tau_norm"})
    assert resolve("cifar10-lt", overrides={"stage2": "tau_norm", "val_fraction": "0.1"}).val_fraction == 0.1


def test_nesterov_and_beta_settings_reach_the_optimiser_and_config():
    import torch
    from train.stage1 import sgd
    cfg = resolve("cifar10-lt", overrides={"nesterov": "true", "alpha": "0.2", "alpha_b": "1.0"})
    opt = sgd(cfg, [torch.nn.Parameter(torch.zeros(1))], 0.1)
    assert opt.param_groups[0]["nesterov"] is True and not resolve("cifar10-lt").nesterov
    assert (cfg.alpha, cfg.alpha_b) == (0.2, 1.0)
    with pytest.raises(DataError, match="alpha_b"):
        resolve("cifar10-lt", overrides={"alpha_b": "0"})


def test_runs_saved_before_the_w_u_switch_still_load():
    old = resolve("imagenet-lt").to_dict()
    old.pop("w_u_zero_after_warmup")
    old["w_u_after_warmup"] = 1.0
    assert not Config.from_dict(old).w_u_zero_after_warmup
    old["w_u_after_warmup"] = 0.0
    assert Config.from_dict(old).w_u_zero_after_warmup


def test_overrides_are_typed_and_validated():
    c = resolve("cifar10-lt", overrides={"lr_steps": "60,80", "compile": "yes", "proj_hidden": "32",
                                         "tau": "0.2", "epochs": "100", "warmup_epochs": "50"})
    assert c.lr_steps == (60, 80) and c.compile is True and c.proj_hidden == 32 and c.tau == 0.2
    with pytest.raises(DataError, match="no such setting"):
        resolve("cifar10-lt", overrides={"nope": "1"})
    with pytest.raises(DataError, match="expected a value"):
        resolve("cifar10-lt", overrides={"epochs": "ten"})
    with pytest.raises(DataError, match="warmup_epochs"):
        resolve("cifar10-lt", overrides={"epochs": "10", "warmup_epochs": "20"})  # T_w > epochs
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
    # --set epochs=N is the same request as --epochs N
    assert resolve("cifar10-lt", overrides={"epochs": "50"}) == resolve("cifar10-lt", epochs=50)


def test_list_settings_needs_no_run_directory(capsys):
    from tools.cli import main
    assert main(["train", "--preset", "cifar10-lt", "--list-settings"]) == 0
    lines = capsys.readouterr().out.splitlines()
    settings = {k: v.split("  # ")[0] for k, v in (line.split(" = ", 1) for line in lines[1:])}
    assert settings["arch"] == "resnet32" and settings["amp"] == "auto"
    assert "one of auto, bf16, fp32" in lines[[ln.startswith("amp") for ln in lines].index(True)]
    assert main(["train", "--list-settings"]) == 0  # as the help shows it: the default preset
    assert "preset synthetic-lt" in capsys.readouterr().out.splitlines()[0]
    assert main(["train", "--preset", "cifar10-lt"]) == 2  # training does need --out
    assert "--out DIR is required" in capsys.readouterr().err


def test_every_numeric_setting_has_one_rule():
    """A new numeric setting must get a range in RANGES (or be listed here as any finite number)."""
    from dataclasses import fields

    from train.settings import CHOICES, RANGES
    any_finite = {"gamma", "s2_gamma", "mean"}  # p_k ~ n_k^-gamma takes any real gamma
    numeric = {f.name for f in fields(Config)
               if not isinstance(getattr(Config(), f.name), (bool, str)) or f.name == "proj_hidden"}
    assert numeric - set(RANGES) == any_finite
    assert set(CHOICES) == {"preset", "method", "schedule", "augment", "stage2", "lambda_per"}


@pytest.mark.parametrize("key, text, words", [
    ("lr", "-0.1", "lr=-0.1: must be > 0"), ("lr", "inf", "lr=inf"), ("gamma", "nan", "gamma=nan"),
    ("momentum", "1.5", "momentum=1.5: must be in [0, 1]"), ("workers", "-1", "workers=-1"),
    ("lr_steps", "5,-1", "lr_steps=(5, -1)"), ("std", "0.2,0,0.2", "std="), ("seed", "-3", "seed=-3"),
    ("arch", "resnet999", "unknown architecture"), ("loader", "fast", "loader='fast'"),
    ("amp", "fp16", "amp='fp16'"), ("device", "tpu", "device='tpu'"), ("augment", "mixup", "augment="),
    ("method", "xx", "method='xx'"), ("preset", "nope", "--preset cifar10-lt and --set preset=nope"),
])
def test_every_setting_is_checked_after_set(key, text, words):
    with pytest.raises(DataError) as e:
        resolve("cifar10-lt", overrides={key: text})
    assert words in str(e.value)


def test_flag_and_set_must_agree_and_a_saved_run_is_checked_again():
    with pytest.raises(DataError, match="--batch-size 5 and --set batch_size=3"):
        resolve("cifar10-lt", overrides={"batch_size": "3"}, batch_size=5)
    assert resolve("cifar10-lt", "ce", overrides={"method": "ce"}).method == "ce"  # agreeing is fine
    saved = resolve("cifar10-lt").to_dict()
    assert resolve(base=saved, workers=4).workers == 4
    with pytest.raises(DataError, match="tau=-1"):
        resolve(base={**saved, "tau": -1.0})  # a config.json edited by hand
    with pytest.raises(DataError, match="epochs=1.5: expected a value like 200"):
        resolve(base={**saved, "epochs": 1.5})


def test_a_misspelt_setting_gets_the_nearest_name():
    with pytest.raises(DataError, match="--set arhc=...: no such setting; did you mean arch?"):
        resolve("cifar10-lt", overrides={"arhc": "resnet18"})
