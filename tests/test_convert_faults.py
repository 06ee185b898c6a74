"""Conversion faults that must never pass silently: high bit-depth pixels, degenerate image sizes,
shards emptied by --on-error skip (each case against an independent reference or reader)."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from helpers import check_field_readers
from pipeline.convert import convert
from pipeline.convert_items import MIN_SIDE, scale_16_to_8
from pipeline.dataset import ShardedSplit
from pipeline.errors import DataError
from pipeline.format import shard_name
from pipeline.inspect import verify
from pipeline.sources.base import Source, SourceSplit
from tools.cli import main as cli


def file_source(items, labels, num_classes: int = 2, test=None) -> Source:
    splits = {"train": SourceSplit(np.asarray(labels), [str(p) for p in items],
                                   [f"list.txt:{i + 1}" for i in range(len(items))])}
    if test is not None:
        splits["test"] = SourceSplit(np.asarray(test[1]), [str(p) for p in test[0]])
    return Source("files", [f"c{k}" for k in range(num_classes)], splits, {"root": "tests"})


def ramp16(h: int, w: int, channels: int, seed: int = 0) -> np.ndarray:
    """16-bit pixels spread over the whole range (a smooth ramp plus noise), (H, W[, C]) uint16."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = (x / max(w - 1, 1) * 40000 + y / max(h - 1, 1) * 25000)[..., None]
    base = base + np.arange(channels) * 300 + rng.integers(-200, 200, (h, w, channels))
    out = np.clip(base, 0, 65535).astype(np.uint16)
    return out[..., 0] if channels == 1 else out


def write16(path, pixels: np.ndarray) -> str:
    """Write 16-bit pixels (RGB[A] order) with OpenCV, which stores them at full depth."""
    bgr = pixels if pixels.ndim == 2 else pixels[..., [2, 1, 0, 3][:pixels.shape[2]]]
    assert cv2.imwrite(str(path), bgr)
    return str(path)


def reference8(pixels: np.ndarray) -> np.ndarray:
    """The float64 reference: round(v * 255 / 65535), grey replicated, alpha dropped."""
    rgb = np.repeat(pixels[..., None], 3, axis=2) if pixels.ndim == 2 else pixels[..., :3]
    return np.rint(rgb.astype(np.float64) * 255.0 / 65535.0).astype(np.uint8)


# --- 3. high bit-depth images -------------------------------------------------------------------
def test_16_to_8_bit_scaling_matches_float64_on_every_value():
    v = np.arange(65536, dtype=np.uint16)
    np.testing.assert_array_equal(scale_16_to_8(v), np.rint(v / 65535.0 * 255.0).astype(np.uint8))
    assert scale_16_to_8(np.array([0, 128, 129, 65535], np.uint16)).tolist() == [0, 0, 1, 255]


def test_16_bit_pngs_become_the_right_8_bit_image_and_are_counted(tmp_path):
    cases = {"grey": ramp16(20, 30, 1), "rgb": ramp16(20, 30, 3, seed=1),
             "rgba": ramp16(20, 30, 4, seed=2)}
    files = [write16(tmp_path / f"{name}.png", px) for name, px in cases.items()]
    eight_bit = str(tmp_path / "plain.png")
    Image.fromarray(reference8(cases["rgb"])).save(eight_bit)
    meta = convert(file_source(files + [eight_bit], [0, 1, 0, 1]), tmp_path / "out", workers=1)
    ds = ShardedSplit(tmp_path / "out", "train")
    for i, px in enumerate(cases.values()):
        assert ds.ext(i) == "png"  # lossless stays lossless
        np.testing.assert_array_equal(ds.decode(i), reference8(px))
    # The old behaviour clipped a 16-bit grey image: almost every pixel 255. Not any more.
    assert (ds.decode(0) == 255).mean() < 0.05
    assert meta["splits"]["train"]["converted_to_rgb"] == 3  # the three 16-bit files, not the 8-bit one
    assert verify(tmp_path / "out") == []


