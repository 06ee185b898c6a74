"""List files of the long-tail literature and the structural checks the list-based readers share.

A list file has one sample per line, `relative/path.ext label`, paths relative to the dataset root:

    train/n01440764/n01440764_10026.JPEG 0

ImageNet-LT and iNaturalist 2018 are distributed this way (the Decoupling / classifier-balancing
lists, identical across the long-tail repositories). Reading is one pass over the text with no file
system access per sample, so a 437,513-line list takes well under a second; whether each image
exists and decodes is the converter's job, which reports it with the list line from `origins`.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.errors import DataError

# (size in bytes, sha256) of the lists every long-tail paper uses, so a description can say whether
# results are comparable with the literature. The train lists' values are those of the Git-LFS
# objects in rahulvigneswaran/My_Custom_Datasets; the val/test ones were hashed from the lists
# themselves. The size is compared first so that other lists are never hashed.
OFFICIAL_LISTS = {
    "ImageNet_LT_train.txt": (4658674, "efdbdad4f050237c310b2f354cf95a8b1d7c8d57a63c4ea4bb6bf2bcb012f37f"),
    "ImageNet_LT_val.txt": (804172, "9af7ba688acf9532ff5845a8fb14a1e97fdc4c51ac48bc72c08ea9c3f7ff142e"),
    "ImageNet_LT_test.txt": (2344500, "d1590191cf8a71fada7b1aaedaa2d139a2aea93ff2f1b755319d0bd8dbaa55d5"),
    "iNaturalist18_train.txt": (29804998, "158fa2dca040e6e95b06c68c7cdff40fe696f202793b2aa0e8b854321ffe1adf"),
    "iNaturalist18_val.txt": (1677390, "efaeff65f80641b60864470e6f255aa69453406ef5717eec8c6681748f3a61f3"),
}

# At most this many classes or folders are named when a check fails for many of them.
MAX_NAMED = 10


@dataclass
class ListFile:
    """The parsed entries of one list file, in file order."""

    path: Path
    relpaths: list[str]
    labels: np.ndarray        # int64, as written in the file
    line_numbers: np.ndarray  # 1-based line of each entry (blank lines are skipped)
    official: bool            # byte-identical to the list of the same name the literature uses

    def __len__(self) -> int:
        return len(self.relpaths)

    def where(self, i: int) -> str:
        """`path:line` of entry i, for error messages."""
        return f"{self.path}:{self.line_numbers[i]}"

    def origins(self) -> list[str]:
        """`name:line` of every entry, what `SourceSplit.origins` carries."""
        name = self.path.name
        return [f"{name}:{n}" for n in self.line_numbers.tolist()]

    def describe(self) -> dict:
        return {"file": str(self.path), "entries": len(self), "official": self.official}


def read_list(path: Path) -> ListFile:
    """Parse a `relative/path label` list; malformed lines are a DataError naming `path:line`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such list file. Pass the folder that holds it (see --help).")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not a text list file ({e}). Pass the list of "
                        f"`relative/path label` lines.") from e

    relpaths, labels, numbers = [], [], []
    for n, line in enumerate(text.splitlines(), start=1):
        parts = line.rsplit(maxsplit=1)  # rsplit: a path may contain spaces, a label never does
        if not parts:
            continue
        if len(parts) != 2:
            raise DataError(f"{path}:{n}: expected `relative/path label`, found {line.strip()!r}. "
                            f"Fix or remove the line.")
        rel, label = parts
        try:
            value = int(label)
        except ValueError:
            raise DataError(f"{path}:{n}: label {label!r} is not an integer. Fix the line "
                            f"(labels are class numbers 0, 1, ...).") from None
        if value < 0:
            raise DataError(f"{path}:{n}: negative label {value}. Labels are class numbers 0, 1, ...")
        if is_absolute(rel):
            raise DataError(f"{path}:{n}: {rel!r} is an absolute path; list paths must be relative "
                            f"to the dataset root. Remove the leading folder from the list.")
        relpaths.append(rel)
        labels.append(value)
        numbers.append(n)
    if not relpaths:
        raise DataError(f"{path}: the list is empty. Pass a list with one `relative/path label` per line.")
    return ListFile(path, relpaths, np.asarray(labels, dtype=np.int64),
                    np.asarray(numbers, dtype=np.int64), _is_official(path.name, data))


def read_list_folder(lists: Path, files: dict[str, str], fetch_hint: str) -> tuple[dict, list[str]]:
    """The list files of a folder ({split: file name}): the train list is required, the others are
    read when present and noted when absent. Returns ({split: ListFile}, notes)."""
    if not lists.is_dir():
        raise DataError(f"{lists}: no such folder. Pass the folder holding {files['train']}.")
    if not (lists / files["train"]).is_file():
        raise DataError(f"{lists / files['train']} is missing. {fetch_hint}")
    return read_split_files(lists, files, read_list)


