"""CIFAR-10 / CIFAR-100 from the official downloads, and their long-tailed versions (CIFAR-LT).

Accepted as downloaded from https://www.cs.toronto.edu/~kriz/cifar.html, either the .tar.gz or the
extracted folder (the folder holding e.g. `cifar-10-batches-py/`, or that folder itself):

    python version   cifar-10-batches-py/  data_batch_1..5, test_batch, batches.meta  (pickles)
                     cifar-100-python/     train, test, meta
    binary version   cifar-10-batches-bin/ data_batch_1..5.bin, test_batch.bin, batches.meta.txt
                     cifar-100-binary/     train.bin, test.bin, fine_label_names.txt

Archives are read in memory, never extracted. Every data file is checked against the md5 the
official distribution publishes, so a truncated or altered download is caught before it is trained on.

The long-tailed training set is the construction of LDAM-DRW (Cao et al., 2019) and BBN (Zhou et al.,
2020), reproduced exactly so that results compare with the literature: class i keeps
n_i = int(n_max * (1/R) ** (i / (K - 1))) images (n_max = 5000 or 500, R the imbalance ratio), picked
with numpy's legacy generator seeded once; the test set stays whole and balanced.

Optionally (`val_per_class`), a balanced validation split "val" drawn from the training images the
long-tailed subset leaves out (CIFAR-10-LT at R = 100 uses 12,406 of the 50,000): choices can then be
made on images that are neither trained on nor in the test set, without taking the few images of a
tail class away from training (a per-class carve, `val_fraction`, must). A class with too few
left-out images gives up the rest from its training images: in CIFAR-10-LT at R = 100 with 200 per
class only the head class does (it keeps all n_max of its images: 5,000 -> 4,800); in CIFAR-100-LT
the first classes do. meta.json's description records them (`val_taken_from_train`); every other
class trains on exactly the literature's images.
"""
from __future__ import annotations

import codecs
import hashlib
import io
import math
import pickle
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from pipeline.errors import DataError
from pipeline.sources.base import Source, SourceSplit
from pipeline.sources.long_tail import long_tail_indices, validation_indices

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
PIXELS = 3 * 32 * 32


@dataclass(frozen=True)
class Layout:
    """One of the four official downloads."""

    num_classes: int
    kind: str                   # "python" or "binary"
    folder: str                 # top folder of the official archive
    train: tuple[str, ...]
    test: str
    meta: str                   # the class names
    md5: dict                   # official md5 of the data files (and the pickled meta)

    @property
    def name(self) -> str:
        return f"CIFAR-{self.num_classes} {self.kind} version"

    @property
    def files(self) -> tuple[str, ...]:
        return (*self.train, self.test, self.meta)


# The md5s the official distribution publishes (torchvision checks the same values).
CIFAR10_PYTHON_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}
CIFAR10_BINARY_MD5 = {
    "data_batch_1.bin": "5dd7e06a14cb22eb9f671a540d1b7c25",
    "data_batch_2.bin": "5ea93a67294ea407fff1d09f752e9692",
    "data_batch_3.bin": "942cd6a4bcdd0dd3c604fbe906cb4421",
    "data_batch_4.bin": "ae636b3ba5c66a11e91e8cb52e771fcb",
    "data_batch_5.bin": "53f37980c15c3d472c316c40844f3f0d",
    "test_batch.bin": "803d5f7f4d78ea53de84dbe85f74fb6d",
}
CIFAR100_PYTHON_MD5 = {
    "train": "16019d7e3df5f24257cddd939b257f8d",
    "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
    "meta": "7973b15100ade9c7d40fb424638fde48",
}
CIFAR100_BINARY_MD5 = {
    "train.bin": "6172c7755cfe09b2fe270c85cebc1b15",
    "test.bin": "4499cfba6c016c1be1438163640a0898",
}

LAYOUTS = (
    Layout(10, "python", "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)),
           "test_batch", "batches.meta", CIFAR10_PYTHON_MD5),
    Layout(10, "binary", "cifar-10-batches-bin", tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
           "test_batch.bin", "batches.meta.txt", CIFAR10_BINARY_MD5),
    Layout(100, "python", "cifar-100-python", ("train",), "test", "meta", CIFAR100_PYTHON_MD5),
    Layout(100, "binary", "cifar-100-binary", ("train.bin",), "test.bin", "fine_label_names.txt",
           CIFAR100_BINARY_MD5),
)
KNOWN_FILES = {name for layout in LAYOUTS for name in layout.files}


