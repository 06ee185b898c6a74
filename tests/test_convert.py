"""`pipeline.convert`: any Source -> shards + index + meta, item handling, bad items, resuming."""
from __future__ import annotations

import json

import numpy as np
import pytest
import simplejpeg
import webdataset as wds
from PIL import Image

import pipeline.convert_shard
from pipeline.convert import convert
from pipeline.convert_items import jpeg_frame
from pipeline.dataset import ShardedSplit
from pipeline.errors import DataError
from pipeline.format import sample_key, shard_name
from pipeline.sources.base import Source, SourceSplit


def picture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth RGB image with a little noise: compresses like a photo."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1),
                     (x + y) * 255 // max(h + w - 2, 1)], axis=-1)
    return np.clip(base + rng.integers(-8, 9, base.shape), 0, 255).astype(np.uint8)


def save(path, pixels: np.ndarray, fmt: str = "JPEG", mode: str = "RGB", **options) -> str:
    Image.fromarray(pixels).convert(mode).save(path, fmt, **options)
    return str(path)


def array_source(n: int = 40, num_classes: int = 4, size: int = 8, test: int = 8) -> Source:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    labels = np.arange(n) % num_classes
    return Source("arrays", [f"c{k}" for k in range(num_classes)],
                  {"train": SourceSplit(labels, images),
                   "test": SourceSplit(labels[:test], images[:test])},
                  {"generator": "tests", "seed": np.int64(1)})


def file_source(items: list[str], labels, num_classes: int = 2) -> Source:
    origins = [f"list.txt:{i + 1}" for i in range(len(items))]
    return Source("files", [f"c{k}" for k in range(num_classes)],
                  {"train": SourceSplit(np.asarray(labels), items, origins)}, {"root": "tests"})


def stored(root, split: str = "train") -> ShardedSplit:
    return ShardedSplit(root, split)


@pytest.fixture
def count_encodes(monkeypatch):
    """Number of items encoded since the fixture was set up (conversions in this process)."""
    calls = []
    real = pipeline.convert_shard.encode_item

    def counting(*args):
        calls.append(1)
        return real(*args)
    monkeypatch.setattr(pipeline.convert_shard, "encode_item", counting)
    return calls


# --- what is written --------------------------------------------------------------------------
def test_arrays_round_trip_and_meta(tmp_path):
    source = array_source()
    meta = convert(source, tmp_path / "out", shard_size=16, workers=1)
    train = stored(tmp_path / "out")
    assert len(train) == 40 and train.num_shards == 3
    assert all(np.array_equal(train.decode(i), source.splits["train"].items[i]) for i in range(40))
    assert train.labels.tolist() == source.splits["train"].labels.tolist()
    assert (train.index["ext"] == 1).all()  # png
    assert set(meta) == {"format", "version", "name", "classes", "splits", "shot_groups", "source",
                         "options", "created"}
    assert meta["splits"]["train"] == {
        "num_samples": 40, "num_shards": 3, "shards": [0, 1, 2], "class_counts": [10, 10, 10, 10],
        "bytes": sum((tmp_path / "out" / "train" / shard_name(k)).stat().st_size for k in range(3)),
        "formats": ["webdataset"], "skipped": 0, "converted_to_rgb": 0, "reencoded": 0, "exif_rotated": 0,
        "shard_sha256": meta["splits"]["train"]["shard_sha256"]}
    assert meta["splits"]["test"]["num_samples"] == 8
    assert meta["shot_groups"] == {"many": [], "medium": [], "few": [0, 1, 2, 3]}
    assert meta["source"] == {"kind": "arrays", "generator": "tests", "seed": 1}
    assert meta["options"] == {"shard_size": 16, "max_side": None, "quality": 90,
                               "on_error": "stop", "ffcv": False}
    assert json.loads((tmp_path / "out" / "meta.json").read_text()) == meta
    assert not list((tmp_path / "out").rglob("*.tmp-*"))


