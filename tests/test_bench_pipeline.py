"""`iccl bench pipeline` end to end on tiny data, and the bench-data generator."""
from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import make_converted, random_images
from tools import bench_data
from tools.cli import main

pytest.importorskip("nvidia.dali")

RESULT_KEYS = {"loader", "images_per_s", "ratio_to_reference", "fraction_of_decode_ceiling",
               "fraction_of_floor", "steps", "batch_size"}


def check_report(report: dict, loaders: list[str], steps: int, batch: int) -> dict:
    """The JSON schema; returns the rows by loader."""
    rows = {r["loader"]: r for r in report["results"]}
    assert [r["loader"] for r in report["results"]] == loaders
    for r in report["results"]:
        assert RESULT_KEYS <= set(r) and r["steps"] == steps and r["batch_size"] == batch
        if r["images_per_s"] is not None:
            assert r["images_per_s"] > 0 and r["fraction_of_decode_ceiling"] > 0
    assert rows["reference"]["ratio_to_reference"] == pytest.approx(1.0)
    assert report["decode_ceiling_images_per_s"] == max(report["decoders"].values())
    assert report["decoder"] in report["decoders"]
    assert report["floor_images_per_s"] > 0
    assert set(report["machine"]) == {"usable_cpus", "torch", "cuda_device"}
    return rows


def test_bench_pipeline_writes_the_report(tmp_path, capsys):
    root = make_converted(tmp_path / "data", {"train": (random_images(96, 32), np.arange(96) % 4)}, 4)
    out = tmp_path / "bench.json"
    rc = main(["-q", "bench", "pipeline", "--data", str(root), "--steps", "2", "--warmup", "1",
               "--batch-size", "16", "--workers", "1", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    rows = check_report(report, ["resident", "dali", "ffcv", "reference"], 2, 16)
    assert rows["ffcv"]["images_per_s"] is None and "beton" in rows["ffcv"]["skipped"]
    assert report["augment"]["kind"] == "pad_crop" and report["decoders"].keys() == {"pillow", "dali-cpu"}
    table = capsys.readouterr().out
    assert "decode-only ceiling" in table and "floor" in table and "skipped" in table


def test_bench_pipeline_needs_data(capsys):
    assert main(["bench", "pipeline"]) == 2
    assert "--make-data" in capsys.readouterr().err
    assert main(["bench"]) == 1  # no WHAT: the help of `iccl bench`


def test_bench_data_labels_are_long_tailed():
    labels = bench_data.long_tailed_labels(2000, np.random.default_rng(0))
    counts = np.bincount(labels, minlength=bench_data.NUM_CLASSES)
    assert counts.sum() == 2000 and counts.min() >= 1
    assert (np.diff(counts) <= 0).all() and counts[0] / counts[-1] == pytest.approx(10, rel=0.1)


def test_photo_mosaic_is_photo_sized():
    rng = np.random.default_rng(0)
    grain = rng.normal(0, bench_data.GRAIN, (600, 600, 3)).astype(np.float32)
    tiles, content = bench_data.photo_tiles(None, rng)
    assert content == "smooth-noise tiles" and tiles.shape == (2000, 32, 32, 3)
    img = bench_data.photo_mosaic(tiles, 375, 500, grain, rng)
    assert img.shape == (375, 500, 3) and img.dtype == np.uint8 and img.std() > 20


def test_photo_tiles_are_the_cifar10_test_images(cifar10_bin):
    from pipeline.sources.cifar import read_cifar
    tiles, content = bench_data.photo_tiles(cifar10_bin / "cifar-10-binary.tar.gz", np.random.default_rng(0))
    assert content == "CIFAR-10 test images" and tiles.shape == (10000, 32, 32, 3)
    np.testing.assert_array_equal(tiles, read_cifar(cifar10_bin, 10).test_images)


def test_other_bench_data_in_the_folder_is_refused_before_any_picture(tmp_path, monkeypatch):
    from pipeline.errors import DataError
    bench_data.make_bench_data(tmp_path / "d", images=10, tiny=True, workers=1)
    monkeypatch.setattr(bench_data, "photo_mosaic", None)  # making a picture now would fail
    with pytest.raises(DataError, match="holds other data"):
        bench_data.make_bench_data(tmp_path / "d", images=12, tiny=False, workers=1)


def test_tiles_from_something_else_is_a_clear_error(tmp_path, capsys):
    bogus = tmp_path / "photos.tar.gz"
    bogus.write_bytes(b"not a tar")
    args = ["bench", "pipeline", "--make-data", str(tmp_path / "d"), "--images", "10", "--tiles-from", str(bogus)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert str(bogus) in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow  # writes photos and a .beton, runs every loader twice, FFCV compiles: ~10 s
def test_bench_pipeline_make_data_photos(tmp_path):
    out = tmp_path / "bench.json"
    data = tmp_path / "photos"
    args = ["-q", "bench", "pipeline", "--make-data", str(data), "--images", "40", "--steps", "6",
            "--warmup", "1", "--batch-size", "8", "--json", str(out)]
    assert main(args) == 0
    report = json.loads(out.read_text())
    # 40 images at batch 8 are 5 steps an epoch: warm-up + 6 timed steps cross an epoch end.
    rows = check_report(report, ["resident", "dali", "ffcv", "reference"], 6, 8)
    assert report["augment"]["kind"] == "rrc" and report["decoder"] in ("simplejpeg", "dali-cpu")
    assert rows["dali"]["images_per_s"] and rows["ffcv"]["images_per_s"]
    assert rows["dali"]["pipeline_builds"] == 1
    # The photos come in several shapes, which the resident loader does not take.
    assert rows["resident"]["images_per_s"] is None and "one size" in rows["resident"]["skipped"]
    assert main(args) == 0  # a rerun reuses the data
