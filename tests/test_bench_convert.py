"""`iccl bench convert`: both writers on the same images, in one run, and the report."""
from __future__ import annotations

import json

import pytest
import simplejpeg

from helpers import smooth_images
from tools.cli import main


@pytest.mark.slow  # importing ffcv (numba) and starting its writer: ~20 s here
def test_bench_convert_folder(tmp_path):
    pytest.importorskip("ffcv")
    root = tmp_path / "images"
    for k in range(3):
        (root / f"class_{k}").mkdir(parents=True)
        for j, img in enumerate(smooth_images(4, 60, 80, seed=k)):
            (root / f"class_{k}" / f"{j}.jpg").write_bytes(simplejpeg.encode_jpeg(img, 90, colorspace="RGB"))
    out = tmp_path / "bench.json"
    assert main(["-q", "bench", "convert", "folder", "--root", str(root), "--work", str(tmp_path / "w"),
                 "--workers", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    ours, ffcv = report["results"]
    assert (ours["writer"], ffcv["writer"]) == ("ours", "ffcv") and report["images"] == 12
    assert report["ratio_to_ffcv"] == pytest.approx(ours["images_per_s"] / ffcv["images_per_s"])
    assert ours["output_bytes"] > 0 and ffcv["output_bytes"] > 0
    assert not any((tmp_path / "w").iterdir())  # both outputs removed


def test_bench_convert_needs_files(tmp_path, capsys):
    assert main(["bench", "convert", "folder", "--root", str(tmp_path / "none"), "--work", str(tmp_path)]) == 2
    assert "none" in capsys.readouterr().err
