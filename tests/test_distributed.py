"""Multi-process training through torchrun on CPU (gloo): 2 processes on one node, and 2 nodes x 1
process over localhost. Centroids must be identical on every rank; the 2-process result must match
one process with the same global batch within the tolerance stated below; one node x 2 processes and
two nodes x 1 process are the same computation and must agree exactly."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import make_converted, random_images
from train import checkpoint

pytestmark = pytest.mark.slow
K = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    labels = np.repeat(np.arange(K), [32, 16, 10, 6])
    make_converted(root, {"train": (random_images(64, 32, seed=3), labels),
                          "test": (random_images(16, 32, seed=4), np.arange(16) % K)}, K)
    return root


def _train_args(data, out):
    return ["-q", "train", "--preset", "synthetic-lt", "--data", str(data), "--out", str(out),
            "--epochs", "2", "--batch-size", "16", "--loader", "resident", "--workers", "0",
            "--set", "warmup_epochs=1", "--set", "s2_epochs=1", "--set", "lr_steps=1",
            "--set", "lr_warmup_epochs=0", "--set", "log_every=1"]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}


def _torchrun(nnodes, nproc, node_rank, port, args):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc_per_node={nproc}",
           f"--node_rank={node_rank}", "--master_addr=127.0.0.1", f"--master_port={port}",
           "-m", "tools.cli", *args]
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(procs):
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-3000:]


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_match_one_and_two_nodes_match_one_node(data, tmp_path):
    single = subprocess.run([sys.executable, "-m", "tools.cli", *_train_args(data, tmp_path / "single")],
                            env=_env(), capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    _finish([_torchrun(1, 2, 0, _free_port(), _train_args(data, tmp_path / "one-node"))])
    port = _free_port()
    _finish([_torchrun(2, 1, r, port, _train_args(data, tmp_path / "two-nodes")) for r in (0, 1)])

    for run in ("one-node", "two-nodes"):
        checks = [m for m in _metrics(tmp_path / run) if m.get("event") == "centroid_check"]
        assert checks and checks[0]["max_rank_difference"] == 0.0

    # Same ranks, same data, same arithmetic: the two layouts agree to the last bit.
    a = checkpoint.load(tmp_path / "one-node" / "final.pt")["net"]
    b = checkpoint.load(tmp_path / "two-nodes" / "final.pt")["net"]
    assert all(torch.equal(a[k], b[k]) for k in a)

    # Against one process with the same global batch: the samplers, augmentation and lambdas are
    # drawn for the global batch and sliced per rank, so the inputs are identical; what differs is
    # batch-norm, which normalises each rank's half on its own (as DDP does without SyncBatchNorm).
    # Tolerance: every logged stage-1 loss within 5% relative (measured: well under that).
    one = [m["loss"] for m in _metrics(tmp_path / "single") if m["stage"] == "stage1" and "event" not in m]
    two = [m["loss"] for m in _metrics(tmp_path / "one-node") if m["stage"] == "stage1" and "event" not in m]
    assert len(one) == len(two) > 0
    rel = np.abs(np.array(one) - np.array(two)) / np.abs(np.array(one))
    assert rel.max() < 0.05, rel


def test_cifar_rule_trains_unfused_under_torchrun(data, tmp_path):
    """The CIFAR presets' arrangement (one forward per branch, w^u = 0 after the warm-up) under
    DistributedDataParallel: the clean forward records no graph, so each backward follows one
    forward with a graph, as DDP requires, and the ranks keep identical centroids."""
    args = [*_train_args(data, tmp_path / "unfused"), "--set", "fused_forward=false",
            "--set", "w_u_zero_after_warmup=true"]
    _finish([_torchrun(1, 2, 0, _free_port(), args)])
    checks = [m for m in _metrics(tmp_path / "unfused") if m.get("event") == "centroid_check"]
    assert checks and checks[0]["max_rank_difference"] == 0.0
    assert (tmp_path / "unfused" / "final.pt").is_file()
