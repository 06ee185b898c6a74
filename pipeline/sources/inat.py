"""iNaturalist 2018 from its official annotation files or from the long-tail split lists.

    root/train2018.json, root/val2018.json   COCO-style: images [{id, file_name}], annotations
                                             [{image_id, category_id}], categories [{id, name}]
    root/train_val2018/<supercategory>/<category id>/<hash>.jpg   the images (file_name is relative to root)

or, instead of the JSONs, `iNaturalist18_train.txt` / `iNaturalist18_val.txt` (the Decoupling lists,
`train_val2018/Plantae/7477/....jpg 7477` per line) in `lists` or in root. Both describe the same
437,513 train and 24,426 val images of 8,142 categories.

Labels are the category ids, which are 0..8141 in the official data; ids that are not 0..K-1 are
remapped densely in sorted order and the description records the original id of each label. The
official validation set is the evaluation split of iNaturalist; it is named "val".
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from pipeline.errors import DataError
from pipeline.sources.base import Source, SourceSplit
from pipeline.sources.lists import (
    absolute_items, check_folders_exist, check_train_covers_classes,
    class_names_from_folders, is_absolute, parent_folders, read_list_folder, read_split_files,
)

JSON_FILES = {"train": "train2018.json", "val": "val2018.json"}
LIST_FILES = {"train": "iNaturalist18_train.txt", "val": "iNaturalist18_val.txt"}


def load_inat2018(root: Path, lists: Path | None = None) -> Source:
    """iNaturalist 2018, splits train and val, from the JSONs in root or from the lists."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder. Pass the iNaturalist 2018 root "
                        f"(the folder holding train_val2018/ and {JSON_FILES['train']}).")
    if lists is not None:
        return _from_lists(root, Path(lists))
    if (root / JSON_FILES["train"]).is_file():
        return _from_json(root)
    if (root / LIST_FILES["train"]).is_file():
        return _from_lists(root, root)
    raise DataError(
        f"{root}: neither {JSON_FILES['train']} nor {LIST_FILES['train']} is there. Put the official "
        f"annotation files in the iNaturalist 2018 root, or pass the folder holding the lists."
    )


# ---- official JSON annotations -------------------------------------------------------------------

def _from_json(root: Path) -> Source:
    docs, notes = read_split_files(root, JSON_FILES, _read_json)

    train_path = root / JSON_FILES["train"]
    ids, names = _categories(train_path, docs["train"])
    label_of = {cid: k for k, cid in enumerate(ids)}
    entries = {split: _json_entries(root / JSON_FILES[split], doc, label_of) for split, doc in docs.items()}

    train_counts = np.bincount(entries["train"][1], minlength=len(ids))
    check_train_covers_classes(train_counts, names, str(train_path),
                               "Every category must have training images: use the official annotations.")
    splits = {}
    for split, (relpaths, labels, origins) in entries.items():
        where = (lambda i, o=origins, p=root / JSON_FILES[split]: f"{p} {o[i].partition(':')[2]}")
        check_folders_exist(root, relpaths, parent_folders(relpaths), where)
        splits[split] = SourceSplit(labels, absolute_items(root, relpaths), origins)
    description = {
        "kind": "inat2018", "root": str(root.absolute()), "annotations": "json",
        "files": {split: str(root / JSON_FILES[split]) for split in docs},
        "num_classes": len(ids), "notes": notes,
    }
    if ids != list(range(len(ids))):
        description["category_ids"] = ids
    return Source("inat2018", names, splits, description)


def _read_json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_bytes())
    except ValueError as e:
        raise DataError(f"{path}: not valid JSON ({e}). Download the annotation file again.") from e
    for key in ("images", "annotations", "categories"):
        if not isinstance(doc.get(key) if isinstance(doc, dict) else None, list):
            raise DataError(f"{path}: no {key!r} list, so not an iNaturalist 2018 annotation file. "
                            f"Pass the official {JSON_FILES['train']} / {JSON_FILES['val']}.")
    return doc


def _categories(path: Path, doc: dict) -> tuple[list[int], list[str]]:
    """Category ids in sorted order (label k is ids[k]) and their names."""
    by_id = {}
    for j, cat in enumerate(doc["categories"]):
        cid = cat.get("id") if isinstance(cat, dict) else None
        if not isinstance(cid, int):
            raise DataError(f"{path}: categories[{j}] has no integer 'id'. Use the official annotation file.")
        if cid in by_id:
            raise DataError(f"{path}: category id {cid} is listed twice. Use the official annotation file.")
        by_id[cid] = str(cat.get("name") or cid)
    if not by_id:
        raise DataError(f"{path}: the categories list is empty. Use the official annotation file.")
    ids = sorted(by_id)
    return ids, [by_id[cid] for cid in ids]


