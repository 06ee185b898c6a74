"""What the commands say matches what they do: help texts, -q, plurals, rates, sizes, and one
implementation (one list) of each thing the help texts promise."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from helpers import make_converted, random_images
from pipeline.progress import _Task, count, rate_text
from tools.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
SIZE = re.compile(r"\d[\d,.]* [KMGT]?B\b")


@pytest.fixture
def small(tmp_path) -> Path:
    return make_converted(tmp_path / "data", {"train": (random_images(6, 32, seed=1), [0, 0, 0, 0, 1, 1]),
                                              "test": (random_images(4, 32, seed=2), [0, 1, 0, 1])}, 2)


def test_plurals():
    assert (count(1, "problem"), count(2, "problem"), count(0, "shard")) == \
        ("1 problem", "2 problems", "0 shards")
    assert count(1, "class", "classes") == "1 class" and count(3, "class", "classes") == "3 classes"


def test_verify_says_1_problem(small, capsys):
    meta = json.loads((small / "meta.json").read_text())
    meta["splits"]["train"]["class_counts"] = [3, 3]
    (small / "meta.json").write_text(json.dumps(meta))
    assert main(["verify", str(small), "--workers", "1"]) == 1
    assert capsys.readouterr().out.startswith(f"1 problem in {small}:")


def test_slow_steps_show_seconds_per_step(capsys):
    assert rate_text(10, 2.0, "steps") == "5 steps/s"
    assert rate_text(1, 3.2, "steps") == "3.2 s/step"  # not "0 steps/s"
    assert rate_text(0, 5.0, "images") == "0 images/s"
    task = _Task(total=2, desc="stage1 epoch 1/1", unit="steps", bar=None, every_s=0.0)
    task._t0 -= 4.0  # the first step took 4 s
    task.advance(1)
    assert "1/2 steps (4.0 s/step)" in capsys.readouterr().err


def test_quiet_keeps_results_and_drops_progress(tmp_path, capsys):
    out = tmp_path / "synthetic"
    assert main(["-q", "convert", "synthetic-lt", "--classes", "2", "--max-per-class", "8",
                 "--test-per-class", "2", "--image-size", "8", "--out", str(out), "--workers", "1"]) == 0
    printed = capsys.readouterr()
    assert printed.err == "" and "train" in printed.out  # the result table stays, on stdout
    assert main(["-q", "info", str(out)]) == 0
    printed = capsys.readouterr()
    assert printed.err == "" and "train" in printed.out
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "Results (tables, --json output" in " ".join(capsys.readouterr().out.split())


def test_quiet_goes_before_or_after_the_command(tmp_path, capsys):
    out = tmp_path / "synthetic"
    assert main(["convert", "synthetic-lt", "--classes", "2", "--max-per-class", "8", "-q",
                 "--test-per-class", "2", "--image-size", "8", "--out", str(out), "--workers", "1"]) == 0
    assert capsys.readouterr().err == ""
    assert main(["info", str(out), "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    parser = build_parser()
    assert parser.parse_args(["info", "d"]).quiet is False  # the top level's default stands
    assert parser.parse_args(["-q", "info", "d"]).quiet is True
    assert parser.parse_args(["bench", "pipeline", "--data", "d", "-q"]).quiet is True  # nested commands too


def test_convert_and_info_report_the_same_size(tmp_path, capsys):
    from pipeline.inspect import dataset_info, split_bytes
    from tools.cmd_data import _human_bytes
    out = tmp_path / "synthetic"
    assert main(["-q", "convert", "synthetic-lt", "--classes", "2", "--max-per-class", "30",
                 "--test-per-class", "5", "--out", str(out), "--workers", "1"]) == 0
    converted = capsys.readouterr().out
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    for split in ("train", "test"):
        row = [ln for ln in converted.splitlines() if ln.strip().startswith(split)][0]
        row_info = [ln for ln in info.splitlines() if ln.strip().startswith(split)][0]
        split_meta = json.loads((out / "meta.json").read_text())["splits"][split]
        expected = _human_bytes(split_bytes(out, split, split_meta))
        assert SIZE.findall(row) == SIZE.findall(row_info) == [expected]
    on_disk = sum(p.stat().st_size for p in (out / "train").glob("[!.]*"))
    assert dataset_info(out)["splits"]["train"]["bytes"] == on_disk


def test_info_says_groups_come_from_training_counts(small, capsys):
    assert main(["info", str(small)]) == 0
    assert "many/medium/few by train count" in capsys.readouterr().out
    assert main(["info", str(small), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["groups_by"] == "train class counts"
    with pytest.raises(SystemExit):
        main(["info", "--help"])
    assert "TRAINING counts" in " ".join(capsys.readouterr().out.split())


def test_train_help_shows_a_list_settings_that_works(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "`iccl train --list-settings`" in capsys.readouterr().out
    assert main(["train", "--list-settings"]) == 0
    assert "preset = synthetic-lt" in capsys.readouterr().out


def test_demo_prints_its_table_only(tmp_path, monkeypatch, capsys):
    import train.runner
    make_converted(tmp_path / "demo" / "data", {"train": (random_images(6, 32), [0, 0, 0, 0, 1, 1])}, 2)
    result = {"top1": 50.0, "many": None, "medium": None, "few": 50.0, "per_class": [50.0, 50.0]}
    monkeypatch.setattr(train.runner, "train", lambda cfg, run: {"stage1": result, "stage2": result})
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "top-1" in out and not any(ln.lstrip().startswith("{") for ln in out.splitlines())


def test_demo_seeds_is_a_seeds_folder_of_iccl_train(tmp_path, monkeypatch, capsys):
    """`iccl demo --seeds 0,1`: one run per training seed in OUT/run-METHOD-seeds/seed-S, the data
    made once, summary.json with mean and std, the mean ± std table; bad seeds are refused first."""
    import train.runner
    make_converted(tmp_path / "demo" / "data", {"train": (random_images(6, 32), [0, 0, 0, 0, 1, 1])}, 2)
    seen = []

    def fake_train(cfg, run):
        seen.append((cfg.seed, cfg.preset, cfg.method, run.name))
        result = {"top1": 50.0 + cfg.seed, "many": None, "medium": None, "few": 40.0, "per_class": [50.0, 50.0]}
        return {"stage1": result, "stage2": result}
    monkeypatch.setattr(train.runner, "train", fake_train)
    assert main(["demo", "--out", str(tmp_path / "demo"), "--method", "ce", "--seeds", "0,1"]) == 0
    assert seen == [(0, "synthetic-lt", "ce", "seed-0"), (1, "synthetic-lt", "ce", "seed-1")]
    summary = json.loads((tmp_path / "demo" / "run-ce-seeds" / "summary.json").read_text())
    assert summary["stage1"]["top1"] == 50.5 and summary["stage1"]["top1_std"] == 0.71
    assert "±" in capsys.readouterr().out
    assert main(["demo", "--out", str(tmp_path / "other"), "--seeds", "0,0"]) == 2
    assert not (tmp_path / "other").exists()


def test_bench_help_names_the_ceiling_decoders_it_uses(tmp_path, capsys):
    from pipeline.dataset import ShardedSplit
    from tools.bench_pipeline import decode_ceiling
    with pytest.raises(SystemExit):
        main(["bench", "pipeline", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "simplejpeg for JPEG, Pillow for PNG" in text and "the ceiling is the faster of the two" in text
    root = make_converted(tmp_path / "j", {"train": (random_images(4, 16), [0, 1, 0, 1])}, 2, ext="jpg")
    rates, bad = decode_ceiling(ShardedSplit(root, "train"), 8, workers=1, batch_size=4)
    assert "simplejpeg" in rates and bad == []


# --- one implementation of each thing ------------------------------------------------------------
def _sources():
    for folder in ("pipeline", "train", "tools", "model"):
        yield from (ROOT / folder).rglob("*.py")


def test_one_atomic_write_implementation():
    """Only pipeline/atomic.py renames files into place; everything else goes through it."""
    users = sorted(str(p.relative_to(ROOT)) for p in _sources() if "os.replace(" in p.read_text())
    assert users == ["pipeline/atomic.py"]


def test_one_list_of_loader_names():
    from pipeline.loaders import LOADER_CHOICES, LOADERS
    from tools.cli import build_parser
    spelled = re.compile(r"""["']resident["'],\s*["']dali["']|resident,dali""")
    assert sorted(str(p.relative_to(ROOT)) for p in _sources() if spelled.search(p.read_text())) == \
        ["pipeline/loaders/__init__.py"]
    sub = build_parser()._subparsers._group_actions[0].choices
    train_loader = next(a for a in sub["train"]._actions if a.dest == "loader")
    assert tuple(train_loader.choices) == LOADER_CHOICES == ("auto", *LOADERS)


def test_help_needs_no_torch():
    """The command lists (loaders, presets, methods) are light to import: --help stays instant."""
    import subprocess
    import sys
    code = "import sys, tools.cli; tools.cli.build_parser(); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
