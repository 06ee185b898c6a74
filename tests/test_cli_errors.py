"""Faults a user can cause, on every subcommand: exit status 2, one message on stderr, no traceback,
nothing written before the checks, and a rerun after the fix that works."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import make_converted, random_images
from tools.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A converted dataset: 5 training images of 2 classes (32x32 PNG), 4 test images."""
    root = tmp_path_factory.mktemp("tiny") / "data"
    return make_converted(root, {"train": (random_images(5, 32, seed=1), [0, 0, 0, 1, 1]),
                                 "test": (random_images(4, 32, seed=2), [0, 1, 0, 1])}, 2)


@pytest.fixture(scope="module")
def cut(tmp_path_factory) -> Path:
    """A converted dataset whose meta.json class list was cut by hand (3 classes -> 2)."""
    root = tmp_path_factory.mktemp("cut") / "data"
    make_converted(root, {"train": (random_images(6, 32, seed=3), [0, 0, 1, 1, 2, 2]),
                          "test": (random_images(3, 32, seed=4), [0, 1, 2])}, 3)
    meta = json.loads((root / "meta.json").read_text())
    meta["classes"] = meta["classes"][:2]
    (root / "meta.json").write_text(json.dumps(meta))
    return root


@pytest.fixture(scope="module")
def a_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("file") / "not-a-folder"
    path.write_text("x")
    return path


UNWRITABLE = "/sys/iccl-cannot-write-here"  # sysfs: no one may create a folder in it


def _unwritable() -> bool:
    try:
        os.mkdir(UNWRITABLE)
    except OSError:
        return True
    os.rmdir(UNWRITABLE)
    return False


