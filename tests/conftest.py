"""Shared fixtures: where the real data is (if present) and small generated datasets."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests run against the working tree, installed or not

SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only real data beside the checkout; tests needing it skip on a fresh clone."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not present at {SHARED_DATA} (only beside the development checkout)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def cifar10_bin(shared_data, tmp_path_factory) -> Path:
    """The official CIFAR-10 binary version, rebuilt from the real data (md5-checked by its
    build.py): the folder, with cifar-10-binary.tar.gz in it."""
    import subprocess
    out = tmp_path_factory.mktemp("cifar10")
    subprocess.run([sys.executable, str(shared_data / "cifar10" / "build.py"), str(out), "--tar"],
                   check=True, capture_output=True)
    return out


@pytest.fixture(scope="session")
def tiny_trained_run(tmp_path_factory) -> dict:
    """One tiny finished run shared by the tests of predict, export, pictures and TensorBoard
    (`helpers.train_tiny_run`; ~10-40 s on 2 busy cores, so its users are marked slow)."""
    from helpers import train_tiny_run
    return train_tiny_run(tmp_path_factory.mktemp("tiny-run"))


@pytest.fixture(autouse=True)
def conversions_are_read_by_the_field_readers(monkeypatch):
    """Every conversion a test makes is read back by the `webdataset` library and DALI's reader
    (helpers.check_field_readers) as soon as it is complete."""
    import pipeline.convert
    from helpers import check_field_readers

    finish = pipeline.convert._finish

    def finish_and_check(source, out, *args, **kwargs):
        meta = finish(source, out, *args, **kwargs)
        check_field_readers(out)
        return meta

    monkeypatch.setattr(pipeline.convert, "_finish", finish_and_check)
