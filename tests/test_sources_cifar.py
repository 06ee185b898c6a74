"""CIFAR readers and the CIFAR-LT construction.

The real CIFAR-10 binary version is rebuilt from ../shared/data (skipped on a fresh clone); the python
version and CIFAR-100 are not available here, so small files in their exact formats are written by
the tests.
"""
from __future__ import annotations

import io
import json
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import DataError
from pipeline.sources.cifar import load_cifar_lt, read_cifar
from pipeline.sources.long_tail import long_tail_counts, long_tail_indices

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# ---- the real CIFAR-10 -----------------------------------------------------------------------------

@pytest.fixture(scope="session")
def cifar10(cifar10_bin):
    return read_cifar(cifar10_bin, 10)


@pytest.fixture(scope="session")
def sheets(shared_data):
    """Decoded WebP sheets: name -> (10000, 32, 32, 3), the source the binary files were built from."""
    cache = {}

    def get(name):
        if name not in cache:
            grid = np.asarray(Image.open(shared_data / "cifar10" / f"{name}.webp").convert("RGB"))
            cache[name] = grid.reshape(100, 32, 100, 32, 3).transpose(0, 2, 1, 3, 4).reshape(-1, 32, 32, 3)
        return cache[name]
    return get


def test_real_cifar10_facts(cifar10, shared_data):
    assert cifar10.layout.kind == "binary" and cifar10.md5_verified
    assert cifar10.classes == CIFAR10_NAMES
    assert cifar10.train_images.shape == (50000, 32, 32, 3) and cifar10.train_images.dtype == np.uint8
    assert cifar10.train_labels[0] == 6  # frog
    assert np.bincount(cifar10.train_labels[:10000]).tolist() == [1005, 974, 1032, 1016, 999, 937, 1030,
                                                                  1001, 1025, 981]
    assert np.bincount(cifar10.train_labels).tolist() == [5000] * 10
    assert np.bincount(cifar10.test_labels).tolist() == [1000] * 10
    official = json.loads((shared_data / "cifar10" / "labels.json").read_text())["labels"]
    assert cifar10.test_labels.tolist() == official["test_batch"]


def test_real_cifar10_pixels_match_the_source_sheets(cifar10, sheets):
    for i in (0, 1, 4321, 9999):
        assert np.array_equal(cifar10.train_images[i], sheets("data_batch_1")[i])
        assert np.array_equal(cifar10.train_images[40000 + i], sheets("data_batch_5")[i])
        assert np.array_equal(cifar10.test_images[i], sheets("test_batch")[i])


@pytest.mark.parametrize("ratio,total", [(100, 12406), (50, 13996), (10, 20431)])
def test_cifar10_lt_sizes(cifar10, ratio, total):
    assert len(long_tail_indices(cifar10.train_labels, 10, ratio)) == total


def test_cifar10_lt_from_tar_and_folder(cifar10_bin, sheets):
    from_tar = load_cifar_lt(cifar10_bin / "cifar-10-binary.tar.gz", 10, 100)
    from_parent = load_cifar_lt(cifar10_bin, 10, 100)
    from_folder = load_cifar_lt(cifar10_bin / "cifar-10-batches-bin", 10, 100)
    train = from_tar.splits["train"]
    assert from_tar.name == "cifar10-lt" and from_tar.classes == CIFAR10_NAMES
    assert np.bincount(train.labels).tolist() == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert from_tar.description["train_class_counts"] == np.bincount(train.labels).tolist()
    assert from_tar.description["md5_verified"] and len(from_tar.description["md5"]) == 7
    test = from_tar.splits["test"]
    assert len(test.labels) == 10000 and np.bincount(test.labels).tolist() == [1000] * 10
    for other in (from_parent, from_folder):
        assert other.classes == from_tar.classes
        for split in ("train", "test"):
            assert np.array_equal(other.splits[split].labels, from_tar.splits[split].labels)
            assert np.array_equal(other.splits[split].items, from_tar.splits[split].items)
        assert other.splits["train"].origins == train.origins
    # the origin of a selected image names its file and record: check pixels against the source
    for i in (0, 5000, 12405):
        name, record = train.origins[i][:-1].split("[")
        assert np.array_equal(train.items[i], sheets(name.removesuffix(".bin"))[int(record)])


