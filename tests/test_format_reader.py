"""The on-disk contract (`pipeline.format`, `pipeline.shards`) and its reader (`pipeline.dataset`)."""
from __future__ import annotations

import json
import pickle
import tarfile

import numpy as np
import pytest
import webdataset as wds

from helpers import make_converted, random_images
from pipeline.dataset import ShardedSplit, open_split
from pipeline.errors import DataError
from pipeline.format import (INDEX_DTYPE, META_FILE, read_meta, sample_key, shard_name,
                             shot_groups)
from pipeline.shards import read_member_names, write_shard


@pytest.fixture
def dataset(tmp_path):
    images = random_images(70, 8)
    labels = np.arange(70) % 4
    root = make_converted(tmp_path / "ds", {"train": (images, labels), "test": (images[:10], labels[:10])},
                          num_classes=4, shard_size=32)
    return root, images, labels


def test_reader_round_trip(dataset):
    root, images, labels = dataset
    ds = open_split(root, "train")
    assert len(ds) == 70 and ds.num_shards == 3 and ds.num_classes == 4
    assert ds.classes == [f"class_{k}" for k in range(4)]
    assert ds.class_counts.tolist() == np.bincount(labels).tolist()
    for i in (0, 31, 32, 69):
        pixels, label = ds[i]
        assert np.array_equal(pixels, images[i]) and label == labels[i]
        assert ds.ext(i) == "png"
    assert [label for _, label in ds] == labels.tolist()


def test_index_locates_image_bytes_inside_the_tar(dataset):
    root, _, labels = dataset
    ds = ShardedSplit(root, "train")
    with tarfile.open(ds.shard_path(1)) as tar:
        members = tar.getmembers()
        assert [m.name for m in members[:4]] == [f"{sample_key(32)}.png", f"{sample_key(32)}.cls",
                                                 f"{sample_key(33)}.png", f"{sample_key(33)}.cls"]
        assert members[0].offset_data == ds.index[32]["offset"]
        assert tar.extractfile(members[0]).read() == bytes(ds.encoded(32))
        assert tar.extractfile(members[1]).read() == str(labels[32]).encode()


def test_webdataset_library_sees_the_index_order(dataset):
    root, _, labels = dataset
    ds = ShardedSplit(root, "train")
    urls = [str(ds.shard_path(k)) for k in range(ds.num_shards)]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert [s["__key__"] for s in samples] == [sample_key(i) for i in range(70)]
    assert [int(s["cls"]) for s in samples] == labels.tolist()
    assert all(s["png"] == bytes(ds.encoded(i)) for i, s in enumerate(samples))


def test_write_shard_with_explicit_keys(tmp_path):
    records = [(b"abc", "jpg", 1, 5), (b"defgh", "png", 0, 9)]
    rows = write_shard(tmp_path / shard_name(0), 0, 0, records)
    assert rows.dtype == INDEX_DTYPE
    assert read_member_names(tmp_path / shard_name(0)) == [
        "000000005.jpg", "000000005.cls", "000000009.png", "000000009.cls"]
    data = (tmp_path / shard_name(0)).read_bytes()
    assert data[rows[1]["offset"]:rows[1]["offset"] + rows[1]["size"]] == b"defgh"
    assert rows["label"].tolist() == [1, 0] and rows["ext"].tolist() == [0, 1]


def test_write_shard_is_deterministic_and_atomic(tmp_path):
    records = [(b"x" * 700, "jpg", 2)]
    write_shard(tmp_path / "a.tar", 0, 3, records)
    write_shard(tmp_path / "b.tar", 0, 3, records)
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()

    def failing():
        yield b"y", "jpg", 0
        raise RuntimeError("encoder crashed")
    with pytest.raises(RuntimeError):
        write_shard(tmp_path / "c.tar", 0, 0, failing())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar", "b.tar"]


def test_shot_groups_boundaries():
    groups = shot_groups([101, 100, 20, 19, 0])
    assert groups == {"many": [0], "medium": [1, 2], "few": [3, 4]}


def test_read_meta_errors(tmp_path, dataset):
    with pytest.raises(DataError, match="no such folder"):
        read_meta(tmp_path / "nope")
    with pytest.raises(DataError, match="not a converted dataset"):
        read_meta(tmp_path)
    root, _, _ = dataset
    meta = json.loads((root / META_FILE).read_text())
    (root / META_FILE).write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(DataError, match="version 99"):
        read_meta(root)


def test_split_errors(dataset):
    root, _, _ = dataset
    with pytest.raises(DataError, match="no split 'val'"):
        ShardedSplit(root, "val")
    np.save(root / "test" / "index.npy", np.zeros(3, INDEX_DTYPE))
    with pytest.raises(DataError, match="does not match"):
        ShardedSplit(root, "test")


def test_truncated_shard_is_a_clear_error(dataset):
    root, _, _ = dataset
    ds = ShardedSplit(root, "train")
    path = ds.shard_path(2)
    path.write_bytes(path.read_bytes()[:600])
    with pytest.raises(DataError, match="truncated"):
        ds.encoded(69)


def test_split_pickles_without_its_maps(dataset):
    root, images, _ = dataset
    ds = ShardedSplit(root, "train")
    ds.decode(0)
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._maps == {} and np.array_equal(clone.decode(40), images[40])