def test_files_are_stored_by_their_real_format(tmp_path):
    img = picture(40, 48)
    files = {
        "rgb": save(tmp_path / "rgb.jpg", img, quality=92),
        "progressive": save(tmp_path / "prog.jpg", img, progressive=True),
        "gray": save(tmp_path / "gray.jpg", img, mode="L"),
        "cmyk": save(tmp_path / "cmyk.jpg", img, mode="CMYK"),
        "png_named_jpg": save(tmp_path / "png.jpg", img, fmt="PNG"),
        "rgba_png": save(tmp_path / "rgba.png", np.dstack([img, img[..., :1]]).astype(np.uint8),
                         fmt="PNG", mode="RGBA"),
    }
    good = simplejpeg.encode_jpeg(img, quality=90)
    # junk before the end marker: libjpeg warns "extraneous bytes", the pixels are intact
    (tmp_path / "junk.jpg").write_bytes(good[:-2] + b"\x12" * 10 + good[-2:])
    files["extraneous_bytes"] = str(tmp_path / "junk.jpg")
    names = list(files)
    meta = convert(file_source(list(files.values()), np.arange(len(files)) % 2), tmp_path / "out",
                   workers=1)
    ds = stored(tmp_path / "out")
    got = {name: (ds.ext(i), bytes(ds.encoded(i)), ds.decode(i)) for i, name in enumerate(names)}

    for name in ("rgb", "progressive"):  # plain JPEGs: the original bytes, untouched
        assert got[name][:2] == ("jpg", open(files[name], "rb").read())
    for name in ("gray", "cmyk", "extraneous_bytes"):  # re-encoded as baseline JPEG
        ext, data, pixels = got[name]
        assert ext == "jpg" and jpeg_frame(data)[0] == 0xC0 and pixels.shape == (40, 48, 3)
    assert np.abs(got["gray"][2].astype(int) - got["gray"][2][..., :1]).max() <= 2  # still gray
    # a PNG named .jpg is stored as a JPEG, like the rest of a JPEG dataset, and counted
    ext, data, pixels = got["png_named_jpg"]
    assert ext == "jpg" and jpeg_frame(data)[0] == 0xC0
    assert data == simplejpeg.encode_jpeg(img, quality=90, colorspace="RGB", colorsubsampling="420")
    assert got["rgba_png"][0] == "png" and np.array_equal(got["rgba_png"][2], img)
    info = meta["splits"]["train"]
    assert info["converted_to_rgb"] == 3  # gray, cmyk, rgba
    assert info["reencoded"] == 4  # gray, cmyk, junk, png_named_jpg


def test_max_side_shrinks_large_images_only(tmp_path):
    small = save(tmp_path / "small.jpg", picture(40, 48))
    large = save(tmp_path / "large.jpg", picture(200, 300))
    tall_png = save(tmp_path / "tall.png", picture(120, 30), fmt="PNG")
    meta = convert(file_source([small, large, tall_png], [0, 1, 0]), tmp_path / "out",
                   max_side=64, workers=1)
    ds = stored(tmp_path / "out")
    assert bytes(ds.encoded(0)) == open(small, "rb").read()
    assert ds.decode(1).shape == (43, 64, 3) and jpeg_frame(bytes(ds.encoded(1)))[0] == 0xC0
    assert ds.ext(2) == "jpg" and ds.decode(2).shape == (64, 16, 3)
    assert meta["splits"]["train"]["reencoded"] == 2

    arrays = Source("a", ["x"], {"train": SourceSplit([0, 0], [picture(50, 100), picture(8, 8)])})
    convert(arrays, tmp_path / "arrays", max_side=64, workers=1)
    ds = stored(tmp_path / "arrays")
    assert (ds.ext(0), ds.decode(0).shape) == ("jpg", (32, 64, 3))
    assert ds.ext(1) == "png" and np.array_equal(ds.decode(1), picture(8, 8))


def test_webdataset_library_reads_what_the_reader_reads(tmp_path):
    items = [save(tmp_path / f"{i}.jpg", picture(24, 32, seed=i)) for i in range(10)]
    convert(file_source(items, np.arange(10) % 2), tmp_path / "out", shard_size=4, workers=1)
    ds = stored(tmp_path / "out")
    urls = [str(ds.shard_path(k)) for k in range(ds.num_shards)]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert [s["__key__"] for s in samples] == [sample_key(i) for i in range(10)]
    assert [int(s["cls"]) for s in samples] == ds.labels.tolist()
    assert [s["jpg"] for s in samples] == [bytes(ds.encoded(i)) for i in range(10)]