@dataclass
class CifarData:
    """One CIFAR download, decoded, in file order. Images are (N, 32, 32, 3) uint8 RGB."""

    layout: Layout
    classes: list[str]
    train_images: np.ndarray
    train_labels: np.ndarray
    train_origins: list[str]    # "data_batch_3[417]": file and record number
    test_images: np.ndarray
    test_labels: np.ndarray
    test_origins: list[str]
    md5: dict[str, str]         # md5 of every file read
    md5_verified: bool


# ---- public API ----------------------------------------------------------------------------------

def load_cifar_lt(source: Path, num_classes: int, imbalance: float, seed: int = 0,
                  verify_md5: bool = True, val_per_class: int = 0) -> Source:
    """CIFAR-10-LT / CIFAR-100-LT at imbalance ratio `imbalance` (1 = the whole balanced set), with
    splits train and test, and "val" (val_per_class images of every class, drawn with
    numpy.random.default_rng(seed) from the training images not in train) when val_per_class > 0.

    `verify_md5=False` accepts files that are not the official ones (e.g. built by hand); their
    structure is still checked. Raises DataError for a ratio below 1, a class left without
    training images, or a val_per_class larger than a class's training images.
    """
    if not (imbalance >= 1 and math.isfinite(imbalance)):
        raise DataError(f"imbalance ratio {imbalance}: must be a number >= 1 (n_max / n_min; "
                        f"1 keeps the balanced set, the literature uses 10, 50 and 100).")
    if val_per_class < 0:
        raise DataError(f"--val-per-class {val_per_class}: must be 0 (no validation split) or more.")
    data = read_cifar(source, num_classes, verify_md5)
    keep = long_tail_indices(data.train_labels, num_classes, imbalance, seed)
    counts = np.bincount(data.train_labels[keep], minlength=num_classes)
    if not counts.all():
        empty = [data.classes[k] for k in np.flatnonzero(counts == 0)]
        raise DataError(
            f"{source}: at imbalance ratio {imbalance} classes {', '.join(empty[:10])}"
            f"{' ...' if len(empty) > 10 else ''} keep no training image (the download has "
            f"{len(data.train_labels)} training images). Use a smaller ratio or the full download."
        )
    splits, taken = {}, None
    if val_per_class:
        val, keep = validation_indices(data.train_labels, keep, num_classes, val_per_class, seed, source)
        splits["val"] = SourceSplit(data.train_labels[val], data.train_images[val],
                                    [data.train_origins[i] for i in val.tolist()])
        after = np.bincount(data.train_labels[keep], minlength=num_classes)
        counts, taken = after, (counts - after).tolist()
    splits["train"] = SourceSplit(data.train_labels[keep], data.train_images[keep],
                                  [data.train_origins[i] for i in keep.tolist()])
    test = splits["test"] = SourceSplit(data.test_labels, data.test_images, data.test_origins)
    description = {
        "kind": "cifar",
        "source": str(Path(source).absolute()),
        "format": data.layout.name,
        "md5": data.md5,
        "md5_verified": data.md5_verified,
        "imbalance": float(imbalance),
        "seed": seed,
        "construction": "LDAM-DRW / BBN: n_i = int(n_max * (1/R)^(i/(K-1))), numpy legacy seed, "
                        "classes in label order",
        "train_class_counts": counts.tolist(),
        "test_class_counts": np.bincount(test.labels, minlength=num_classes).tolist(),
        "val_per_class": val_per_class,
        "val_taken_from_train": taken,  # per class: the images the validation split took from train
    }
    name = f"cifar{num_classes}-lt" if imbalance > 1 else f"cifar{num_classes}"
    return Source(name, data.classes, splits, description)