@pytest.mark.parametrize("channels, maxval", [(1, 4095), (1, 65535), (3, 65535), (3, 1023)])
def test_16_bit_pgm_and_ppm_become_the_right_8_bit_image(tmp_path, channels, maxval):
    """Netpbm files with maxval > 255: the full scale is the header's maxval, whatever the bit
    depth (Pillow reads 16-bit PGM as 32-bit integers, refused before this case was handled)."""
    px = (ramp16(40, 48, channels, seed=5).astype(np.int64) * maxval // 65535).astype(">u2")
    h, w = px.shape[:2]
    path = tmp_path / ("a.pgm" if channels == 1 else "a.ppm")
    header = f"P{5 if channels == 1 else 6}\n# made by a test\n{w} {h}\n{maxval}\n".encode()
    path.write_bytes(header + px.tobytes())
    meta = convert(file_source([path], [0], num_classes=1), tmp_path / "out", workers=1, quality=95)
    got = ShardedSplit(tmp_path / "out", "train").decode(0).astype(int)
    rgb = np.repeat(px[..., None], 3, axis=2) if channels == 1 else px
    err = np.abs(got - np.rint(rgb.astype(np.float64) * 255 / maxval))  # stored as JPEG: close
    assert err.mean() < 1.5 and err.max() <= 12
    assert meta["splits"]["train"]["converted_to_rgb"] == 1


@pytest.mark.parametrize("channels", [1, 3])
def test_16_bit_tiffs_become_the_right_8_bit_image(tmp_path, channels):
    px = ramp16(40, 48, channels, seed=channels)
    meta = convert(file_source([write16(tmp_path / "a.tif", px)], [0], num_classes=1), tmp_path / "out",
                   workers=1, quality=95)
    got = ShardedSplit(tmp_path / "out", "train").decode(0).astype(int)
    err = np.abs(got - reference8(px))  # TIFF is stored as JPEG (module rule): close, not exact
    assert err.mean() < 1.5 and err.max() <= 12
    assert meta["splits"]["train"]["converted_to_rgb"] == 1


def test_floating_point_images_are_refused_with_a_message(tmp_path):
    path = tmp_path / "f.tif"
    Image.fromarray(np.random.default_rng(0).random((20, 20), dtype=np.float32)).save(path)
    with pytest.raises(DataError, match=r"f\.tif \(listed at list.txt:1\): floating-point pixels"):
        convert(file_source([path], [0], num_classes=1), tmp_path / "out", workers=1)


# --- 4. degenerate sizes: refused at conversion, once for every loader ---------------------------
def _png(path, h, w, seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize("h, w", [(1, 1), (1, 40), (40, 1), (MIN_SIDE - 1, 300)])
@pytest.mark.parametrize("fmt", ["png", "jpg", "array"])
def test_images_with_a_side_under_the_minimum_are_refused(tmp_path, h, w, fmt):
    good = [_png(tmp_path / f"g{i}.png", 16, 16, seed=i) for i in range(2)]
    if fmt == "array":
        pixels = np.zeros((h, w, 3), np.uint8)
        source = Source("arrays", ["a", "b"], {"train": SourceSplit(
            np.array([0, 1, 1]), [np.zeros((16, 16, 3), np.uint8), pixels, np.ones((16, 16, 3), np.uint8)])})
        name = "train sample 1"
    else:
        bad = tmp_path / f"bad.{fmt}"
        Image.new("RGB", (w, h)).save(bad)
        source = file_source([good[0], bad, good[1]], [0, 1, 1])
        name = str(bad)
    with pytest.raises(DataError, match=rf"{name}.*image of {w}x{h} pixels.*--on-error skip"):
        convert(source, tmp_path / "out", workers=1)
    meta = convert(source, tmp_path / "out", workers=1, on_error="skip")  # the rerun resumes
    assert meta["splits"]["train"]["num_samples"] == 2
    skipped = json.loads((tmp_path / "out" / "skipped.json").read_text())
    assert [s["position"] for s in skipped] == [1] and f"{w}x{h}" in skipped[0]["reason"]


def test_max_side_may_not_shrink_a_side_under_the_minimum(tmp_path):
    long = _png(tmp_path / "long.png", 10, 400)
    with pytest.raises(DataError, match=r"10x400|400x10.*once shrunk to --max-side 100"):
        convert(file_source([long], [0], num_classes=1), tmp_path / "out", workers=1, max_side=100)


def test_cli_convert_names_the_tiny_image(tmp_path, capsys):
    root = tmp_path / "src"
    for k in ("a", "b"):
        (root / k).mkdir(parents=True)
        _png(root / k / "ok.png", 12, 12)
    Image.new("RGB", (40, 1)).save(root / "b" / "line.png")
    code = cli(["-q", "convert", "folder", "--root", str(root), "--out", str(tmp_path / "out"),
                "--workers", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "line.png" in err and "40x1 pixels" in err and "Traceback" not in err


SMALLEST = {"mixed": [(MIN_SIDE, 40), (40, MIN_SIDE), (MIN_SIDE, MIN_SIDE), (30, 20)],
            "flat": [(MIN_SIDE, 40)], "tall": [(40, MIN_SIDE)], "square": [(MIN_SIDE, MIN_SIDE)]}


@pytest.fixture(scope="module")
def smallest(tmp_path_factory):
    """Datasets of images at the smallest size a conversion keeps (MIN_SIDE x 40, 40 x MIN_SIDE,
    MIN_SIDE square; "mixed" holds them all next to an ordinary size), train and test, with FFCV
    files; made on first use."""
    made = {}

    def get(kind):
        if kind not in made:
            tmp = tmp_path_factory.mktemp(kind)
            sizes = (SMALLEST[kind] * 16)[:16]
            train = [_png(tmp / f"tr{i}.png", h, w, seed=i) for i, (h, w) in enumerate(sizes)]
            test = [_png(tmp / f"te{i}.jpg", h, w, seed=50 + i) for i, (h, w) in enumerate(sizes[:8])]
            source = file_source(train, np.arange(16) % 2, test=(test, np.arange(8) % 2))
            convert(source, tmp / "out", workers=1, ffcv=True)
            made[kind] = tmp / "out"
        return made[kind]
    return get


@pytest.mark.slow
@pytest.mark.parametrize("loader, kind", [(name, "mixed") for name in ("reference", "dali", "ffcv")]
                         + [("resident", kind) for kind in ("flat", "tall", "square")])
def test_every_loader_trains_and_evaluates_the_smallest_images(smallest, loader, kind):
    """Each loader, train (random resized crop) and eval (resize + centre crop, with FFCV's ratio
    rule at its smallest), on the smallest images conversion keeps: right shapes, no crash. (The
    resident loader holds images of one size only: one dataset per shape.)"""
    from pipeline.loaders import AugmentSpec, EvalSpec, make_eval_loader, make_train_loader
    root = smallest(kind)
    tl = make_train_loader(ShardedSplit(root, "train"), loader=loader, batch_size=8, seed=0,
                           augment=AugmentSpec(kind="rrc", size=24), device="cpu", workers=1)
    try:
        batches = list(tl)
    finally:
        tl.close()
    assert len(batches) == 2 and all(b.x_a.shape == b.x_c.shape == (8, 3, 24, 24) for b in batches)
    for spec in (EvalSpec(size=24, resize=28), EvalSpec(size=MIN_SIDE, resize=MIN_SIDE * 8)):
        ev = make_eval_loader(ShardedSplit(root, "test"), loader=loader, batch_size=4, spec=spec,
                              device="cpu", workers=1)
        try:
            xs, ys = zip(*[(b.x_a, b.y_a) for b in ev])
        finally:
            ev.close()
        assert torch.cat(xs).shape == (8, 3, spec.size, spec.size)
        assert torch.cat(ys).tolist() == [0, 1] * 4


# --- 5. no empty shard --------------------------------------------------------------------------
def test_a_shard_that_lost_every_item_is_not_written(tmp_path):
    """--on-error skip empties shard 1 (all its items are bad): no file for it, a gap in the
    shard list, readable by the webdataset library and DALI's reader, resumable, verifiable."""
    good = [_png(tmp_path / f"g{i}.png", 12, 12, seed=i) for i in range(4)]
    bad = [tmp_path / f"missing{i}.png" for i in range(2)]
    items, labels = [good[0], good[1], bad[0], bad[1], good[2], good[3]], [0, 1, 0, 1, 0, 1]
    out = tmp_path / "out"
    meta = convert(file_source(items, labels), out, shard_size=2, workers=1, on_error="skip")
    info = meta["splits"]["train"]
    assert info["shards"] == [0, 2] and info["num_shards"] == 2 and len(info["shard_sha256"]) == 2
    assert not (out / "train" / shard_name(1)).exists()
    assert sorted(p.name for p in (out / "train").glob("shard-*.tar")) == [shard_name(0), shard_name(2)]
    check_field_readers(out)
    assert verify(out) == []
    # resume: the emptied shard counts as done, and a rebuilt meta.json is the same
    (out / "meta.json").unlink()
    (out / "train" / shard_name(1)).write_bytes(b"\0" * 1024)  # as an older version left it
    again = convert(file_source(items, labels), out, shard_size=2, workers=1, on_error="skip")
    assert {k: v for k, v in again.items() if k != "created"} == {k: v for k, v in meta.items()
                                                                   if k != "created"}
    assert not (out / "train" / shard_name(1)).exists()


def test_verify_flags_an_empty_shard_left_by_an_older_version(tmp_path):
    good = [_png(tmp_path / f"g{i}.png", 12, 12, seed=i) for i in range(4)]
    out = tmp_path / "out"
    convert(file_source(good, [0, 1, 0, 1]), out, shard_size=2, workers=1)
    meta = json.loads((out / "meta.json").read_text())
    (out / "train" / shard_name(2)).write_bytes(b"\0" * 1024)  # how older versions left them
    info = meta["splits"]["train"]
    info["shards"], info["num_shards"] = [0, 1, 2], 3
    info["shard_sha256"].append(None)
    (out / "meta.json").write_text(json.dumps(meta))
    problems = verify(out, workers=1)
    assert len(problems) == 1 and "holds no sample" in problems[0]


def test_verify_flags_stored_images_too_small_for_the_loaders(tmp_path):
    from helpers import make_converted, random_images
    root = make_converted(tmp_path / "made", {"train": (random_images(3, 8) + random_images(1, 4),
                                                        np.arange(4) % 2)}, 2)
    problems = verify(root, workers=1)
    assert len(problems) == 1 and "000000003.png is 4x4 pixels" in problems[0]


def test_an_unreadable_file_is_described_without_python_reprs(tmp_path):
    from pipeline.convert_items import BadItem, _from_file
    path = tmp_path / "notes.jpg"
    path.write_text("not an image")
    with pytest.raises(BadItem) as e:
        _from_file(str(path), None, 90)
    assert str(e.value) == "not a readable image (UnidentifiedImageError: cannot identify image file)"
