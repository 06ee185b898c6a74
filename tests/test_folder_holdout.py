"""`iccl convert folder`: the held-out test split, class order, EXIF orientation, the end-of-run notes."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.convert_items import encode_item
from pipeline.dataset import open_split
from pipeline.errors import DataError
from pipeline.sources.folder import load_folder
from tools.cli import main


def _tree(root: Path, sizes: dict[str, int]) -> None:
    """ROOT/<class>/NNN.png, small solid images (8 px: the smallest side conversion keeps); one image per class sits in a subfolder."""
    for name, n in sizes.items():
        for i in range(n):
            path = root / name / ("deep" if i == 0 else "") / f"{i:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (i % 256, 0, 0)).save(path)


def _rel(root: Path, items) -> list[str]:
    return [Path(p).relative_to(root).as_posix() for p in items]


def test_class_order_is_code_point_order_as_imagefolder(tmp_path):
    _tree(tmp_path, {"a": 1, "B": 1, "_x": 1, "Z": 1})
    # torchvision's ImageFolder: sorted(entry.name ...), i.e. code points: "B" < "Z" < "_x" < "a".
    assert load_folder(tmp_path).classes == ["B", "Z", "_x", "a"]


def test_fraction_holdout_is_disjoint_deterministic_and_per_class(tmp_path):
    sizes = {"many": 40, "mid": 11, "two": 2, "one": 1}
    _tree(tmp_path, sizes)
    src = load_folder(tmp_path, holdout=0.25, seed=3)
    train, test = src.splits["train"], src.splits["test"]
    # k = max(1, round(0.25 n)) capped at n - 1: 40 -> 10, 11 -> 3 (2.75), 2 -> 1, 1 -> 0.
    k = {c: int((test.labels == src.classes.index(c)).sum()) for c in sizes}
    assert k == {"many": 10, "mid": 3, "two": 1, "one": 0}
    assert np.bincount(train.labels, minlength=4).tolist() == [
        sizes[c] - k[c] for c in src.classes]
    assert not set(train.items) & set(test.items)
    assert sorted(train.items + test.items) == sorted(load_folder(tmp_path).splits["train"].items)
    assert "many/deep/000.png" in _rel(tmp_path, train.items + test.items)  # subfolders belong to the class
    again = load_folder(tmp_path, holdout=0.25, seed=3).splits["test"]
    assert again.items == test.items
    other = load_folder(tmp_path, holdout=0.25, seed=4).splits["test"]
    assert other.items != test.items and len(other.items) == len(test.items)
    rec = src.description["holdout"]
    assert rec == {"rule": "fraction of each class", "value": 0.25, "seed": 3, "split": "test",
                   "classes_capped": ["one"]}


def test_count_holdout_caps_small_classes_and_names_them(tmp_path, capsys):
    _tree(tmp_path, {"big": 12, "small": 3})
    src = load_folder(tmp_path, holdout=5)
    test = src.splits["test"]
    assert np.bincount(test.labels, minlength=2).tolist() == [5, 2]  # "small" keeps 1 of 3
    assert src.description["holdout"]["classes_capped"] == ["small"]
    assert "small (3 images: 2 to test)" in capsys.readouterr().err


def test_the_draw_is_a_seeded_permutation_of_the_sorted_paths(tmp_path):
    _tree(tmp_path, {"c": 9})
    src = load_folder(tmp_path, holdout=4, seed=7)
    order = np.random.default_rng([7, 0]).permutation(9)
    everything = load_folder(tmp_path).splits["train"].items
    assert src.splits["test"].items == [everything[i] for i in sorted(order[:4])]


@pytest.mark.parametrize("bad", [0.0, 1.0, 1.5, 0, -2])
def test_bad_holdout_values(tmp_path, bad):
    _tree(tmp_path, {"c": 3})
    with pytest.raises(DataError, match="--holdout"):
        load_folder(tmp_path, holdout=bad)


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_holdout_is_refused_when_the_tree_has_splits(tmp_path, split):
    _tree(tmp_path / split, {"c": 3})
    with pytest.raises(DataError, match=rf"already has split folders \({split}/\).*Drop --holdout"):
        load_folder(tmp_path, holdout=0.2)


def _jpeg_with_orientation(w: int, h: int, orientation: int) -> bytes:
    """A w x h JPEG: left half red, right half blue, tagged with an EXIF orientation."""
    im = Image.new("RGB", (w, h), (255, 0, 0))
    im.paste((0, 0, 255), (w // 2, 0, w, h))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def test_exif_orientation_is_applied_and_counted(tmp_path):
    path = tmp_path / "portrait.jpg"
    path.write_bytes(_jpeg_with_orientation(32, 16, 6))  # 6: rotate 90 degrees clockwise to view
    enc = encode_item(str(path), None, 90)
    assert enc.exif_rotated and enc.reencoded and enc.ext == "jpg"
    pixels = np.asarray(Image.open(io.BytesIO(enc.data)).convert("RGB")).astype(int)
    assert pixels.shape == (32, 16, 3)  # turned: now portrait
    # Turned clockwise, the left (red) half of the stored image is the top half of the upright one.
    assert pixels[4, 8, 0] > 200 and pixels[4, 8, 2] < 60
    assert pixels[28, 8, 2] > 200 and pixels[28, 8, 0] < 60
    plain = tmp_path / "plain.jpg"
    plain.write_bytes(_jpeg_with_orientation(32, 16, 1))
    enc = encode_item(str(plain), None, 90)
    assert not enc.exif_rotated and not enc.reencoded and enc.data == plain.read_bytes()


def test_cli_holdout_end_to_end_with_meta_and_note(tmp_path, capsys):
    root = tmp_path / "photos"
    _tree(root, {"cat": 10, "dog": 5})
    (root / "dog" / "up.jpg").write_bytes(_jpeg_with_orientation(16, 8, 8))
    out = tmp_path / "out"
    assert main(["convert", "folder", "--root", str(root), "--holdout", "0.2", "--seed", "1",
                 "--out", str(out), "--workers", "1"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["splits"]["train"]["class_counts"] == [8, 5] and meta["splits"]["test"]["class_counts"] == [2, 1]
    assert meta["source"]["holdout"]["value"] == 0.2 and meta["source"]["holdout"]["seed"] == 1
    assert sum(s["exif_rotated"] for s in meta["splits"].values()) == 1
    assert len(open_split(out, "test")) == 3
    captured = capsys.readouterr()
    assert "nothing to evaluate on" not in captured.out and "turned upright" in captured.err


def test_cli_plain_tree_ends_with_a_note(tmp_path, capsys):
    root = tmp_path / "photos"
    _tree(root, {"cat": 2, "dog": 2})
    assert main(["convert", "folder", "--root", str(root), "--out", str(tmp_path / "o"),
                 "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "train split only, so there is nothing to evaluate on" in out and "--holdout 0.2" in out


def test_cli_rejects_a_bad_holdout_and_a_split_tree(tmp_path, capsys):
    root = tmp_path / "photos"
    _tree(root / "train", {"cat": 2})
    with pytest.raises(SystemExit) as e:
        main(["convert", "folder", "--root", str(root), "--holdout", "1.5", "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    assert main(["convert", "folder", "--root", str(root), "--holdout", "2",
                 "--out", str(tmp_path / "o")]) == 2
    assert "already has split folders (train/)" in capsys.readouterr().err


def test_very_large_images_get_a_max_side_hint(tmp_path, capsys, monkeypatch):
    import pipeline.convert_shard as convert_shard

    monkeypatch.setattr(convert_shard, "LARGE_IMAGE_PIXELS", 15 * 15)  # 16 x 16 counts as "large"
    root = tmp_path / "photos"
    _tree(root, {"cat": 2})
    Image.new("RGB", (16, 16)).save(root / "cat" / "big.png")
    assert main(["convert", "folder", "--root", str(root), "--out", str(tmp_path / "o"), "--workers", "1"]) == 0
    assert "hint: 1 images have more than" in capsys.readouterr().err
    assert main(["convert", "folder", "--root", str(root), "--out", str(tmp_path / "small"), "--workers", "1",
                 "--max-side", "8"]) == 0
    assert "hint:" not in capsys.readouterr().err  # shrunk by --max-side: nothing to suggest