# --- bad items --------------------------------------------------------------------------------
def _bad_files(tmp_path) -> dict[str, str]:
    good = save(tmp_path / "good.jpg", picture(24, 32))
    data = open(good, "rb").read()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.jpg").write_text("not an image")
    return {"truncated": str(tmp_path / "truncated.jpg"), "missing": str(tmp_path / "missing.jpg"),
            "text": str(tmp_path / "text.jpg"), "good": good}


@pytest.mark.parametrize("bad, reason", [("truncated", "corrupt or truncated JPEG"),
                                         ("missing", "file not found"),
                                         ("text", "not a readable image")])
def test_a_bad_file_stops_the_conversion_naming_it(tmp_path, bad, reason):
    files = _bad_files(tmp_path)
    source = file_source([files["good"], files["good"], files[bad]], [0, 1, 1])
    with pytest.raises(DataError) as e:
        convert(source, tmp_path / "out", workers=1)
    message = str(e.value)
    assert files[bad] in message and "list.txt:3" in message and reason in message
    assert "--on-error skip" in message
    assert not (tmp_path / "out" / "meta.json").exists()


def test_labels_out_of_range_stop_before_any_encoding(tmp_path, count_encodes):
    source = array_source()
    source.splits["train"].labels[5] = 4
    with pytest.raises(DataError, match=r"train sample 5: label 4 out of range \[0, 4\)"):
        convert(source, tmp_path / "out", workers=1)
    assert not count_encodes


def test_skip_leaves_bad_items_out_and_lists_them(tmp_path):
    files = _bad_files(tmp_path)
    items = [files["good"], files["truncated"], files["good"], files["missing"], files["good"],
             files["good"]]
    labels = [0, 1, 1, 0, 7, 1]  # 7: out of range
    source = file_source(items, labels)
    with pytest.raises(DataError):  # the default stops at the first bad item ...
        convert(source, tmp_path / "out", shard_size=2, workers=1)
    meta = convert(source, tmp_path / "out", shard_size=2, workers=1, on_error="skip")  # ... skip resumes

    skipped = json.loads((tmp_path / "out" / "skipped.json").read_text())
    assert [(s["position"], s["path"], s["origin"]) for s in skipped] == [
        (1, files["truncated"], "list.txt:2"), (3, files["missing"], "list.txt:4"),
        (4, files["good"], "list.txt:5")]
    assert "label 7 out of range" in skipped[2]["reason"]
    info = meta["splits"]["train"]
    assert (info["num_samples"], info["num_shards"], info["skipped"]) == (3, 3, 3)
    assert info["class_counts"] == [1, 2]
    ds = stored(tmp_path / "out")
    assert ds.labels.tolist() == [0, 1, 1]
    samples = list(wds.WebDataset([str(ds.shard_path(k)) for k in range(3)], shardshuffle=False))
    assert [s["__key__"] for s in samples] == [sample_key(p) for p in (0, 2, 5)]
    assert [s["jpg"] for s in samples] == [bytes(ds.encoded(i)) for i in range(3)]


def test_a_class_without_training_images_is_an_error(tmp_path):
    source = array_source(num_classes=3)
    source.classes.append("lonely")
    with pytest.raises(DataError, match=r"class 3 \('lonely'\) has no training images"):
        convert(source, tmp_path / "out", workers=1)
    assert not (tmp_path / "out" / "meta.json").exists()


def test_invalid_options(tmp_path):
    for options, match in [({"quality": 0}, "--quality"), ({"shard_size": 0}, "--shard-size"),
                           ({"max_side": 0}, "--max-side"), ({"on_error": "ignore"}, "--on-error"),
                           ({"workers": 0}, "--workers")]:
        with pytest.raises(DataError, match=match):
            convert(array_source(), tmp_path / "out", **options)


# --- resuming and safety ----------------------------------------------------------------------
def _shard_bytes(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.glob("*/*")) if p.name.startswith(("shard-", "index"))}


