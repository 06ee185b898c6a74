"""ImageNet-LT: the ImageNet (ILSVRC-2012) images under the long-tailed split lists.

    root/   the ImageNet folder: train/<wnid>/<wnid>_N.JPEG and val/<wnid>/ILSVRC2012_val_N.JPEG
    lists/  ImageNet_LT_train.txt (115,846 lines, required), ImageNet_LT_val.txt (20,000, drawn from
            ImageNet's train images) and ImageNet_LT_test.txt (50,000, ImageNet's val images)

ImageNet's validation images come as one flat folder; the ImageNet-LT lists expect them sorted into
one folder per wnid, as most ImageNet tooling does. Class k is named by the wnid folder of its
images (the same in every list).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.errors import DataError
from pipeline.sources.base import Source, SourceSplit
from pipeline.sources.lists import (
    absolute_items, check_folders_exist, check_train_covers_classes, class_names_from_folders,
    parent_folders, read_list_folder,
)

LIST_FILES = {"train": "ImageNet_LT_train.txt", "val": "ImageNet_LT_val.txt", "test": "ImageNet_LT_test.txt"}
FLAT_VAL_HINT = ("If ImageNet's val/ images are in one flat folder, sort them into one folder per wnid "
                 "first (e.g. with the widely used valprep.sh).")


def load_imagenet_lt(root: Path, lists: Path) -> Source:
    """ImageNet-LT with splits train, val and test (val/test when their lists are present)."""
    root, lists = Path(root), Path(lists)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder. Pass the ImageNet root "
                        f"(the folder holding train/ and val/).")
    parsed, notes = read_list_folder(lists, LIST_FILES, f"Download the ImageNet-LT lists (from the "
                                     f"classifier-balancing / OLTR repositories) into {lists}.")

    train = parsed["train"]
    num_classes = int(train.labels.max()) + 1
    for split, listfile in parsed.items():
        bad = np.flatnonzero(listfile.labels >= num_classes)
        if bad.size:
            raise DataError(
                f"{listfile.where(int(bad[0]))}: label {listfile.labels[bad[0]]} is out of range: "
                f"{train.path.name} has labels 0..{num_classes - 1}. Use lists of the same class set."
            )

    parents = {split: parent_folders(listfile.relpaths) for split, listfile in parsed.items()}
    classes = class_names_from_folders(
        [(parsed[s], parents[s]) for s in parsed], num_classes, name_of=lambda p: p.rpartition("/")[2])
    train_counts = np.bincount(train.labels, minlength=num_classes)
    check_train_covers_classes(train_counts, classes, str(train.path),
                               "Every label from 0 to the largest must have training images.")
    for split, listfile in parsed.items():
        check_folders_exist(root, listfile.relpaths, parents[split], listfile.where,
                            hint=FLAT_VAL_HINT if split == "test" else "")

    splits = {split: SourceSplit(listfile.labels, absolute_items(root, listfile.relpaths), listfile.origins())
              for split, listfile in parsed.items()}
    covered = {split: int(np.unique(listfile.labels).size) for split, listfile in parsed.items()}
    notes += [f"{parsed[s].path.name} covers {n} of the {num_classes} classes" for s, n in covered.items()
              if n < num_classes]
    description = {
        "kind": "imagenet-lt",
        "root": str(root.absolute()),
        "lists": {split: listfile.describe() for split, listfile in parsed.items()},
        "official_lists": all(listfile.official for listfile in parsed.values()) and len(parsed) == 3,
        "num_classes": num_classes,
        "classes_per_split": covered,
        "notes": notes,
    }
    return Source("imagenet-lt", classes, splits, description)