def read_cifar(source: Path, num_classes: int, verify_md5: bool = True) -> CifarData:
    """Read and check a CIFAR download (.tar.gz or extracted folder), images in file order."""
    source = Path(source)
    if num_classes not in (10, 100):
        raise DataError(f"CIFAR has 10 or 100 classes, not {num_classes}. Pick CIFAR-10 or CIFAR-100.")
    if source.is_dir():
        layout, files, where = _read_folder(source, num_classes)
    elif source.is_file():
        layout, files, where = _read_archive(source, num_classes)
    else:
        raise DataError(f"{source}: no such file or folder. Pass the CIFAR-{num_classes} download "
                        f"(.tar.gz from {CIFAR_URL}) or the folder it was extracted to.")

    md5 = {name: hashlib.md5(data).hexdigest() for name, data in files.items()}
    if verify_md5:
        for name, expected in layout.md5.items():
            if md5[name] != expected:
                raise DataError(
                    f"{where(name)}: md5 {md5[name]} is not the official {expected}: this is not the "
                    f"official {layout.name} file (a corrupt or incomplete download?). Download it "
                    f"again from {CIFAR_URL}."
                )

    classes = _class_names(layout, files[layout.meta], where(layout.meta))
    train = [_records(layout, files[name], where(name)) for name in layout.train]
    test_images, test_labels = _records(layout, files[layout.test], where(layout.test))
    return CifarData(
        layout=layout, classes=classes,
        train_images=np.concatenate([x for x, _ in train]),
        train_labels=np.concatenate([y for _, y in train]),
        train_origins=[f"{name}[{j}]" for name, (_, y) in zip(layout.train, train) for j in range(len(y))],
        test_images=test_images, test_labels=test_labels,
        test_origins=[f"{layout.test}[{j}]" for j in range(len(test_labels))],
        md5=md5, md5_verified=verify_md5,
    )


# ---- finding the files ---------------------------------------------------------------------------

def _detect(source: Path, num_classes: int, has) -> tuple[Layout, str]:
    """The layout whose files are present (`has(relpath)`) and the folder ('' or 'x/') holding them."""
    found = [(layout, base) for layout in LAYOUTS for base in (f"{layout.folder}/", "")
             if has(base + layout.train[0])]
    for layout, base in found:
        if layout.num_classes == num_classes:
            missing = [name for name in layout.files if not has(base + name)]
            if missing:
                raise DataError(f"{source}: {', '.join(base + m for m in missing)} missing from the "
                                f"{layout.name}. Download it again from {CIFAR_URL}.")
            return layout, base
    if found:
        other = found[0][0]
        raise DataError(f"{source} is the {other.name}, but CIFAR-{num_classes} was asked for. "
                        f"Pass the CIFAR-{num_classes} download, or ask for CIFAR-{other.num_classes}.")
    expected = ", ".join(f"{layout.folder}/{layout.train[0]}" for layout in LAYOUTS
                         if layout.num_classes == num_classes)
    raise DataError(f"{source}: no CIFAR-{num_classes} files found (expected {expected}). Pass the "
                    f"official download from {CIFAR_URL} or the folder it was extracted to.")


def _read_folder(source: Path, num_classes: int):
    layout, base = _detect(source, num_classes, lambda rel: (source / rel).is_file())
    files = {name: (source / base / name).read_bytes() for name in layout.files}
    return layout, files, lambda name: str(source / base / name)


def _read_archive(source: Path, num_classes: int):
    """Read the CIFAR members of a tar archive into memory in one sequential pass.

    A .tar.gz cannot seek backwards cheaply, so every member with a CIFAR file name is kept as it
    streams past (about 180 MB for CIFAR-10) and the layout is decided afterwards.
    """
    with open(source, "rb") as f:
        magic = f.read(4)
    if magic.startswith(b"PK"):
        raise DataError(f"{source} is a zip archive; CIFAR is distributed as .tar.gz. Pass the official "
                        f"download from {CIFAR_URL} or the folder it was extracted to.")
    contents: dict[str, bytes] = {}
    try:
        with tarfile.open(source, "r:*") as tar:
            for member in tar:
                path = PurePosixPath(member.name)
                if path.is_absolute() or ".." in path.parts:
                    raise DataError(f"{source}: member {member.name!r} points outside the archive "
                                    f"folder, so this is not an official CIFAR archive. Download it "
                                    f"again from {CIFAR_URL}.")
                if member.isfile() and path.name in KNOWN_FILES:
                    contents[path.as_posix()] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{source}: not a readable .tar.gz archive ({first}). Download it again from "
                        f"{CIFAR_URL}, or pass the extracted folder.") from e
    layout, base = _detect(source, num_classes, lambda rel: rel in contents)
    files = {name: contents[base + name] for name in layout.files}
    return layout, files, lambda name: f"{source}:{base}{name}"


