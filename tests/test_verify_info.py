"""`iccl info` / `iccl verify` (pipeline.inspect) and the data commands of the CLI."""
from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest

import tools.cli
from helpers import make_converted, random_images
from pipeline.convert import convert
from pipeline.dataset import ShardedSplit
from pipeline.format import shard_name
from pipeline.inspect import dataset_info, verify
from pipeline.sources.base import Source, SourceSplit
from test_convert import array_source, picture, save


@pytest.fixture(autouse=True)
def only_data_commands(monkeypatch):
    """The CLI with just the commands under test (others may need what these tests do not)."""
    monkeypatch.setattr(tools.cli, "COMMAND_MODULES", ("tools.cmd_data",))


@pytest.fixture
def jpegs(tmp_path) -> Source:
    """JPEG files of 3 classes: 12 / 6 / 3 train samples, 3 val samples."""
    items = [save(tmp_path / f"{i}.jpg", picture(16, 20, seed=i)) for i in range(21)]
    labels = [0] * 12 + [1] * 6 + [2] * 3
    return Source("jpegs", ["a", "b", "c"], {"train": SourceSplit(labels, items),
                                             "val": SourceSplit([0, 1, 2], items[:3])})


@pytest.fixture
def converted(tmp_path, jpegs):
    """`jpegs` converted in shards of 5."""
    convert(jpegs, tmp_path / "out", shard_size=5, workers=1)
    return tmp_path / "out"


# --- info -------------------------------------------------------------------------------------
def test_info(converted):
    info = dataset_info(converted)
    assert info["name"] == "jpegs" and info["classes"] == ["a", "b", "c"]
    train = info["splits"]["train"]
    assert {k: train[k] for k in ("num_samples", "num_classes", "class_counts", "imbalance_ratio",
                                  "many", "medium", "few", "formats")} == {
        "num_samples": 21, "num_classes": 3, "class_counts": [12, 6, 3], "imbalance_ratio": 4.0,
        "many": 0, "medium": 0, "few": 3, "formats": ["webdataset"]}
    on_disk = sum(p.stat().st_size for p in (converted / "train").glob("[!.]*"))
    assert train["bytes"] == on_disk
    assert info["splits"]["val"]["num_samples"] == 3