def test_cifar10_lt_selection_is_the_ldam_drw_loop(cifar10):
    """The selected indices equal the literal LDAM-DRW code (global numpy seed, per-class shuffle)."""
    targets = cifar10.train_labels
    saved = np.random.get_state()
    try:
        np.random.seed(0)
        img_max = len(targets) / 10
        expected = []
        for the_class in range(10):
            the_img_num = int(img_max * (0.01 ** (the_class / (10 - 1.0))))
            idx = np.where(np.array(targets, dtype=np.int64) == the_class)[0]
            np.random.shuffle(idx)
            expected.append(idx[:the_img_num])
    finally:
        np.random.set_state(saved)
    assert np.array_equal(long_tail_indices(targets, 10, 100), np.concatenate(expected))
    assert not np.array_equal(long_tail_indices(targets, 10, 100, seed=1), np.concatenate(expected))


def test_cifar10_ratio_one_is_the_whole_set(cifar10_bin):
    source = load_cifar_lt(cifar10_bin, 10, 1)
    assert source.name == "cifar10"
    assert np.bincount(source.splits["train"].labels).tolist() == [5000] * 10


def test_cifar10_download_asked_as_cifar100(cifar10_bin):
    with pytest.raises(DataError, match="CIFAR-10 binary version, but CIFAR-100 was asked for"):
        read_cifar(cifar10_bin, 100)


# ---- generated files in the official formats --------------------------------------------------------