TRAIN = ["train", "--preset", "synthetic-lt", "--data", "{tiny}", "--out", "{out}"]
# (case name, argv with {tiny} {cut} {file} {out} {tmp} placeholders, words the message must hold)
BAD_INPUTS = [
    ("negative lr", TRAIN + ["--lr", "-0.1"], "lr=-0.1: must be > 0"),
    ("unknown arch", TRAIN + ["--set", "arch=resnet999"], "arch='resnet999'"),
    ("seeds not numbers", TRAIN + ["--seeds", "a,b"], "--seeds a,b"),
    ("seeds repeated", TRAIN + ["--seeds", "1,1"], "--seeds 1,1"),
    ("seed and seeds", TRAIN + ["--seeds", "1,2", "--seed", "3"], "give one"),
    ("negative workers", TRAIN + ["--loader", "reference", "--workers", "-1"], "workers=-1"),
    ("unknown method by --set", TRAIN + ["--set", "method=xx"], "method='xx'"),
    ("flag and --set disagree", TRAIN + ["--batch-size", "5", "--set", "batch_size=3"],
     "--batch-size 5 and --set batch_size=3"),
    ("nan lr", TRAIN + ["--set", "lr=nan"], "lr=nan"),
    ("two-value mean", TRAIN + ["--set", "mean=0.5,0.5"], "mean="),
    ("unknown amp", TRAIN + ["--set", "amp=half"], "amp='half'"),
    ("unknown schedule", TRAIN + ["--set", "schedule=linear"], "schedule='linear'"),
    ("unknown device", TRAIN + ["--device", "gpu"], "device='gpu'"),
    ("wrong type", TRAIN + ["--set", "epochs=ten"], "--set epochs=ten"),
    ("no such setting", TRAIN + ["--set", "nope=1"], "no such setting"),
    ("unknown preset", ["train", "--preset", "nope", "--out", "{out}"], "invalid choice: 'nope'"),
    ("unknown loader", TRAIN + ["--loader", "fast"], "invalid choice: 'fast'"),
    ("batch larger than the split", TRAIN + ["--batch-size", "8"], "--batch-size 8"),
    ("out is a file", ["train", "--preset", "synthetic-lt", "--data", "{tiny}", "--out", "{file}",
                       "--batch-size", "4"],
     "is a file"),
    ("meta.json cut by hand (train)", ["train", "--preset", "synthetic-lt", "--data", "{cut}",
                                       "--out", "{out}"], "iccl verify"),
    ("eval of no run", ["eval", "--run", "{out}"], "not a run directory"),
    ("eval loader", ["eval", "--run", "{out}", "--loader", "x"], "invalid choice"),
    ("convert out is a file", ["convert", "synthetic-lt", "--out", "{file}"], "is a file"),
    ("convert quality", ["convert", "synthetic-lt", "--out", "{out}", "--quality", "0"], "--quality 0"),
    ("convert workers", ["convert", "synthetic-lt", "--out", "{out}", "--workers", "0"], "--workers 0"),
    ("convert missing root", ["convert", "folder", "--root", "{tmp}/none", "--out", "{out}"],
     "no such folder"),
    ("convert val-per-class for a folder", ["convert", "folder", "--root", "{tmp}", "--out", "{out}",
                                            "--val-per-class", "3"], "--val-per-class does not apply"),
    ("convert negative val-per-class", ["convert", "synthetic-lt", "--out", "{out}", "--val-per-class", "-1"],
     "--val-per-class -1: must be 0"),
    ("info of no dataset", ["info", "{tmp}/none"], "no such folder"),
    ("info of a cut meta.json", ["info", "{cut}"], "iccl verify"),
    ("verify workers", ["verify", "{tiny}", "--workers", "0"], "--workers 0"),
    ("bench pipeline without data", ["bench", "pipeline"], "--data DIR"),
    ("bench pipeline unknown loader", ["bench", "pipeline", "--data", "{tiny}", "--loaders", "x"],
     "unknown loader 'x'"),
    ("bench pipeline cut meta.json", ["bench", "pipeline", "--data", "{cut}"], "iccl verify"),
    ("bench train variants", ["bench", "train", "--variants", "slow"], "--variants"),
    ("bench train bad setting", ["bench", "train", "--set", "tau=0"], "tau=0"),
    ("reproduce seeds", ["reproduce", "cifar10-lt", "--source", "{tmp}/x", "--out", "{out}",
                         "--seeds", "x"], "--seeds x"),
    ("reproduce methods", ["reproduce", "cifar10-lt", "--source", "{tmp}/x", "--out", "{out}",
                           "--methods", "ce,foo"], "--methods"),
    ("demo out is a file", ["demo", "--out", "{file}"], "--out"),
    ("demo epochs", ["demo", "--out", "{out}", "--epochs", "0"], "epochs=0"),
]
UNWRITABLE_INPUTS = [
    ("train out unwritable", ["train", "--preset", "synthetic-lt", "--data", "{tiny}",
                              "--batch-size", "4", "--out", UNWRITABLE + "/run"], "cannot write there"),
    ("convert out unwritable", ["convert", "synthetic-lt", "--out", UNWRITABLE + "/data"],
     "cannot write there"),
]


@pytest.mark.parametrize("name, argv, words", BAD_INPUTS + UNWRITABLE_INPUTS,
                         ids=[c[0] for c in BAD_INPUTS + UNWRITABLE_INPUTS])
def test_every_command_refuses_bad_input_in_one_line(name, argv, words, tiny, cut, a_file, tmp_path,
                                                     capsys):
    if UNWRITABLE in " ".join(argv) and not _unwritable():
        pytest.skip(f"{UNWRITABLE} is writable here")
    out = tmp_path / "out"
    places = dict(tiny=tiny, cut=cut, file=a_file, out=out, tmp=tmp_path)
    try:
        status = main([a.format(**places) for a in argv])
    except SystemExit as e:  # argparse's own refusals (unknown choices) exit from inside main
        status = e.code
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert status == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1 and "error:" in lines[0], err
    assert words in lines[0]
    assert not out.exists(), "a refused command must not write anything"


