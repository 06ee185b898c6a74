"""Readers of image files: ImageNet-LT and iNaturalist 2018 (lists, JSON annotations) and class folders.

No ImageNet or iNaturalist images are available here: the tests build small trees in the real
layouts (the readers never open the images, so tiny placeholder files do), and read the real
val/test lists from ../shared/data where present.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import DataError
from pipeline.sources.folder import load_folder
from pipeline.sources.imagenet_lt import load_imagenet_lt
from pipeline.sources.inat import load_inat2018
from pipeline.sources.lists import read_list

WNIDS = ["n01440764", "n01443537", "n01484850"]


def _touch(root: Path, relpaths) -> None:
    for rel in relpaths:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\xff\xd8\xff")  # the readers never decode; the converter does


def _write_list(path: Path, entries) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{rel} {label}\n" for rel, label in entries))
    return path


# ---- ImageNet-LT ---------------------------------------------------------------------------------

def imagenet_lt_tree(tmp_path: Path, train_counts=(4, 2, 1)):
    """root/train/<wnid>/..., root/val/<wnid>/... and the three lists; returns (root, lists, entries)."""
    root, lists = tmp_path / "imagenet", tmp_path / "lists"
    entries = {
        "train": [(f"train/{w}/{w}_{i}.JPEG", k)
                  for k, w in enumerate(WNIDS) for i in range(train_counts[k])],
        "val": [(f"train/{w}/{w}_{100 + i}.JPEG", k) for k, w in enumerate(WNIDS) for i in range(2)],
        "test": [(f"val/{w}/ILSVRC2012_val_{k * 10 + i:08d}.JPEG", k)
                 for k, w in enumerate(WNIDS) for i in range(3)],
    }
    for split, rows in entries.items():
        _touch(root, [rel for rel, _ in rows])
        _write_list(lists / f"ImageNet_LT_{split}.txt", rows)
    return root, lists, entries


def test_imagenet_lt(tmp_path):
    root, lists, entries = imagenet_lt_tree(tmp_path)
    source = load_imagenet_lt(root, lists)
    assert source.name == "imagenet-lt" and source.classes == WNIDS
    assert set(source.splits) == {"train", "val", "test"}
    for split, rows in entries.items():
        got = source.splits[split]
        assert got.labels.tolist() == [label for _, label in rows]
        assert got.items == [str((root / rel).absolute()) for rel, _ in rows]
        assert all(os.path.isabs(p) and os.path.isfile(p) for p in got.items)
        assert got.origins[0] == f"ImageNet_LT_{split}.txt:1"
    assert source.description["lists"]["train"]["official"] is False
    assert source.description["official_lists"] is False and source.description["notes"] == []


def test_imagenet_lt_without_val_and_test(tmp_path):
    root, lists, _ = imagenet_lt_tree(tmp_path)
    (lists / "ImageNet_LT_val.txt").unlink()
    (lists / "ImageNet_LT_test.txt").unlink()
    source = load_imagenet_lt(root, lists)
    assert set(source.splits) == {"train"}
    assert any("ImageNet_LT_test.txt not found" in n for n in source.description["notes"])
    (lists / "ImageNet_LT_train.txt").unlink()
    with pytest.raises(DataError, match=r"ImageNet_LT_train\.txt is missing"):
        load_imagenet_lt(root, lists)


@pytest.mark.parametrize("line,message", [
    ("train/n01440764/x.JPEG", r"ImageNet_LT_train\.txt:3: expected `relative/path label`"),
    ("train/n01440764/x.JPEG zero", r"ImageNet_LT_train\.txt:3: label 'zero' is not an integer"),
    ("train/n01440764/x.JPEG -1", r"ImageNet_LT_train\.txt:3: negative label"),
    ("/data/train/n01440764/x.JPEG 0", r"ImageNet_LT_train\.txt:3: .* absolute path"),
    ("train/n01443537/x.JPEG 0", r"ImageNet_LT_train\.txt:3: label 0 .* folder 'n01443537'.*:1"),
])
def test_imagenet_lt_malformed_lines(tmp_path, line, message):
    root, lists, entries = imagenet_lt_tree(tmp_path)
    rows = [f"{rel} {label}" for rel, label in entries["train"]]
    rows.insert(2, line)
    (lists / "ImageNet_LT_train.txt").write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=message):
        load_imagenet_lt(root, lists)


def test_imagenet_lt_label_checks(tmp_path):
    root, lists, entries = imagenet_lt_tree(tmp_path)
    _write_list(lists / "ImageNet_LT_val.txt", entries["val"] + [("train/n01440764/y.JPEG", 3)])
    with pytest.raises(DataError, match=r"ImageNet_LT_val\.txt:7: label 3 is out of range"):
        load_imagenet_lt(root, lists)

    root, lists, entries = imagenet_lt_tree(tmp_path / "gap", train_counts=(4, 0, 1))
    with pytest.raises(DataError, match=r"classes without a training image \(1\): 1 \(n01443537\)"):
        load_imagenet_lt(root, lists)

    root, lists, entries = imagenet_lt_tree(tmp_path / "same-folder")
    _write_list(lists / "ImageNet_LT_test.txt", entries["test"] + [("val/n01440764/z.JPEG", 2)])
    with pytest.raises(DataError, match=r"ImageNet_LT_test\.txt:10: label 2 .* folder 'n01440764'"):
        load_imagenet_lt(root, lists)


def test_imagenet_lt_wrong_root(tmp_path):
    root, lists, _ = imagenet_lt_tree(tmp_path)
    with pytest.raises(DataError, match="no such folder"):
        load_imagenet_lt(tmp_path / "absent", lists)
    shutil.rmtree(root / "val")
    (root / "val").mkdir()
    _touch(root, ["val/ILSVRC2012_val_00000001.JPEG"])  # ImageNet's val as downloaded: one flat folder
    with pytest.raises(DataError, match=r"ImageNet_LT_test\.txt:1: .*does not exist.*one folder per wnid"):
        load_imagenet_lt(root, lists)


def test_imagenet_lt_real_lists(shared_data, tmp_path):
    """The published val/test lists, recognised as official, with a train list of the same classes."""
    splits_dir = shared_data / "splits"
    val = read_list(splits_dir / "ImageNet_LT_val.txt")
    wnids = [None] * 1000
    for rel, label in zip(val.relpaths, val.labels.tolist()):
        wnids[label] = rel.split("/")[1]
    lists = tmp_path / "lists"
    lists.mkdir()
    for name in ("ImageNet_LT_val.txt", "ImageNet_LT_test.txt"):
        os.symlink(splits_dir / name, lists / name)
    _write_list(lists / "ImageNet_LT_train.txt", [(f"train/{w}/{w}_1.JPEG", k) for k, w in enumerate(wnids)])
    root = tmp_path / "imagenet"
    for w in wnids:
        (root / "train" / w).mkdir(parents=True)
        (root / "val" / w).mkdir(parents=True)

    source = load_imagenet_lt(root, lists)
    assert source.classes == wnids and source.classes[0] == "n01440764"
    assert len(source.splits["val"].labels) == 20000 and len(source.splits["test"].labels) == 50000
    assert np.bincount(source.splits["test"].labels).tolist() == [50] * 1000
    first_test = root.absolute() / "val/n01440764/ILSVRC2012_val_00029930.JPEG"
    assert source.splits["test"].items[0] == str(first_test)
    described = source.description["lists"]
    assert described["val"]["official"] and described["test"]["official"]
    assert not described["train"]["official"] and not source.description["official_lists"]


# ---- iNaturalist 2018 ------------------------------------------------------------------------------

def inat_json_tree(tmp_path: Path, category_ids=(0, 1, 2), train_per_class=(3, 2, 1)):
    """root/train2018.json, root/val2018.json and the images they name."""
    root = tmp_path / "inat"
    categories = [{"id": c, "name": f"species {c}", "supercategory": "Plantae"} for c in category_ids]
    for name, counts in (("train2018.json", train_per_class), ("val2018.json", (1,) * len(category_ids))):
        images, annotations = [], []
        for c, n in zip(category_ids, counts):
            for i in range(n):
                image_id = len(images) + (0 if name.startswith("train") else 1000)
                images.append({"id": image_id, "file_name": f"train_val2018/Plantae/{c}/{name[:3]}{i}.jpg",
                               "width": 800, "height": 600})
                annotations.append({"id": image_id, "image_id": image_id, "category_id": c})
        _touch(root, [im["file_name"] for im in images])
        (root / name).write_text(json.dumps({"info": {}, "images": images, "annotations": annotations[::-1],
                                             "categories": categories[::-1], "licenses": []}))
    return root


def test_inat_json(tmp_path):
    root = inat_json_tree(tmp_path)
    source = load_inat2018(root)
    assert source.name == "inat2018" and source.classes == ["species 0", "species 1", "species 2"]
    train, val = source.splits["train"], source.splits["val"]
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 2] and val.labels.tolist() == [0, 1, 2]
    assert train.items[3] == str(root.absolute() / "train_val2018/Plantae/1/tra0.jpg")
    assert train.origins[3] == "train2018.json:images[3]"
    assert "category_ids" not in source.description


def test_inat_json_sparse_ids_are_remapped(tmp_path):
    root = inat_json_tree(tmp_path, category_ids=(42, 7, 1000))
    source = load_inat2018(root)
    assert source.description["category_ids"] == [7, 42, 1000]
    assert source.classes == ["species 7", "species 42", "species 1000"]
    assert source.splits["train"].labels.tolist() == [1, 1, 1, 0, 0, 2]


def test_inat_json_structure_example(shared_data, tmp_path):
    """The schema example of the official files (3 images, real file names and category ids)."""
    root = tmp_path / "inat"
    root.mkdir()
    shutil.copy(shared_data / "splits" / "iNat2018_json_structure_example.json", root / "train2018.json")
    doc = json.loads((root / "train2018.json").read_text())
    _touch(root, [im["file_name"] for im in doc["images"]])
    source = load_inat2018(root)
    assert source.description["category_ids"] == [673, 7228, 7291]
    assert source.splits["train"].labels.tolist() == [2, 0, 1]
    assert set(source.splits) == {"train"} and "val2018.json not found" in source.description["notes"][0]


def test_inat_json_errors(tmp_path):
    root = inat_json_tree(tmp_path, train_per_class=(3, 0, 1))
    with pytest.raises(DataError, match=r"train2018\.json: classes without a training image \(1\): 1 \(species 1"):
        load_inat2018(root)

    root = inat_json_tree(tmp_path / "b")
    doc = json.loads((root / "val2018.json").read_text())
    doc["annotations"][0]["category_id"] = 5
    (root / "val2018.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"val2018\.json: .* category_id 5, which is not among"):
        load_inat2018(root)
    doc["annotations"] = doc["annotations"][1:]
    (root / "val2018.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"val2018\.json: images\[2\] .* has no annotation"):
        load_inat2018(root)
    doc = json.loads((root / "train2018.json").read_text())
    del doc["annotations"][2]["category_id"]
    (root / "val2018.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"val2018\.json: annotations\[2\] lacks image_id or category_id"):
        load_inat2018(root)
    doc["images"][1] = {"id": doc["images"][1]["id"]}
    del doc["annotations"][2]
    (root / "val2018.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"val2018\.json: images\[1\] lacks id or file_name"):
        load_inat2018(root)
    (root / "val2018.json").write_text("{not json")
    with pytest.raises(DataError, match=r"val2018\.json: not valid JSON"):
        load_inat2018(root)
    (root / "val2018.json").write_text(json.dumps({"images": []}))
    with pytest.raises(DataError, match=r"val2018\.json: no 'annotations' list"):
        load_inat2018(root)
    with pytest.raises(DataError, match=r"neither train2018\.json nor iNaturalist18_train\.txt"):
        load_inat2018(tmp_path)


def inat_list_rows(category_ids, per_class):
    return [(f"train_val2018/{'Plantae' if c % 2 else 'Insecta'}/{c}/{c}_{i}.jpg", c)
            for c in category_ids for i in range(per_class)]


def test_inat_lists(tmp_path):
    root = tmp_path / "inat"
    train, val = inat_list_rows(range(4), 3), inat_list_rows(range(4), 1)
    _touch(root, [rel for rel, _ in train + val])
    lists = tmp_path / "lists"
    _write_list(lists / "iNaturalist18_train.txt", train)
    _write_list(lists / "iNaturalist18_val.txt", val)
    source = load_inat2018(root, lists)
    assert source.classes == ["Insecta/0", "Plantae/1", "Insecta/2", "Plantae/3"]
    assert source.splits["train"].labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert source.splits["val"].origins[2] == "iNaturalist18_val.txt:3"
    assert source.description["annotations"] == "lists" and "category_ids" not in source.description

    # the lists in root, no JSONs: found there
    for name in ("iNaturalist18_train.txt", "iNaturalist18_val.txt"):
        shutil.copy(lists / name, root / name)
    assert load_inat2018(root).splits["val"].labels.tolist() == [0, 1, 2, 3]


def test_inat_lists_sparse_ids_and_unknown_val_category(tmp_path):
    root = tmp_path / "inat"
    train, val = inat_list_rows((5, 9, 30), 2), inat_list_rows((9,), 1)
    _touch(root, [rel for rel, _ in train + val])
    _write_list(root / "iNaturalist18_train.txt", train)
    _write_list(root / "iNaturalist18_val.txt", val)
    source = load_inat2018(root)
    assert source.description["category_ids"] == [5, 9, 30]
    assert source.splits["train"].labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert source.splits["val"].labels.tolist() == [1]
    _write_list(root / "iNaturalist18_val.txt", val + [("train_val2018/Plantae/31/a.jpg", 31)])
    with pytest.raises(DataError, match=r"iNaturalist18_val\.txt:2: category 31 has no image in"):
        load_inat2018(root)


def test_inat_real_val_list(shared_data, tmp_path):
    """The published val list (3 images of each of 8,142 classes), recognised as official."""
    val = read_list(shared_data / "splits" / "iNaturalist18_val.txt")
    folders = {}
    for rel, label in zip(val.relpaths, val.labels.tolist()):
        folders[label] = rel.rpartition("/")[0]
    assert sorted(folders) == list(range(8142))
    root, lists = tmp_path / "inat", tmp_path / "lists"
    for folder in folders.values():
        (root / folder).mkdir(parents=True)
    _write_list(lists / "iNaturalist18_train.txt", [(f"{folders[k]}/t.jpg", k) for k in range(8142)])
    os.symlink(shared_data / "splits" / "iNaturalist18_val.txt", lists / "iNaturalist18_val.txt")
    source = load_inat2018(root, lists)
    assert len(source.classes) == 8142 and source.classes[7291] == "Plantae/7291"
    assert len(source.splits["val"].labels) == 24426
    assert source.splits["val"].labels[:3].tolist() == [7291, 673, 7228]
    assert source.description["lists"]["val"]["official"]


# ---- class folders -----------------------------------------------------------------------------------

def test_folder_single_tree(tmp_path):
    _touch(tmp_path, ["dog/b.PNG", "dog/a.jpg", "cat/x.jpeg", "cat/sub/y.webp", "cat/.hidden.jpg",
                      "cat/.thumbs/z.jpg", "cat/notes.txt", "README.md", "bird/1.BMP"])
    source = load_folder(tmp_path)
    assert source.classes == ["bird", "cat", "dog"]
    assert set(source.splits) == {"train"}
    train = source.splits["train"]
    assert train.labels.tolist() == [0, 1, 1, 2, 2]
    assert [Path(p).relative_to(tmp_path).as_posix() for p in train.items] == [
        "bird/1.BMP", "cat/x.jpeg", "cat/sub/y.webp", "dog/a.jpg", "dog/b.PNG"]
    assert "no train/ subfolder" in source.description["layout"]
    assert source.description["non_image_files_ignored"] == {"train": 2}


def test_folder_splits(tmp_path):
    _touch(tmp_path, ["train/a/1.jpg", "train/b/1.jpg", "train/c/1.jpg", "val/c/1.png", "val/a/2.png",
                      "test/b/3.jpg"])
    source = load_folder(tmp_path)
    assert source.classes == ["a", "b", "c"] and set(source.splits) == {"train", "val", "test"}
    assert source.splits["val"].labels.tolist() == [0, 2]
    assert source.splits["test"].labels.tolist() == [1]
    assert source.splits["val"].items[0].endswith(os.path.join("val", "a", "2.png"))


def test_folder_errors(tmp_path):
    _touch(tmp_path, ["train/a/1.jpg", "val/a/1.jpg", "val/zebra/1.jpg"])
    with pytest.raises(DataError, match=r"val/zebra: class 'zebra' has no folder in .*train"):
        load_folder(tmp_path)
    (tmp_path / "train" / "empty").mkdir()
    (tmp_path / "train" / "empty" / "labels.csv").write_text("")
    with pytest.raises(DataError, match=r"train/empty: class folder without images"):
        load_folder(tmp_path)
    with pytest.raises(DataError, match="no such folder"):
        load_folder(tmp_path / "absent")
    flat = tmp_path / "flat"
    _touch(flat, ["1.jpg", "2.jpg"])
    with pytest.raises(DataError, match="no class subfolders"):
        load_folder(flat)