def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def _records(images: np.ndarray) -> np.ndarray:
    """(N, 3072) rows of R, G, B planes, as the official files store pixels."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


def _labels(num_classes: int, per_class: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(num_classes), per_class))


def _pickle(path: Path, obj: dict) -> None:
    # the official files are Python 2 pickles: their str keys and names load as bytes
    path.write_bytes(pickle.dumps(obj, protocol=2))


def write_cifar10_python(root: Path, per_class: int = 10) -> dict:
    """cifar-10-batches-py/ with 5 train batches and a test batch; returns the expected content."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    labels = _labels(10, per_class, 1)
    images = _images(len(labels), 2)
    for b, (x, y) in enumerate(zip(np.split(images, 5), np.split(labels, 5)), start=1):
        _pickle(d / f"data_batch_{b}", {b"batch_label": b"training batch", b"labels": y.tolist(),
                                        b"data": _records(x), b"filenames": [b"x.png"] * len(y)})
    test_labels, test_images = _labels(10, 3, 3), _images(30, 4)
    _pickle(d / "test_batch", {b"batch_label": b"testing batch", b"labels": test_labels.tolist(),
                               b"data": _records(test_images), b"filenames": [b"x.png"] * 30})
    _pickle(d / "batches.meta", {b"label_names": [n.encode() for n in CIFAR10_NAMES],
                                 b"num_cases_per_batch": len(labels) // 5, b"num_vis": 3072})
    return {"train": (images, labels), "test": (test_images, test_labels)}


def write_cifar100(root: Path, kind: str, per_class: int = 3) -> dict:
    """cifar-100-python/ or cifar-100-binary/; returns the expected content."""
    names = [f"fine{k}" for k in range(100)]
    content = {"train": (_images(100 * per_class, 5), _labels(100, per_class, 6)),
               "test": (_images(200, 7), _labels(100, 2, 8))}
    if kind == "python":
        d = root / "cifar-100-python"
        d.mkdir(parents=True)
        for split, (x, y) in content.items():
            _pickle(d / split, {b"filenames": [b"x.png"] * len(y), b"batch_label": b"batch",
                                b"fine_labels": y.tolist(), b"coarse_labels": (y // 5).tolist(),
                                b"data": _records(x)})
        _pickle(d / "meta", {b"fine_label_names": [n.encode() for n in names],
                             b"coarse_label_names": [f"coarse{k}".encode() for k in range(20)]})
    else:
        d = root / "cifar-100-binary"
        d.mkdir(parents=True)
        for split, (x, y) in content.items():
            coarse_fine = np.stack([y // 5, y], axis=1).astype(np.uint8)
            (d / f"{split}.bin").write_bytes(np.concatenate([coarse_fine, _records(x)], axis=1).tobytes())
        (d / "fine_label_names.txt").write_text("\n".join(names) + "\n")
        (d / "coarse_label_names.txt").write_text("\n".join(f"coarse{k}" for k in range(20)) + "\n")
    return content


def make_tar(folder: Path, out: Path) -> Path:
    with tarfile.open(out, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return out


def _check_content(data, content):
    for split, images, labels in (("train", data.train_images, data.train_labels),
                                  ("test", data.test_images, data.test_labels)):
        assert np.array_equal(images, content[split][0]), split
        assert np.array_equal(labels, content[split][1]), split


def test_cifar10_python_version(tmp_path):
    content = write_cifar10_python(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    data = read_cifar(tmp_path, 10, verify_md5=False)
    assert data.layout.kind == "python" and data.classes == CIFAR10_NAMES and not data.md5_verified
    _check_content(data, content)
    assert data.train_origins[0] == "data_batch_1[0]" and data.train_origins[-1] == "data_batch_5[19]"
    assert data.test_origins[29] == "test_batch[29]"
    assert len(data.train_labels) == 100
    tar = read_cifar(make_tar(folder, tmp_path / "cifar-10-python.tar.gz"), 10, verify_md5=False)
    _check_content(tar, content)
    _check_content(read_cifar(folder, 10, verify_md5=False), content)


@pytest.mark.parametrize("kind", ["python", "binary"])
def test_cifar100_versions(tmp_path, kind):
    content = write_cifar100(tmp_path, kind)
    data = read_cifar(tmp_path, 100, verify_md5=False)
    assert data.layout.kind == kind and data.classes[:2] == ["fine0", "fine1"] and len(data.classes) == 100
    _check_content(data, content)
    folder = next(tmp_path.iterdir())
    _check_content(read_cifar(make_tar(folder, tmp_path / "c.tar.gz"), 100, verify_md5=False), content)
    source = load_cifar_lt(tmp_path, 100, 3, verify_md5=False)
    assert source.name == "cifar100-lt"
    assert source.description["train_class_counts"] == long_tail_counts(3, 100, 3)


def test_generated_lt_selection(tmp_path):
    write_cifar10_python(tmp_path, per_class=20)
    source = load_cifar_lt(tmp_path, 10, 10, seed=3, verify_md5=False)
    train = source.splits["train"]
    assert np.bincount(train.labels).tolist() == [int(20 * 0.1 ** (i / 9)) for i in range(10)]
    assert np.all(np.diff(train.labels) >= 0)  # class by class, in label order
    data = read_cifar(tmp_path, 10, verify_md5=False)
    keep = long_tail_indices(data.train_labels, 10, 10, seed=3)
    assert np.array_equal(train.items, data.train_images[keep])
    assert len(source.splits["test"].labels) == 30


@pytest.mark.slow  # converts 12,406 + 10,000 + 200 images and reads them back: ~20 s of CPU
def test_convert_val_per_class_on_the_real_cifar10(cifar10_bin, tmp_path, capsys):
    """`iccl convert cifar10-lt --val-per-class 20` at R = 100: 200 validation images; the head class
    (all 5,000 kept) gives up 20, every other class keeps the literature's count."""
    import json

    from tools.cli import main
    out = tmp_path / "c10"
    assert main(["-q", "convert", "cifar10-lt", "--source", str(cifar10_bin), "--val-per-class", "20",
                 "--out", str(out)]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["splits"]["val"]["class_counts"] == [20] * 10
    assert meta["splits"]["train"]["class_counts"] == [4980, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert meta["source"]["val_taken_from_train"] == [20] + [0] * 9
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    assert "taken from the train split where too few were left: airplane 20" in capsys.readouterr().out


def test_validation_split_comes_from_the_left_out_training_images(tmp_path):
    """--val-per-class: balanced, disjoint from the train and test splits, drawn from the training
    images the long-tailed split leaves out; only the head class (which keeps all of its images)
    gives some up; too many is refused."""
    write_cifar10_python(tmp_path, per_class=20)
    data = read_cifar(tmp_path, 10, verify_md5=False)
    plain = load_cifar_lt(tmp_path, 10, 10, seed=3, verify_md5=False)
    source = load_cifar_lt(tmp_path, 10, 10, seed=3, verify_md5=False, val_per_class=4)
    train, val = source.splits["train"], source.splits["val"]
    assert np.bincount(val.labels).tolist() == [4] * 10
    row = {data.train_images[i].tobytes(): i for i in range(len(data.train_labels))}
    val_rows = [row[img.tobytes()] for img in val.items]
    train_rows = [row[img.tobytes()] for img in train.items]
    plain_rows = [row[img.tobytes()] for img in plain.splits["train"].items]
    assert len(set(val_rows)) == 40 and not set(val_rows) & set(train_rows)
    assert all(data.train_labels[r] == y for r, y in zip(val_rows, val.labels))
    # classes 1-9 train on exactly the literature's images; class 0 (20 of 20 kept) gives up 4
    assert [r for r in train_rows if data.train_labels[r]] == [r for r in plain_rows if data.train_labels[r]]
    assert set(r for r in train_rows if data.train_labels[r] == 0) < set(plain_rows)
    assert source.description["train_class_counts"][0] == 16
    assert source.description["val_taken_from_train"] == [4] + [0] * 9
    with pytest.raises(DataError, match="val-per-class 21: class 0 has only 20"):
        load_cifar_lt(tmp_path, 10, 10, seed=3, verify_md5=False, val_per_class=21)


@pytest.mark.parametrize("ratio,total", [(100, 10847), (50, 12608), (10, 19573)])
def test_cifar100_lt_counts(ratio, total):
    counts = long_tail_counts(500, 100, ratio)
    assert sum(counts) == total and counts[0] == 500 and counts[-1] == 500 // ratio


def test_md5_mismatch_names_the_file(tmp_path):
    write_cifar100(tmp_path, "binary")
    with pytest.raises(DataError, match=r"train\.bin: md5 .* not the official .*download"):
        read_cifar(tmp_path, 100)


@pytest.mark.parametrize("ratio", [0.5, 0, float("nan")])
def test_imbalance_below_one(tmp_path, ratio):
    with pytest.raises(DataError, match="imbalance ratio"):
        load_cifar_lt(tmp_path, 10, ratio)


def test_ratio_too_large_for_a_small_download(tmp_path):
    write_cifar10_python(tmp_path, per_class=2)
    with pytest.raises(DataError, match="keep no training image"):
        load_cifar_lt(tmp_path, 10, 100, verify_md5=False)


def test_not_a_cifar_archive(tmp_path):
    zipped = tmp_path / "cifar-10-python.zip"
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("cifar-10-batches-py/data_batch_1", b"x")
    with pytest.raises(DataError, match="zip archive"):
        read_cifar(zipped, 10)
    garbage = tmp_path / "cifar-10-python.tar.gz"
    garbage.write_bytes(b"\x1f\x8b" + bytes(range(256)) * 4)
    with pytest.raises(DataError, match="not a readable .tar.gz"):
        read_cifar(garbage, 10)
    with pytest.raises(DataError, match="no such file or folder"):
        read_cifar(tmp_path / "absent.tar.gz", 10)
    with pytest.raises(DataError, match="no CIFAR-10 files found"):
        read_cifar(tmp_path, 10)


def test_archive_member_escaping_is_refused(tmp_path):
    out = tmp_path / "evil.tar.gz"
    with tarfile.open(out, "w:gz") as tar:
        info = tarfile.TarInfo("../data_batch_1")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(DataError, match="points outside the archive"):
        read_cifar(out, 10)


def test_missing_and_truncated_files(tmp_path):
    write_cifar100(tmp_path, "binary")
    folder = tmp_path / "cifar-100-binary"
    (folder / "test.bin").write_bytes((folder / "test.bin").read_bytes()[:-1])
    with pytest.raises(DataError, match=r"test\.bin: .* not a whole number of 3074-byte records"):
        read_cifar(tmp_path, 100, verify_md5=False)
    (folder / "test.bin").unlink()
    with pytest.raises(DataError, match=r"cifar-100-binary/test\.bin missing"):
        read_cifar(tmp_path, 100, verify_md5=False)


def test_pickle_that_is_not_a_cifar_batch_is_not_run(tmp_path):
    write_cifar10_python(tmp_path)

    class Payload:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(pickle.dumps({b"data": Payload()}))
    with pytest.raises(DataError, match=r"data_batch_3: not a CIFAR python-version file"):
        read_cifar(tmp_path, 10, verify_md5=False)
    assert not (tmp_path / "pwned").exists()


def test_label_out_of_range(tmp_path):
    write_cifar10_python(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    obj = pickle.loads(batch.read_bytes())
    obj[b"labels"][4] = 10
    _pickle(batch, obj)
    with pytest.raises(DataError, match=r"test_batch: record 4 has label 10"):
        read_cifar(tmp_path, 10, verify_md5=False)