def test_a_refused_training_run_can_be_fixed_and_rerun(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["-q", "train", "--preset", "synthetic-lt", "--data", str(tiny), "--out", str(run),
            "--epochs", "1", "--set", "s2_epochs=1", "--set", "lr_warmup_epochs=0",
            "--loader", "resident", "--workers", "0"]
    assert main(argv + ["--batch-size", "8"]) == 2  # 8 > 5 training images
    assert "Lower the batch size (at most 5)" in capsys.readouterr().err
    assert not (run / "config.json").exists()
    assert main(argv + ["--batch-size", "4"]) == 0  # the corrected rerun into the same --out
    assert json.loads((run / "config.json").read_text())["batch_size"] == 4
    assert (run / "final.pt").is_file()


def test_set_method_is_the_method(tiny):
    from train.config import resolve
    assert resolve("synthetic-lt", overrides={"method": "ce"}) == resolve("synthetic-lt", "ce")
    assert resolve("synthetic-lt", overrides={"method": "ce"}).s2_reinit_classifier  # cRT's stage 2
    assert resolve("synthetic-lt", overrides={"batch_size": "5"}, batch_size=5).batch_size == 5


# --- convert: a stop at a bad item does not block the fixed rerun ------------------------------
def _image_tree(root: Path, classes=("a", "b"), n: int = 3) -> Path:
    from PIL import Image
    for k, c in enumerate(classes):
        d = root / c
        d.mkdir(parents=True)
        for i, img in enumerate(random_images(n, 8, seed=k)):
            Image.fromarray(img).save(d / f"{i}.png")
    return root


@pytest.mark.parametrize("fix", ["remove", "replace"])
def test_convert_stopped_at_a_bad_item_reruns_after_the_fix(tmp_path, capsys, fix):
    src = _image_tree(tmp_path / "src")
    link = src / "a" / "9.png"
    link.symlink_to(tmp_path / "nowhere.png")  # a dangling symlink
    argv = ["-q", "convert", "folder", "--root", str(src), "--out", str(tmp_path / "out"),
            "--workers", "1"]
    assert main(argv) == 2
    assert f"{link}: file not found" in capsys.readouterr().err
    link.unlink()
    if fix == "replace":
        (src / "a" / "0.png").rename(link)
    assert main(argv) == 0, capsys.readouterr().err
    from pipeline.dataset import ShardedSplit
    assert len(ShardedSplit(tmp_path / "out", "train")) == 6 if fix == "replace" else 5


def test_convert_still_refuses_a_different_request_over_an_interrupted_one(tmp_path, capsys):
    from pipeline.format import REQUEST_FILE
    src = _image_tree(tmp_path / "src")
    out = tmp_path / "out"
    assert main(["-q", "convert", "folder", "--root", str(src), "--out", str(out), "--workers", "1"]) == 0
    (out / "meta.json").unlink()  # as if killed before the end: no stop at a bad item recorded
    assert "stopped_at_bad_input" not in (out / REQUEST_FILE).read_text()
    assert main(["-q", "convert", "synthetic-lt", "--out", str(out)]) == 2
    assert "holds a different conversion" in capsys.readouterr().err


def test_class_folder_names_that_are_not_utf8(tmp_path, capsys):
    src = _image_tree(tmp_path / "src")
    odd = os.fsdecode(os.fsencode(str(src)) + b"/b\xff")  # surrogate-escaped, as os.listdir gives it
    os.rename(src / "b", odd)
    out = tmp_path / "out"
    assert main(["-q", "convert", "folder", "--root", str(src), "--out", str(out), "--workers", "1"]) == 0
    assert main(["-q", "convert", "folder", "--root", str(src), "--out", str(out), "--workers", "1"]) == 0
    assert main(["info", str(out)]) == 0
    assert main(["info", str(out), "--json"]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    from pipeline.dataset import ShardedSplit
    assert os.fsencode(ShardedSplit(out, "train").classes[1]) == b"b\xff"


def test_a_closed_stdout_is_status_141(monkeypatch, capsys):  # capsys: no real stdout fd to redirect
    """BrokenPipeError from a command (its reader went away) ends quietly with 128 + SIGPIPE."""
    import tools.cmd_data
    from tools.cli import CLOSED_PIPE

    def closed(args):
        raise BrokenPipeError
    monkeypatch.setattr(tools.cmd_data, "_info", closed)
    assert CLOSED_PIPE == 141 and main(["info", "anything"]) == 141


# --- a closed stdout ---------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["info", "{tiny}", "--json"], ["train", "--list-settings"]])
def test_a_closed_pipe_ends_quietly(argv, tiny):
    proc = subprocess.Popen([sys.executable, "-m", "tools.cli", *[a.format(tiny=tiny) for a in argv]],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # like `| head -0`: the reader is gone before anything is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) in (0, 141)  # 0: it had nothing to write yet
    assert "Traceback" not in err and "BrokenPipe" not in err, err


# --- datasets with damage ----------------------------------------------------------------------
def test_bench_decode_ceiling_skips_a_corrupt_sample(tmp_path):
    from pipeline.dataset import ShardedSplit
    from tools.bench_pipeline import decode_ceiling
    root = make_converted(tmp_path / "d", {"train": (random_images(8, 16, seed=5), np.arange(8) % 2)}, 2)
    ds = ShardedSplit(root, "train")
    row = ds.index[3]
    shard = ds.shard_path(int(row["shard"]))
    data = bytearray(shard.read_bytes())
    data[int(row["offset"]) + 8:int(row["offset"]) + int(row["size"])] = b"\0" * (int(row["size"]) - 8)
    shard.write_bytes(bytes(data))
    rates, bad = decode_ceiling(ShardedSplit(root, "train"), 16, workers=1, batch_size=4)
    assert bad == [3]
    assert "pillow" in rates and all(r > 0 for r in rates.values())  # PNGs are decoded by Pillow


def test_meta_json_cut_by_hand_is_found_by_verify_and_refused_by_readers(cut, capsys):
    from pipeline.dataset import ShardedSplit
    from pipeline.errors import DataError
    with pytest.raises(DataError, match="meta.json lists 2 classes but 3 class counts"):
        ShardedSplit(cut, "train")
    assert main(["verify", str(cut), "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("2 problems in") and "labels out of range" in out


def test_verify_blames_a_damaged_index_not_the_intact_shard(tmp_path, capsys):
    from pipeline.format import INDEX_FILE
    src = _image_tree(tmp_path / "src")
    out = tmp_path / "out"
    argv = ["-q", "convert", "folder", "--root", str(src), "--out", str(out), "--workers", "1"]
    assert main(argv) == 0
    index = np.load(out / "train" / INDEX_FILE)
    index["offset"][1] += 512
    np.save(out / "train" / INDEX_FILE, index)
    assert main(["verify", str(out), "--workers", "1"]) == 1
    report = capsys.readouterr().out
    assert "itself is intact" in report and f"delete {out / 'train' / INDEX_FILE}" in report
    assert "Delete shard-000000.tar" not in report
    (out / "train" / INDEX_FILE).unlink()  # the advice, followed
    assert main(argv) == 0
    assert main(["verify", str(out), "--workers", "1"]) == 0


def test_an_index_with_rows_missing_is_rebuilt_as_advised(tmp_path, capsys):
    from pipeline.format import INDEX_FILE
    src = _image_tree(tmp_path / "src")
    out = tmp_path / "out"
    argv = ["-q", "convert", "folder", "--root", str(src), "--out", str(out), "--workers", "1"]
    assert main(argv) == 0
    index_path = out / "train" / INDEX_FILE
    np.save(index_path, np.load(index_path)[:-1])
    assert main(["info", str(out)]) == 2
    assert f"Delete {index_path} and rerun the same `iccl convert`" in capsys.readouterr().err
    assert main(["verify", str(out), "--workers", "1"]) == 1
    assert "Delete shard" not in capsys.readouterr().out
    index_path.unlink()
    assert main(argv) == 0
    assert main(["verify", str(out), "--workers", "1"]) == 0
