"""The gap study's arms: each is the cifar10-lt preset with exactly the change it names."""
import pytest

from pipeline.errors import DataError
from tools.gap_study import ORDER, STAGE1_ARMS, STAGE2_ARMS, main, stage1_configs
from train.config import resolve


def test_every_stage1_arm_changes_only_what_it_says(tmp_path):
    plans = stage1_configs(ORDER, 60, 0, tmp_path)
    assert set(plans) == set(STAGE1_ARMS) and set(ORDER) == set(STAGE1_ARMS) | set(STAGE2_ARMS)
    base = plans["base"].to_dict()
    assert base["eval_split"] == "val" and base["lr_warmup_epochs"] == 5 and base["epochs"] == 60
    assert base["warmup_epochs"] == 30 and list(base["lr_steps"]) == [36, 48]  # scaled with --epochs
    assert base == {**resolve("cifar10-lt", epochs=60).to_dict(), "eval_split": "val", "lr_warmup_epochs": 5,
                    "data": base["data"], "fused_forward": True}  # the preset before the study
    assert plans["unfused"].to_dict() == {**base, "fused_forward": False}  # the preset now
    # The arms measured with the fused preset pin it; the later ones change the preset as it is now.
    against_base = {"ce": {"method"}, "unfused": {"fused_forward"},
                    "keep-wu": {"w_u_zero_after_warmup"}, "tw-quarter": {"warmup_epochs"}}
    against_now = {"tw-three-quarters": {"warmup_epochs"}, "lambda-batch": {"lambda_per"},
                   "centroid-m0.9": {"centroid_momentum"}, "tau-0.2": {"tau"},
                   "bbn-schedule": {"nesterov", "lr_steps"}}
    now = plans["unfused"].to_dict()
    for arm, keys in (*against_base.items(), *against_now.items()):
        ref = base if arm in against_base else now
        got = plans[arm].to_dict()
        changed = {k for k in got if got[k] != ref[k]}
        if arm == "ce":  # --method ce also brings cRT's stage 2 (train.presets.CE_OVERRIDES)
            changed -= {"stage2", "s2_gamma", "s2_beta", "s2_finetune_encoder", "s2_reinit_classifier"}
        assert changed == keys, arm
    assert plans["tw-quarter"].warmup_epochs == 15 and plans["tw-three-quarters"].warmup_epochs == 45
    assert list(plans["bbn-schedule"].lr_steps) == [35, 47]  # BBN counts epochs from 1
    assert list(stage1_configs(("bbn-schedule",), 200, 0, tmp_path)["bbn-schedule"].lr_steps) == [119, 159]


def test_stage2_arms_are_stage2_settings_only():
    from train.presets import STAGE2_FIELDS
    for arm, (_, sets) in STAGE2_ARMS.items():
        assert set(sets) <= set(STAGE2_FIELDS), arm


def test_unknown_arm_is_refused_before_anything_is_written(tmp_path, capsys):
    assert main(["--source", str(tmp_path / "none"), "--out", str(tmp_path / "o"), "--arms", "base,nope"]) == 2
    assert "--arms nope" in capsys.readouterr().err and not (tmp_path / "o").exists()
    with pytest.raises(DataError):
        stage1_configs(("nope",), 60, 0, tmp_path)


def test_a_missing_download_is_one_line_before_anything_is_written(tmp_path, capsys):
    assert main(["--source", str(tmp_path / "none.tar.gz"), "--out", str(tmp_path / "o"), "--arms", "base"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("gap_study: ") and "none.tar.gz" in err[0]
    assert not (tmp_path / "o").exists()