# ---- decoding the files --------------------------------------------------------------------------

def _records(layout: Layout, data: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 32, 32, 3) uint8 RGB, labels int64) of one batch file."""
    if layout.kind == "binary":
        # CIFAR-10 records: label byte + pixels; CIFAR-100: coarse label, fine label, pixels.
        labels_per_record = 1 if layout.num_classes == 10 else 2
        size = labels_per_record + PIXELS
        if len(data) == 0 or len(data) % size:
            raise DataError(f"{where}: {len(data)} bytes is not a whole number of {size}-byte records "
                            f"(truncated?). Download the file again from {CIFAR_URL}.")
        rec = np.frombuffer(data, dtype=np.uint8).reshape(-1, size)
        labels, pixels = rec[:, labels_per_record - 1].astype(np.int64), rec[:, labels_per_record:]
    else:
        batch = _unpickle(data, where)
        key = "labels" if layout.num_classes == 10 else "fine_labels"
        if "data" not in batch or key not in batch:
            raise DataError(f"{where}: no 'data' and {key!r} entries, so not a {layout.name} batch. "
                            f"Download it again from {CIFAR_URL}.")
        pixels = batch["data"]
        if not (isinstance(pixels, np.ndarray) and pixels.dtype == np.uint8 and pixels.ndim == 2
                and pixels.shape[1] == PIXELS):
            raise DataError(f"{where}: 'data' is not an (N, {PIXELS}) uint8 array, so not a "
                            f"{layout.name} batch. Download it again from {CIFAR_URL}.")
        try:
            labels = np.asarray(batch[key], dtype=np.int64).reshape(-1)
        except (TypeError, ValueError):
            raise DataError(f"{where}: {key!r} are not integers. "
                            f"Download it again from {CIFAR_URL}.") from None
        if len(labels) != len(pixels):
            raise DataError(f"{where}: {len(labels)} labels for {len(pixels)} images. "
                            f"Download it again from {CIFAR_URL}.")
    bad = np.flatnonzero((labels < 0) | (labels >= layout.num_classes))
    if bad.size:
        raise DataError(f"{where}: record {bad[0]} has label {labels[bad[0]]}, outside "
                        f"0..{layout.num_classes - 1}. Download the file again from {CIFAR_URL}.")
    # records hold three 32x32 planes (R, G, B); images are stored height x width x channel
    images = np.ascontiguousarray(pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return images, labels


def _class_names(layout: Layout, data: bytes, where: str) -> list[str]:
    if layout.kind == "binary":
        try:
            names = [line.strip() for line in data.decode("utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError:
            names = []
    else:
        key = "label_names" if layout.num_classes == 10 else "fine_label_names"
        raw = _unpickle(data, where).get(key)
        raw = raw if isinstance(raw, list) else []
        names = [n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in raw]
    if len(names) != layout.num_classes:
        raise DataError(f"{where}: expected {layout.num_classes} class names, found {len(names)}. "
                        f"Download the file again from {CIFAR_URL}.")
    return names


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings and numpy arrays, nothing else.

    A pickle can run arbitrary code when loaded; refusing every other global keeps a file that is
    not really a CIFAR batch from doing more than failing to load.
    """

    # The official batches were pickled by numpy 1.x (numpy.core); numpy 2 writes numpy._core.
    _RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]
    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
        ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # bytes pickled by Python 3 at protocol 2
    }

    def find_class(self, module, name):
        try:
            return self.ALLOWED[module, name]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}") from None


def _unpickle(data: bytes, where: str) -> dict:
    """A CIFAR pickle as a dict with str keys (Python 2 pickles give bytes keys)."""
    try:
        obj = _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # a broken pickle raises almost anything; all mean "not a CIFAR batch"
        raise DataError(f"{where}: not a CIFAR python-version file ({type(e).__name__}: {e}). "
                        f"Download it again from {CIFAR_URL}.") from e
    if not isinstance(obj, dict):
        raise DataError(f"{where}: not a CIFAR python-version file (holds a {type(obj).__name__}, "
                        f"not a dict). Download it again from {CIFAR_URL}.")
    return {k.decode("latin-1") if isinstance(k, bytes) else k: v for k, v in obj.items()}
