"""`iccl reproduce` resumes a run folder with the settings it started with, even where the presets
changed since (the CIFAR presets' fused_forward did); what the command asks for must still match."""
import json

import pytest

from pipeline.errors import DataError
from tools.cmd_reproduce import _resumed
from train.runner import check_resume_config
from train.config import resolve


def test_a_run_started_under_older_presets_resumes_as_it_started(tmp_path):
    run = tmp_path / "iccl" / "seed-0"
    run.mkdir(parents=True)
    started = resolve("cifar10-lt", "iccl", {"fused_forward": "true"}, data="/old/data", epochs=60, seed=0)
    (run / "config.json").write_text(json.dumps(started.to_dict()))
    now = resolve("cifar10-lt", "iccl", data="/new/data", epochs=60, seed=0, device="cpu")
    assert now.fused_forward is False  # the presets since the gap study
    got = _resumed(run, now)
    assert got.fused_forward is True and got.data == "/new/data" and got.device == "cpu"
    check_resume_config(run, got)  # what train() checks: nothing differs
    assert _resumed(tmp_path / "none", now) is now  # a new run takes the presets as they are
    with pytest.raises(DataError, match="epochs 60, not 200"):
        _resumed(run, resolve("cifar10-lt", "iccl", data="/new/data", epochs=200, seed=0))
