"""Generated ImageNet-LT / iNaturalist 2018 trees: real layouts, scaled class counts, list files that
`iccl convert` reads as users' lists; and `iccl bench scale` end to end on a tiny version."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.dataset import ShardedSplit
from pipeline.errors import DataError
from tools.cli import main
from tools.lt_trees import COUNTS_FILE, load_counts, make_tree, scaled

TRAIN = {"ImageNet_LT_train_cls_num": [40, 12, 5, 2], "iNaturalist18_train_cls_num": [9, 4, 2]}


@pytest.fixture()
def counts(tmp_path):
    path = tmp_path / "counts.json"
    path.write_text(json.dumps(TRAIN))
    return path


def test_scaled_keeps_one_per_class():
    np.testing.assert_array_equal(scaled(np.array([1280, 100, 5, 2]), 0.01), [13, 1, 1, 1])


def test_imagenet_lt_tree_converts(tmp_path, counts):
    rec = make_tree("imagenet-lt", tmp_path / "t", scale=0.5, counts_file=counts, workers=1)
    want = scaled(TRAIN["ImageNet_LT_train_cls_num"], 0.5)  # [20, 6, 2, 1] (round half to even)
    # no real val/test lists beside this counts file: the published shape, 20 and 50 per class
    assert rec["images"] == {"train": int(want.sum()), "val": 4 * 10, "test": 4 * 25}
    assert not any(rec["real_lists"].values())
    lines = (tmp_path / "t/lists/ImageNet_LT_test.txt").read_text().splitlines()
    assert lines[0].startswith("val/n") and "/ILSVRC2012_val_" in lines[0]
    out = tmp_path / "data"
    assert main(["-q", "convert", "imagenet-lt", "--root", str(tmp_path / "t/root"), "--lists",
                 str(tmp_path / "t/lists"), "--out", str(out), "--workers", "1"]) == 0
    train = ShardedSplit(out, "train")
    np.testing.assert_array_equal(train.class_counts, want)
    assert train.decode(0).shape[1] in (333, 375, 400, 500)  # ImageNet's shapes
    assert len(ShardedSplit(out, "test")) == 100 and len(ShardedSplit(out, "val")) == 40
    # a rerun finds the tree finished and changes nothing
    stamp = (tmp_path / "t/trees.json").stat().st_mtime_ns
    assert make_tree("imagenet-lt", tmp_path / "t", scale=0.5, counts_file=counts, workers=1) == rec
    assert (tmp_path / "t/trees.json").stat().st_mtime_ns == stamp


def test_inat_json_tree_converts(tmp_path, counts):
    assert main(["-q", "bench", "lt-trees", "inat2018", "--out", str(tmp_path / "t"), "--json",
                 "--counts", str(counts), "--workers", "1"]) == 0
    assert (tmp_path / "t/root/train2018.json").is_file() and not (tmp_path / "t/lists").exists()
    out = tmp_path / "data"
    assert main(["-q", "convert", "inat2018", "--root", str(tmp_path / "t/root"), "--out", str(out),
                 "--workers", "1"]) == 0
    np.testing.assert_array_equal(ShardedSplit(out, "train").class_counts, TRAIN["iNaturalist18_train_cls_num"])
    assert len(ShardedSplit(out, "val")) == 3 * 3
    assert ShardedSplit(out, "train").decode(0).shape in ((96, 128, 3), (128, 96, 3))


def test_real_lists_are_part_of_what_makes_a_tree(tmp_path, counts, monkeypatch):
    """A rerun with real lists rebuilds a tree made without them; a rebuild that stops leaves no
    record claiming the tree is complete; a lists folder holding none of the lists is refused."""
    import tools.lt_trees as lt_trees
    rec = make_tree("imagenet-lt", tmp_path / "t", scale=0.5, counts_file=counts, workers=1)
    assert not any(rec["real_lists"].values())
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "ImageNet_LT_test.txt").write_text("".join(
        f"val/n0144076{k}/ILSVRC2012_val_0000{k}{j}.JPEG {k}\n" for k in range(4) for j in range(3)))

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop()
    with monkeypatch.context() as m:
        m.setattr(lt_trees, "ProcessPoolExecutor", stop)
        with pytest.raises(Stop):
            make_tree("imagenet-lt", tmp_path / "t", scale=0.5, counts_file=counts, lists_dir=lists, workers=1)
    assert not (tmp_path / "t" / lt_trees.DONE_FILE).exists()
    rec = make_tree("imagenet-lt", tmp_path / "t", scale=0.5, counts_file=counts, lists_dir=lists, workers=1)
    assert rec["real_lists"] == {"val": False, "test": True} and rec["images"]["test"] == 4 * 2
    assert "n01440763" in (tmp_path / "t/lists/ImageNet_LT_train.txt").read_text()  # the real wnids
    with pytest.raises(DataError, match="--lists-dir"):
        make_tree("imagenet-lt", tmp_path / "t2", counts_file=counts, lists_dir=tmp_path / "t", workers=1)


def test_bad_arguments_are_clear(tmp_path, counts, capsys):
    assert main(["bench", "lt-trees", "inat2018", "--out", str(tmp_path), "--counts",
                 str(tmp_path / "nope.json")]) == 2
    assert "--counts" in capsys.readouterr().err
    assert main(["bench", "lt-trees", "inat2018", "--out", str(tmp_path), "--counts", str(counts),
                 "--scale", "2"]) == 2
    assert "--scale" in capsys.readouterr().err


def test_shipped_counts_are_the_published_sizes():
    """The counts shipped in tools/data against the datasets' published sizes: ImageNet-LT
    115,846 training images over 1,000 classes (1,280 to 5 per class), iNaturalist 2018 437,513
    over 8,142 (1,000 to 2)."""
    for kind, (classes, total, most, least) in {"imagenet-lt": (1000, 115_846, 1280, 5),
                                                "inat2018": (8142, 437_513, 1000, 2)}.items():
        n = load_counts(kind, None)
        assert (len(n), int(n.sum()), int(n.max()), int(n.min())) == (classes, total, most, least)


def test_real_lists_and_counts(shared_data, tmp_path):
    splits = shared_data / "splits"
    if not (splits / "ImageNet_LT_test.txt").is_file():
        pytest.skip(f"{splits} not present")
    real = json.loads((splits / "train_class_counts_from_LiVT.json").read_text())
    shipped = json.loads(COUNTS_FILE.read_text())
    assert all(shipped[k] == real[k] for k in ("ImageNet_LT_train_cls_num", "iNaturalist18_train_cls_num"))
    rec = make_tree("imagenet-lt", tmp_path / "t", scale=0.01, workers=2, lists_dir=splits)
    assert rec["real_lists"] == {"val": True, "test": True} and rec["num_classes"] == 1000
    assert rec["images"] == {"train": int(scaled(real["ImageNet_LT_train_cls_num"], 0.01).sum()),
                             "val": 1000, "test": 1000}
    ours = (tmp_path / "t/lists/ImageNet_LT_test.txt").read_text().splitlines()
    theirs = (splits / "ImageNet_LT_test.txt").read_text().splitlines()
    assert set(ours) <= set(theirs)  # the real paths and labels, one per class at 1 %


@pytest.mark.slow
def test_bench_scale_end_to_end_and_resumes(tmp_path, counts, capsys):
    args = ["-q", "bench", "scale", "--work", str(tmp_path / "w"), "--scale", "1", "--counts", str(counts),
            "--workers", "1", "--skip", "bench-convert,first-batch"]
    assert main(args) == 0
    report = json.loads((tmp_path / "w/scale.json").read_text())
    for kind in ("imagenet-lt", "inat2018"):
        res = report["datasets"][kind]
        assert {"tree", "convert", "info", "verify", "sampler", "evaluate"} == set(res)
        assert res["convert"]["images_per_s"] > 0
        assert res["sampler"]["full_size"]["samples"] == sum(TRAIN[next(
            k for k in TRAIN if k.startswith("ImageNet" if kind == "imagenet-lt" else "iNat"))])
    assert res["evaluate"]["classes"] == 3 and res["evaluate"]["samples"] == 24_426
    assert "evaluate" in capsys.readouterr().out
    before = (tmp_path / "w/scale.json").read_text()
    assert main(args) == 0  # every step done: nothing is measured again
    assert (tmp_path / "w/scale.json").read_text() == before
    other = list(args)
    other[other.index("--scale") + 1] = "0.5"
    assert main(other) == 2  # another scale into the same folder: refused
    other_counts = tmp_path / "elsewhere.json"
    other_counts.write_text(counts.read_text())
    other = list(args)
    other[other.index("--counts") + 1] = str(other_counts)
    assert main(other) == 2  # trees from other inputs into the same folder: refused
    assert "--counts, --lists-dir, --tiles-from" in capsys.readouterr().err


def test_first_batch_is_measured_again_once_the_beton_exists(tmp_path, counts, monkeypatch):
    """A first-batch step that skipped FFCV (no .beton yet) is redone by a rerun with --ffcv."""
    import tools.bench_scale as bench_scale
    calls = []

    def fake(data, loader, batch, workers):
        calls.append(loader)
        beton = Path(data, "train.beton").is_file()
        if loader == "ffcv" and not beton:
            return {"loader": loader, "skipped": "no .beton"}
        return {"loader": loader, "first_batch_s": 1.0, "main_rss_bytes": 1, "worker_rss_bytes": []}
    monkeypatch.setattr(bench_scale, "first_batch_in_fresh_process", fake)
    base = ["-q", "bench", "scale", "--work", str(tmp_path / "w"), "--scale", "1", "--counts", str(counts),
            "--workers", "1", "--datasets", "inat2018"]
    assert main(base + ["--skip", "bench-convert,info,verify,sampler,evaluate"]) == 0
    assert len(calls) == 3
    assert main(base + ["--skip", "bench-convert,info,verify,sampler,evaluate"]) == 0
    assert len(calls) == 3  # done, and --ffcv not asked: kept
    assert main(base + ["--ffcv", "--skip", "bench-convert,info,verify,sampler,evaluate"]) == 0
    report = json.loads((tmp_path / "w/scale.json").read_text())["datasets"]["inat2018"]
    assert len(calls) == 6 and "skipped" not in report["first-batch"]["ffcv"]


@pytest.mark.slow  # a fresh interpreter importing torch: ~10 s here
def test_first_batch_in_a_fresh_process(tmp_path):
    from helpers import make_converted, smooth_images
    from tools.bench_scale import first_batch_in_fresh_process

    root = make_converted(tmp_path / "d", {"train": (smooth_images(24, 60, 80, seed=0), np.arange(24) % 3)},
                          3, ext="jpg")
    r = first_batch_in_fresh_process(str(root), "reference", 4, 1)
    assert r["loader"] == "reference" and r["first_batch_s"] > 0 and len(r["worker_rss_bytes"]) == 1
    assert "unknown" in first_batch_in_fresh_process(str(root), "nope", 4, 1)["skipped"]
