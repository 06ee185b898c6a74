"""A folder of images with one subfolder per class (the torchvision ImageFolder layout).

    root/<class>/...image files            everything is the train split
    root/train/<class>/..., root/val/<class>/..., root/test/<class>/...
                                           when root/train exists: splits from the subtrees

Classes are the subfolder names of the train tree in sorted order (label k is the k-th name); the
classes of val/ and test/ must be among them. Images are found by extension (.jpg .jpeg .png .bmp
.webp, any case), recursively inside a class folder, in sorted order; hidden files and folders are
skipped and other files are counted, not read. A class folder without images is an error: a class
that cannot be trained on is almost always a mistake in the tree.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pipeline.errors import DataError
from pipeline.sources.base import Source, SourceSplit

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
EVAL_SPLITS = ("val", "test")


def load_folder(root: Path) -> Source:
    """One class per subfolder; splits from root/train, root/val, root/test when root/train exists."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder. Pass the folder holding one subfolder per class.")
    if (root / "train").is_dir():
        trees = {"train": root / "train"}
        trees.update({s: root / s for s in EVAL_SPLITS if (root / s).is_dir()})
        layout = f"split folders: {', '.join(trees)}"
    else:
        trees = {"train": root}
        layout = "one tree, all of it the train split (no train/ subfolder)"

    scanned = {split: _scan(tree) for split, tree in trees.items()}
    classes = sorted(scanned["train"][0])
    if not classes:
        raise DataError(f"{trees['train']}: no class subfolders. Put the images of each class in a "
                        f"subfolder named after the class.")
    label_of = {name: k for k, name in enumerate(classes)}

    splits, ignored = {}, {}
    for split, (per_class, other_files) in scanned.items():
        unknown = sorted(set(per_class) - set(label_of))
        if unknown:
            raise DataError(f"{trees[split] / unknown[0]}: class {unknown[0]!r} has no folder in "
                            f"{trees['train']}. Every class of {split}/ must also be a class of train/: "
                            f"rename or remove the folder.")
        items, labels = [], []
        for name in sorted(per_class, key=label_of.get):
            items += per_class[name]
            labels += [label_of[name]] * len(per_class[name])
        if not items:
            raise DataError(f"{trees[split]}: no class subfolders. Put the images of each class in a "
                            f"subfolder named after the class.")
        splits[split] = SourceSplit(np.asarray(labels, dtype=np.int64), items)
        ignored[split] = other_files

    description = {
        "kind": "folder",
        "root": str(root.absolute()),
        "layout": layout,
        "image_extensions": list(IMAGE_EXTENSIONS),
        "non_image_files_ignored": ignored,
    }
    return Source(root.absolute().name, classes, splits, description)


def _scan(tree: Path) -> tuple[dict[str, list[str]], int]:
    """({class name: sorted absolute image paths}, number of non-image files ignored) of one tree."""
    per_class, other_files = {}, 0
    for entry in sorted(os.scandir(tree), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            other_files += 1  # a file beside the class folders belongs to no class
            continue
        images, others = _images_under(entry.path)
        if not images:
            raise DataError(f"{entry.path}: class folder without images ({', '.join(IMAGE_EXTENSIONS)}). "
                            f"Add its images or remove the folder.")
        per_class[entry.name] = images
        other_files += others
    return per_class, other_files


def _images_under(folder: str) -> tuple[list[str], int]:
    """Image paths under `folder` (recursively, sorted, hidden entries skipped), non-image count."""
    images, others = [], 0
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # in place: os.walk descends these
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            if name.lower().endswith(IMAGE_EXTENSIONS):
                images.append(os.path.abspath(os.path.join(dirpath, name)))
            else:
                others += 1
    return images, others