def test_a_crashed_conversion_resumes_to_the_same_result(tmp_path, monkeypatch):
    source = array_source()  # 40 train + 8 test samples: shards of 8 -> 5 + 1
    reference = convert(source, tmp_path / "ref", shard_size=8, workers=1)
    real, calls, crashed = pipeline.convert_shard.encode_item, [], []

    def crash_once_at_20(*args):
        calls.append(1)
        if len(calls) == 20 and not crashed:
            crashed.append(1)
            raise KeyboardInterrupt  # as if killed while encoding the third shard
        return real(*args)
    monkeypatch.setattr(pipeline.convert_shard, "encode_item", crash_once_at_20)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        convert(source, out, shard_size=8, workers=1)
    assert sorted(p.name for p in (out / "train").glob("shard-*")) == [shard_name(0), shard_name(1)]
    assert not (out / "meta.json").exists()
    stale = out / "train" / f".{shard_name(2)}.tmp-99999"
    stale.write_bytes(b"half a shard left by a killed process")

    calls.clear()
    meta = convert(source, out, shard_size=8, workers=1)
    assert len(calls) == 48 - 16  # only the shards not finished before the crash
    assert not stale.exists()
    assert _shard_bytes(out) == _shard_bytes(tmp_path / "ref")
    assert {**meta, "created": None} == {**reference, "created": None}


def test_deleted_files_are_rewritten_alone(tmp_path, count_encodes):
    out = tmp_path / "out"
    convert(array_source(), out, shard_size=8, workers=1)
    before = _shard_bytes(out)
    count_encodes.clear()
    (out / "train" / shard_name(3)).unlink()  # a damaged shard removed, meta.json kept
    convert(array_source(), out, shard_size=8, workers=1)
    assert len(count_encodes) == 8
    (out / "meta.json").unlink()
    (out / "train" / shard_name(1)).unlink()
    convert(array_source(), out, shard_size=8, workers=1)
    assert len(count_encodes) == 16
    assert _shard_bytes(out) == before


def test_a_complete_conversion_is_not_redone(tmp_path, count_encodes, capsys):
    first = convert(array_source(), tmp_path / "out", workers=1)
    count_encodes.clear()
    again = convert(array_source(), tmp_path / "out", workers=1, on_error="skip")
    assert not count_encodes and again == first
    assert "already complete" in capsys.readouterr().err


def test_a_different_request_into_the_same_folder_is_refused(tmp_path):
    convert(array_source(), tmp_path / "out", workers=1)
    with pytest.raises(DataError,
                       match=r"holds a different conversion \(differs in: options.quality: 90 before, 80 now\)"):
        convert(array_source(), tmp_path / "out", workers=1, quality=80)
    with pytest.raises(DataError, match="splits.train.num_samples: 40 before, 44 now"):
        convert(array_source(n=44), tmp_path / "out", workers=1)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty and holds no conversion"):
        convert(array_source(), tmp_path / "other", workers=1)


def test_parallel_workers_write_the_same_bytes(tmp_path):
    convert(array_source(), tmp_path / "one", shard_size=8, workers=1)
    convert(array_source(), tmp_path / "two", shard_size=8, workers=2)
    assert _shard_bytes(tmp_path / "one") == _shard_bytes(tmp_path / "two")


def test_parallel_stop_keeps_finished_shards(tmp_path):
    files = _bad_files(tmp_path)
    items = [files["good"]] * 6 + [files["truncated"]] + [files["good"]]
    with pytest.raises(DataError, match="truncated.jpg"):
        convert(file_source(items, np.arange(8) % 2), tmp_path / "out", shard_size=2, workers=2)
    assert (tmp_path / "out" / "train" / shard_name(0)).is_file()
    assert not (tmp_path / "out" / "train" / shard_name(3)).exists()


# --- FFCV -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ffcv_beton_reads_back_in_index_order(tmp_path):
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption

    source = array_source(n=24, size=8)
    convert(source, tmp_path / "out", shard_size=8, workers=1)
    meta = convert(source, tmp_path / "out", shard_size=8, workers=1, ffcv=True)  # added later
    assert meta["splits"]["train"]["formats"] == ["webdataset", "ffcv"]
    assert meta["options"]["ffcv"] is True
    ds = stored(tmp_path / "out")
    loader = Loader(str(tmp_path / "out" / "train.beton"), batch_size=10, num_workers=1, drop_last=False,
                    order=OrderOption.SEQUENTIAL,
                    pipelines={"image": [SimpleRGBImageDecoder()], "label": [IntDecoder()]})
    images, labels = zip(*[(np.array(x), np.array(y)) for x, y in loader])
    assert np.concatenate(labels).ravel().tolist() == ds.labels.tolist()
    assert np.array_equal(np.concatenate(images), np.stack([ds.decode(i) for i in range(len(ds))]))