def _fields(path: Path, where: str, item, keys: tuple[str, ...]) -> tuple:
    """item[key] for each key, or a clear error naming the file and the entry."""
    try:
        return tuple(item[k] for k in keys)
    except (KeyError, TypeError):
        raise DataError(f"{path}: {where} lacks {' or '.join(keys)}. Use the official annotation file.") from None


def _json_entries(path: Path, doc: dict, label_of: dict[int, int]):
    """(relative paths, labels, origins) of the images of one annotation file, in its image order."""
    category_of: dict = {}
    for j, ann in enumerate(doc["annotations"]):
        image_id, category_id = _fields(path, f"annotations[{j}]", ann, ("image_id", "category_id"))
        if image_id in category_of:
            raise DataError(f"{path}: annotations[{j}] is a second annotation of image {image_id}; "
                            f"iNaturalist has one per image. Use the official annotation file.")
        category_of[image_id] = category_id

    relpaths, labels, origins = [], [], []
    for i, image in enumerate(doc["images"]):
        image_id, file_name = _fields(path, f"images[{i}]", image, ("id", "file_name"))
        if image_id not in category_of:
            raise DataError(f"{path}: images[{i}] ({file_name}) has no annotation. "
                            f"Use the official annotation file.")
        category_id = category_of.pop(image_id)
        if category_id not in label_of:
            raise DataError(f"{path}: the annotation of images[{i}] ({file_name}) has category_id "
                            f"{category_id}, which is not among the categories of "
                            f"{JSON_FILES['train']}. Use the official annotation files.")
        if not isinstance(file_name, str) or is_absolute(file_name):
            raise DataError(f"{path}: images[{i}] file_name {file_name!r} is not a path relative to the "
                            f"dataset root. Use the official annotation file.")
        relpaths.append(file_name)
        labels.append(label_of[category_id])
        origins.append(f"{path.name}:images[{i}]")
    if category_of:
        orphan = next(iter(category_of))
        raise DataError(f"{path}: annotations that refer to images not listed ({len(category_of)}) "
                        f"(e.g. image_id {orphan}). Use the official annotation file.")
    if not relpaths:
        raise DataError(f"{path}: no images. Use the official annotation file.")
    return relpaths, np.asarray(labels, dtype=np.int64), origins


# ---- split lists ---------------------------------------------------------------------------------

def _from_lists(root: Path, lists: Path) -> Source:
    parsed, notes = read_list_folder(lists, LIST_FILES, f"Put the iNaturalist 2018 lists (from the "
                                     f"classifier-balancing repository) in {lists}.")

    train = parsed["train"]
    ids = np.unique(train.labels)  # sorted; every id has training images by construction
    for split, listfile in parsed.items():
        unknown = np.flatnonzero(~np.isin(listfile.labels, ids))
        if unknown.size:
            i = int(unknown[0])
            raise DataError(f"{listfile.where(i)}: category {listfile.labels[i]} has no image in "
                            f"{train.path.name}. Use train and val lists of the same categories.")
        if ids[-1] != len(ids) - 1:
            parsed[split] = dataclasses.replace(listfile, labels=np.searchsorted(ids, listfile.labels))

    parents = {split: parent_folders(listfile.relpaths) for split, listfile in parsed.items()}
    # 'train_val2018/Plantae/7477' -> 'Plantae/7477': supercategory and category, the same in both lists
    classes = class_names_from_folders([(parsed[s], parents[s]) for s in parsed], len(ids),
                                       name_of=lambda p: p.split("/", 1)[-1])
    splits = {}
    for split, listfile in parsed.items():
        check_folders_exist(root, listfile.relpaths, parents[split], listfile.where)
        splits[split] = SourceSplit(listfile.labels, absolute_items(root, listfile.relpaths),
                                    listfile.origins())
    description = {
        "kind": "inat2018", "root": str(root.absolute()), "annotations": "lists",
        "lists": {split: listfile.describe() for split, listfile in parsed.items()},
        "official_lists": all(lf.official for lf in parsed.values()) and len(parsed) == len(LIST_FILES),
        "num_classes": len(ids), "notes": notes,
    }
    if ids[-1] != len(ids) - 1:
        description["category_ids"] = ids.tolist()
    return Source("inat2018", classes, splits, description)