def read_split_files(folder: Path, files: dict[str, str], read) -> tuple[dict, list[str]]:
    """`read(path)` of each split's file that is present in `folder`, and a note for each absent one:
    ({split: what read returned}, notes)."""
    parsed, notes = {}, []
    for split, name in files.items():
        if (folder / name).is_file():
            parsed[split] = read(folder / name)
        else:
            notes.append(f"{name} not found in {folder}: no {split} split")
    return parsed, notes


def is_absolute(rel: str) -> bool:
    """POSIX or Windows absolute path (joined to a root, it would silently replace the root)."""
    return rel.startswith(("/", "\\")) or (len(rel) > 1 and rel[1] == ":")


def _is_official(name: str, data: bytes) -> bool:
    size, sha256 = OFFICIAL_LISTS.get(name, (None, None))
    return len(data) == size and hashlib.sha256(data).hexdigest() == sha256


def parent_folders(relpaths: list[str]) -> list[str]:
    """The folder part of each relative path ('' for a file at the root)."""
    return [r.replace("\\", "/").rpartition("/")[0] for r in relpaths]


def check_folders_exist(root: Path, relpaths: list[str], parents: list[str],
                        where: Callable[[int], str], hint: str = "") -> None:
    """Every folder the entries point into exists under `root`; `where(i)` locates entry i.

    One check per distinct folder (a few thousand), not per image: it catches a wrong root or a
    missing part of the dataset before a long conversion starts.
    """
    first_entry: dict[str, int] = {}
    for i, p in enumerate(parents):
        first_entry.setdefault(p, i)
    missing = [p for p in first_entry if not (root / p).is_dir()]
    if missing:
        i = first_entry[missing[0]]
        shown = ", ".join(missing[:MAX_NAMED]) + (" ..." if len(missing) > MAX_NAMED else "")
        raise DataError(
            f"{where(i)}: {relpaths[i]!r} is in {root / missing[0]}, which does not exist "
            f"({len(missing)} of the {len(first_entry)} folders used are missing: {shown}). "
            f"Pass the dataset root that holds them.{(' ' + hint) if hint else ''}"
        )


def class_names_from_folders(lists: list[tuple[ListFile, list[str]]], num_classes: int,
                             name_of: Callable[[str], str]) -> list[str]:
    """Class k's name from the folder its images are in; one folder per class, one class per folder.

    `lists` pairs each list with the parent folder of each entry; `name_of` turns a parent folder
    into the class name (e.g. 'train/n01440764' -> 'n01440764', so that train and val agree).
    """
    names: list[str | None] = [None] * num_classes
    first: dict[int, str] = {}  # label -> where its name was first seen
    for listfile, parents in lists:
        # the first line of each distinct (label, folder) pair: a few thousand checks, not one per line
        pairs: dict[tuple[int, str], int] = {}
        for i, pair in enumerate(zip(listfile.labels.tolist(), parents)):
            pairs.setdefault(pair, i)
        for (label, parent), i in pairs.items():
            name = name_of(parent)
            if names[label] is None:
                names[label] = name
                first[label] = listfile.where(i)
            elif names[label] != name:
                raise DataError(
                    f"{listfile.where(i)}: label {label} is given to an image in folder {name!r}, but "
                    f"{first[label]} gives it to folder {names[label]!r}. Each class must be one "
                    f"folder: fix the label of one of the lines."
                )
    seen: dict[str, int] = {}
    for label, name in enumerate(names):
        if name is None:
            continue
        if name in seen:
            raise DataError(
                f"{first[label]}: folder {name!r} has label {label}, but {first[seen[name]]} gives "
                f"it label {seen[name]}. Each folder must be one class: fix the label of one line."
            )
        seen[name] = label
    return [n if n is not None else str(k) for k, n in enumerate(names)]


def check_train_covers_classes(counts: np.ndarray, classes: list[str], where: str, fix: str) -> None:
    """Every class has at least one training image (a class without any cannot be learned)."""
    empty = np.flatnonzero(np.asarray(counts) == 0).tolist()
    if empty:
        shown = ", ".join(f"{k} ({classes[k]})" for k in empty[:MAX_NAMED])
        more = f" and {len(empty) - MAX_NAMED} more" if len(empty) > MAX_NAMED else ""
        raise DataError(f"{where}: classes without a training image ({len(empty)}): {shown}{more}. {fix}")


def absolute_items(root: Path, relpaths: list[str]) -> list[str]:
    """root/relpath as absolute path strings (string joins: Path objects cost ~1 s per 500k)."""
    base = os.path.abspath(root)
    return [os.path.join(base, r) for r in relpaths]