def test_cli_info_json(converted, capsys):
    assert tools.cli.main(["info", str(converted), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(dataset_info(converted)))
    assert set(printed["splits"]["val"]) == {"num_samples", "num_classes", "class_counts",
                                             "imbalance_ratio", "many", "medium", "few",
                                             "formats", "bytes"}


def test_cli_info_table_and_errors(converted, tmp_path, capsys):
    assert tools.cli.main(["info", str(converted)]) == 0
    out = capsys.readouterr().out
    assert "jpegs" in out and "train" in out and "21" in out
    assert tools.cli.main(["info", str(tmp_path / "nothing")]) == 2
    assert "no such folder" in capsys.readouterr().err


# --- verify -----------------------------------------------------------------------------------
def test_verify_accepts_an_intact_dataset(converted, tmp_path, capsys):
    assert verify(converted, workers=1) == []
    assert verify(converted, workers=2) == []
    made = make_converted(tmp_path / "made", {"train": (random_images(9, 8), np.arange(9) % 3)}, 3)
    assert verify(made, workers=1) == []  # no shard checksums in meta: the rest is still checked
    assert tools.cli.main(["verify", str(converted), "--workers", "1"]) == 0
    assert "OK: 24 samples in 6 shards verified" in capsys.readouterr().out


def test_verify_finds_a_flipped_byte_inside_an_image(converted):
    ds = ShardedSplit(converted, "train")
    row = ds.index[7]
    path = ds.shard_path(int(row["shard"]))
    data = bytearray(path.read_bytes())
    data[int(row["offset"]) + int(row["size"]) // 2] ^= 0x55
    path.write_bytes(bytes(data))
    problems = verify(converted, workers=1)
    assert problems and all(str(path) in p for p in problems)
    assert "checksum" in problems[0] and f"Delete {path.name}" in problems[0]


def test_verify_finds_a_flipped_byte_without_checksums(tmp_path):
    """Without checksums, decoding every image is what finds damage (PNG data is checksummed)."""
    root = make_converted(tmp_path / "made", {"train": (random_images(6, 8), np.arange(6) % 2)}, 2)
    ds = ShardedSplit(root, "train")
    path, row = ds.shard_path(0), ds.index[2]
    data = bytearray(path.read_bytes())
    data[int(row["offset"]) + 40] ^= 0xFF
    path.write_bytes(bytes(data))
    problems = verify(root, workers=1)
    assert len(problems) == 1 and "000000002.png does not decode" in problems[0]


def test_verify_finds_truncated_and_missing_shards(converted, capsys):
    truncated = converted / "train" / shard_name(1)
    truncated.write_bytes(truncated.read_bytes()[:3000])
    missing = converted / "train" / shard_name(3)
    missing.unlink()
    problems = verify(converted, workers=1)
    assert any(str(truncated) in p for p in problems)
    assert any(str(missing) in p and "missing" in p and "rewrites missing shards" in p
               for p in problems)
    assert tools.cli.main(["verify", str(converted), "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert f"problems in {converted}" in out and str(missing) in out


def test_verify_finds_a_wrong_label_member(converted):
    ds = ShardedSplit(converted, "train")
    path = ds.shard_path(0)
    data = path.read_bytes()
    cls_at = int(ds.index[0]["offset"] + ds.index[0]["size"])
    cls_at += -cls_at % 512 + 512  # past the image's padding and the .cls header
    assert data[cls_at:cls_at + 1] == b"0"
    path.write_bytes(data[:cls_at] + b"2" + data[cls_at + 1:])
    meta = json.loads((converted / "meta.json").read_text())
    meta["splits"]["train"].pop("shard_sha256")  # so that the label check itself is what fires
    (converted / "meta.json").write_text(json.dumps(meta))
    problems = verify(converted, workers=1)
    assert len(problems) == 1 and "000000000.cls holds b'2', the index says 0" in problems[0]


def test_verify_finds_counts_that_disagree_with_meta(converted):
    meta = json.loads((converted / "meta.json").read_text())
    meta["splits"]["train"]["class_counts"] = [11, 7, 3]
    (converted / "meta.json").write_text(json.dumps(meta))
    problems = verify(converted, workers=1)
    assert len(problems) == 1 and "class counts differ" in problems[0]


def test_verify_of_a_folder_that_is_not_a_dataset(tmp_path, capsys):
    """Only an unfinished conversion (convert.json, no meta.json) is told to rerun the conversion
    into the folder: converting into a run folder or an empty one would not be what was meant."""
    assert "not a converted dataset (no meta.json). Pass the --out of `iccl convert`" in verify(tmp_path)[0]
    assert tools.cli.main(["verify", str(tmp_path)]) == 2
    (tmp_path / "config.json").write_text("{}")
    assert f"holds a training run (config.json): `iccl eval --run {tmp_path}`" in verify(tmp_path)[0]
    (tmp_path / "convert.json").write_text("{}")
    assert "did not finish. Run the same `iccl convert ... --out" in verify(tmp_path)[0]


@pytest.mark.slow
def test_verify_checks_the_ffcv_file(converted, jpegs):
    from pipeline.ffcv_writer import write_mode

    convert(jpegs, converted, shard_size=5, workers=1, ffcv=True)
    assert write_mode(ShardedSplit(converted, "train")) == "jpg"
    assert verify(converted, workers=1) == []
    beton = converted / "val.beton"
    beton.write_bytes(beton.read_bytes()[:100])
    problems = verify(converted, workers=1)
    assert len(problems) == 1 and str(beton) in problems[0] and "--ffcv" in problems[0]


# --- convert command --------------------------------------------------------------------------
def test_cli_convert_passes_the_options(tmp_path, monkeypatch, capsys):
    asked = {}

    def fake_synthetic(**kwargs):
        asked.update(kwargs)
        return array_source(n=kwargs["num_classes"] * 4, num_classes=kwargs["num_classes"])
    monkeypatch.setitem(sys.modules, "pipeline.sources.synthetic",
                        types.SimpleNamespace(make_synthetic_lt=fake_synthetic))
    out = tmp_path / "out"
    assert tools.cli.main(["-q", "convert", "synthetic-lt", "--classes", "3", "--image-size", "16",
                           "--out", str(out), "--shard-size", "5", "--workers", "1"]) == 0
    assert asked == {"num_classes": 3, "image_size": 16, "imbalance": 100.0, "max_per_class": 500,
                     "test_per_class": 100, "val_per_class": 100, "seed": 0}
    assert "arrays -> " in capsys.readouterr().out
    assert json.loads((out / "meta.json").read_text())["options"]["shard_size"] == 5


@pytest.mark.parametrize("argv, message", [
    (["convert", "cifar10-lt"], "cifar10-lt needs --source PATH"),
    (["convert", "imagenet-lt", "--root", "x"], "imagenet-lt needs --lists PATH"),
    (["convert", "folder", "--root", "x", "--imbalance", "5"], "--imbalance does not apply to folder"),
])
def test_cli_convert_option_errors(tmp_path, capsys, argv, message):
    assert tools.cli.main(argv + ["--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err


def test_cli_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        tools.cli.main(["convert", "--help"])
    text = capsys.readouterr().out
    for flag in ("--source", "--imbalance", "--seed", "--root", "--lists", "--classes",
                 "--image-size", "--max-per-class", "--test-per-class", "--max-side", "--quality",
                 "--shard-size", "--workers", "--ffcv", "--on-error", "examples:"):
        assert flag in text
