"""A folder of images with one subfolder per class (the torchvision ImageFolder layout).

    root/<class>/...image files            everything is the train split, or with a holdout,
                                           train + a test split drawn from it per class
    root/train/<class>/..., root/val/<class>/..., root/test/<class>/...
                                           when root/train exists: splits from the subtrees

Classes are the subfolder names of the train tree sorted by code point, as torchvision's
`ImageFolder` sorts them (label k is the k-th name; "B" comes before "a"); the classes of val/ and
test/ must be among them. Images are found by extension (.jpg .jpeg .png .bmp .webp, any case),
recursively inside a class folder (images in subfolders of a class belong to that class), in sorted
order; hidden files and folders are skipped and other files are counted, not read. A class folder
without images is an error: a class that cannot be trained on is almost always a mistake in the tree.

Holdout (`holdout` = a fraction 0 < F < 1, or a whole number N >= 1 of images per class): from each
class of n images, k = round(F * n) (at least 1) or k = N images are drawn for `test`, capped at
n - 1 so that every class keeps at least one training image; a class of one image has no test
image. The draw is a permutation of the class's sorted paths by numpy's default generator seeded
with (seed, class index): the same tree and seed give the same split on any machine. The draw is
over the files found, before any is decoded (reading a whole tree first would double the cost of
a conversion): a file that turns out unreadable stops the conversion, or with `--on-error skip` is
left out of the split that drew it, so that split has one image fewer in that class (listed in
OUT/skipped.json); removing the file and converting again draws anew.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pipeline.errors import DataError
from pipeline.progress import say
from pipeline.sources.base import Source, SourceSplit

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
EVAL_SPLITS = ("val", "test")


def load_folder(root: Path, holdout: float | int | None = None, seed: int = 0) -> Source:
    """One class per subfolder; splits from root/train, root/val, root/test when root/train exists.

    holdout: None, a float in (0, 1) (fraction of each class) or an int >= 1 (images per class)
    drawn into a `test` split, deterministically from `seed` (see the module docstring).
    Raises DataError for a missing folder, an empty class, or a holdout on a tree with splits.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder. Pass the folder holding one subfolder per class.")
    if holdout is not None:
        check_holdout(holdout)
        present = [s for s in ("train", *EVAL_SPLITS) if (root / s).is_dir()]
        if present:
            raise DataError(f"{root} already has split folders ({', '.join(f'{s}/' for s in present)}): "
                            f"--holdout draws a test split from a ROOT/<class>/ tree only. Drop "
                            f"--holdout to use the splits as they are.")
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
    if holdout is not None:
        splits["train"], splits["test"], description["holdout"] = _hold_out(
            splits["train"], classes, holdout, seed)
        description["layout"] = "one tree, a test split drawn from it per class (--holdout)"
    return Source(root.absolute().name, classes, splits, description)


def check_holdout(holdout: float | int) -> None:
    """DataError unless holdout is a fraction in (0, 1) or a whole number >= 1."""
    if isinstance(holdout, float) and not 0.0 < holdout < 1.0:
        raise DataError(f"--holdout {holdout}: a fraction must be between 0 and 1 (e.g. 0.2), or give "
                        f"a whole number of images per class (e.g. 10).")
    if isinstance(holdout, int) and holdout < 1:
        raise DataError(f"--holdout {holdout}: a number of images per class must be at least 1.")


def _hold_out(train: SourceSplit, classes: list[str], holdout: float | int, seed: int):
    """(train, test, record): `holdout` images of each class moved to test, as the docstring says."""
    keep, held, capped, shown = [], [], [], []
    for k, name in enumerate(classes):
        members = np.flatnonzero(train.labels == k)  # the class's paths, in sorted order
        n = len(members)
        wanted = max(1, round(holdout * n)) if isinstance(holdout, float) else holdout
        take = min(wanted, n - 1)
        if take < wanted:
            capped.append(name)
            shown.append(f"{name} ({n} images: {take} to test)")
        order = np.random.default_rng([seed, k]).permutation(n)
        held.append(np.sort(members[order[:take]]))
        keep.append(np.sort(members[order[take:]]))
    keep, held = np.concatenate(keep), np.concatenate(held)

    def part(rows):
        return SourceSplit(train.labels[rows], [train.items[i] for i in rows])

    if capped:
        listed = "; ".join(shown[:8]) + (f"; and {len(shown) - 8} more" if len(shown) > 8 else "")
        say(f"holdout {holdout}: {len(capped)} classes are too small to give their share and keep a "
            f"training image, so each keeps one: {listed}. Their test accuracy rests on few images.")
    record = {"rule": "fraction of each class" if isinstance(holdout, float) else "images per class",
              "value": holdout, "seed": seed, "split": "test",
              "classes_capped": capped}
    return part(keep), part(held), record


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
