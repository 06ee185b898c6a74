"""`iccl bench scale`: ImageNet-LT and iNaturalist 2018 at their real sizes, end to end, resumably.

For each dataset (`imagenet-lt`, `inat2018`), in WORK/<dataset>/, each step once:

  tree           the JPEG tree in the real layout with the real class counts (tools/lt_trees.py;
                 ImageNet-LT at ImageNet size, iNaturalist at 128x96), `scale` of every class
  convert        `iccl convert` as a user runs it (a subprocess): seconds, images/s, peak RSS of
                 it and its workers
  ffcv           (with `ffcv`) the rerun with --ffcv that adds the .beton files: the same figures
  bench-convert  `iccl convert` against FFCV's own writer on the train split (tools/bench_convert.py)
  info, verify   `iccl info`, `iccl verify` (subprocesses): seconds, peak RSS
  first-batch    per loader (reference, dali, ffcv when there is a .beton), in a fresh process:
                 seconds from construction to the first two-stream batch (RRC 224, 2 x 128
                 images), RSS of the main process and of each worker process after 3 batches
  sampler        set-up and per-step draw time of the class-aware and uniform samplers on the
                 converted labels and on labels of the full real size (the counts file), at the
                 preset's global batch, 1 and 64 processes (pure arithmetic)
  evaluate       one evaluation with many / medium / few on random logits at the real class
                 count, as many samples as the evaluation split has at full size

Results go to WORK/scale.json after every step (atomically); a rerun skips the steps already
there, so an interrupted run continues. Peak RSS sums the process tree, sampled every 0.1 s
(psutil), so pages shared between processes are counted once per process.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from pipeline.atomic import write_json
from pipeline.cpus import usable_cpus
from pipeline.errors import DataError
from pipeline.progress import say

DATASETS = ("imagenet-lt", "inat2018")
STEPS = ("tree", "convert", "ffcv", "bench-convert", "info", "verify", "first-batch", "sampler", "evaluate")
EVAL_SPLIT = {"imagenet-lt": "test", "inat2018": "val"}
FULL_EVAL_SIZE = {"imagenet-lt": 50_000, "inat2018": 24_426}
GLOBAL_BATCH = {"imagenet-lt": 256, "inat2018": 512}  # the presets' batch per stream
LOADERS = ("reference", "dali", "ffcv")
REPO = Path(__file__).resolve().parents[1]
RESULTS = "scale.json"


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "tools.cli", "--quiet", *args]


def timed_command(cmd: list[str]) -> dict:
    """Run `cmd` from the repository root; seconds, peak RSS of its process tree, exit code."""
    from tools.bench_convert import PeakRss

    t0 = time.perf_counter()
    with PeakRss() as rss:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    out = {"command": " ".join(cmd[2:]), "seconds": round(time.perf_counter() - t0, 2),
           "peak_rss_tree_bytes": rss.peak, "returncode": proc.returncode}
    if proc.returncode != 0:
        raise DataError(f"`{out['command']}` failed ({proc.returncode}): "
                        f"{(proc.stderr or proc.stdout).strip()[-2000:]}")
    return out


# --- first batch, in a fresh process -------------------------------------------------------------
def first_batch(data: str, loader: str, batch_size: int, workers: int) -> dict:
    """Construction -> first two-stream batch (RRC 224 + flip + jitter 0.4), then 3 more; RSS of
    this process and of each worker process."""
    import psutil
    import torch

    from pipeline.dataset import ShardedSplit
    from pipeline.loaders import AugmentSpec, make_train_loader

    torch.set_num_threads(workers)
    split = ShardedSplit(data, "train")
    t0 = time.perf_counter()
    try:
        ld = make_train_loader(split, loader=loader, batch_size=batch_size, class_aware_gamma=0.0,
                               augment=AugmentSpec(kind="rrc", size=224, jitter=0.4), seed=0,
                               device="cpu", workers=workers)
    except DataError as e:
        return {"loader": loader, "skipped": str(e)}
    setup = time.perf_counter() - t0
    it = iter(ld)
    next(it)
    first = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(3):
        next(it)
    rate = 3 * 2 * batch_size / (time.perf_counter() - t1)
    me = psutil.Process()
    workers_rss = [p.memory_info().rss for p in me.children(recursive=True)]
    out = {"loader": loader, "setup_s": round(setup, 2), "first_batch_s": round(first, 2),
           "images_per_s_after": round(rate, 1), "main_rss_bytes": me.memory_info().rss,
           "worker_rss_bytes": workers_rss, "threads": me.num_threads()}
    it.close()  # ends the epoch's iteration, so the DataLoader's workers shut down in order
    ld.close()
    return out


def first_batch_in_fresh_process(data: str, loader: str, batch_size: int, workers: int) -> dict:
    """`first_batch` in a new interpreter (`python -m tools.bench_scale`), so that each loader's
    memory is its own; its stderr (loader warnings, worker shutdown messages) is kept out of
    the terminal and returned only when it fails."""
    cmd = [sys.executable, "-m", "tools.bench_scale", data, loader, str(batch_size), str(workers)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"loader": loader, "skipped": f"failed ({proc.returncode}): {proc.stderr.strip()[-1000:]}"}
    return json.loads(lines[-1])


# --- samplers and evaluation ---------------------------------------------------------------------
def sampler_costs(labels: np.ndarray, num_classes: int, batch: int, steps: int = 1000) -> dict:
    """Set-up seconds and mean per-step draw microseconds of both samplers, 1 and 64 processes
    (the batch is cut to the number of samples for tiny data; a world size that does not divide
    the batch is left out)."""
    from pipeline.samplers import ClassAwareSampler, UniformSampler

    batch = min(batch, len(labels))
    out = {"samples": int(len(labels)), "classes": int(num_classes), "global_batch": batch}
    for world in (w for w in (1, 64) if batch % w == 0):
        t0 = time.perf_counter()
        aware = ClassAwareSampler(labels, 0.0, batch, seed=0, rank=world - 1, world_size=world,
                                  steps_per_epoch=steps, num_classes=num_classes)
        setup = time.perf_counter() - t0
        t0 = time.perf_counter()
        for s in range(steps):
            aware.batch(0, s)
        draw = (time.perf_counter() - t0) / steps
        n_steps = min(steps, len(labels) // batch)
        t0 = time.perf_counter()
        uni = UniformSampler(len(labels), batch, seed=0, rank=world - 1, world_size=world)
        uni.batch(0, 0)  # the epoch's permutation
        uni_setup = time.perf_counter() - t0
        t0 = time.perf_counter()
        for s in range(1, n_steps):
            uni.batch(0, s)
        uni_draw = (time.perf_counter() - t0) / max(1, n_steps - 1)
        out[f"world_{world}"] = {"class_aware_setup_s": round(setup, 4),
                                 "class_aware_step_us": round(1e6 * draw, 1),
                                 "uniform_epoch_setup_s": round(uni_setup, 4),
                                 "uniform_step_us": round(1e6 * uni_draw, 1)}
    return out


def evaluation_cost(train_counts: np.ndarray, num_samples: int, batch: int = 1024, seed: int = 0) -> dict:
    """One `train.evaluate.evaluate` over `num_samples` random logits (classes as in `train_counts`),
    and `summarize` alone."""
    import torch

    from pipeline.format import shot_groups
    from train.evaluate import evaluate, summarize

    k = len(train_counts)
    groups = shot_groups(train_counts)
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(num_samples) % k

    def batches():
        for s in range(0, num_samples, batch):
            yb = y[s:s + batch]
            yield torch.randn(len(yb), k, generator=g), yb

    t0 = time.perf_counter()
    res = evaluate(lambda logits: logits, batches(), k, groups, torch.device("cpu"))
    total = time.perf_counter() - t0
    correct = torch.rand(k, dtype=torch.float64, generator=g)
    t0 = time.perf_counter()
    summarize(correct, torch.ones(k, dtype=torch.float64), groups)
    return {"classes": k, "samples": num_samples, "evaluate_s": round(total, 3),
            "summarize_ms": round(1e3 * (time.perf_counter() - t0), 2),
            "groups": {n: len(ids) for n, ids in groups.items()}, "top1_random": round(res["top1"], 3)}


# --- the run -------------------------------------------------------------------------------------
def run(work: Path, *, scale: float = 1.0, datasets=DATASETS, skip=(), ffcv: bool = False,
        workers: Optional[int] = None, counts_file: Optional[Path] = None,
        lists_dir: Optional[Path] = None, tiles_from: Optional[Path] = None) -> dict:
    """All steps (module docstring) for `datasets`, skipping finished ones and those in `skip`."""
    from tools.lt_trees import load_counts, make_tree

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    workers = workers or usable_cpus()
    path = work / RESULTS
    report = json.loads(path.read_text()) if path.is_file() else {}
    if report and report.get("scale") != scale:
        raise DataError(f"{path} holds results at --scale {report.get('scale')}; use another "
                        f"--work folder for --scale {scale}, or delete it")
    # What the trees are made of: finished steps are reused only for the same inputs.
    inputs = {"counts": str(Path(counts_file).resolve()) if counts_file else "shipped",
              "lists_dir": str(Path(lists_dir).resolve()) if lists_dir else None,
              "tiles": "CIFAR-10 test images" if tiles_from else "smooth-noise tiles"}
    if report and report.get("inputs", inputs) != inputs:
        raise DataError(f"{path} holds results made with other inputs ({report['inputs']}); use "
                        f"another --work folder for these (--counts, --lists-dir, --tiles-from), or "
                        f"delete it")
    report.update(scale=scale, workers=workers, usable_cpus=usable_cpus(), inputs=inputs)
    report.setdefault("datasets", {})

    for kind in datasets:
        res = report["datasets"].setdefault(kind, {})
        base = work / kind
        tree, data = base / "tree", base / "data"
        src = (["--root", str(tree / "root"), "--lists", str(tree / "lists")])

        def step(name: str, fn: Callable[[], dict]) -> None:
            if name in skip or name in res:
                return
            say(f"bench scale: {kind}: {name}")
            res[name] = fn()
            write_json(path, report)

        step("tree", lambda: make_tree(kind, tree, scale=scale, counts_file=counts_file,
                                       lists_dir=lists_dir, workers=workers, tiles_from=tiles_from))
        images = sum(res["tree"]["images"].values()) if "tree" in res else None

        def convert(extra=()):
            out = timed_command(_cli("convert", kind, *src, "--out", str(data), "--workers", str(workers), *extra))
            if images:
                out["images_per_s"] = round(images / out["seconds"], 1)
            return out

        step("convert", convert)
        if ffcv:
            step("ffcv", lambda: convert(("--ffcv",)))
        step("bench-convert", lambda: _bench_convert(kind, tree, base / "bench-convert", workers))
        step("info", lambda: timed_command(_cli("info", str(data), "--json")))
        step("verify", lambda: timed_command(_cli("verify", str(data), "--workers", str(workers))))
        if (ffcv and "first-batch" not in skip and (data / "train.beton").is_file()
                and "skipped" in res.get("first-batch", {}).get("ffcv", {})):
            del res["first-batch"]  # measured before the .beton existed: again, with FFCV this time
        step("first-batch", lambda: {ld: first_batch_in_fresh_process(str(data), ld, 128, workers)
                                     for ld in LOADERS})
        counts = load_counts(kind, counts_file)

        def samplers():
            from pipeline.dataset import ShardedSplit
            labels = ShardedSplit(data, "train").labels
            # in random order: a sorted label array would flatter the sampler's set-up sort
            full = np.random.default_rng(0).permutation(np.repeat(np.arange(len(counts)), counts))
            return {"converted": sampler_costs(labels, len(counts), GLOBAL_BATCH[kind]),
                    "full_size": sampler_costs(full, len(counts), GLOBAL_BATCH[kind])}

        step("sampler", samplers)
        step("evaluate", lambda: evaluation_cost(counts, FULL_EVAL_SIZE[kind]))
    return report


def _bench_convert(kind: str, tree: Path, work: Path, workers: int) -> dict:
    from tools.bench_convert import run as bench

    if kind == "imagenet-lt":
        from pipeline.sources.imagenet_lt import load_imagenet_lt
        source = load_imagenet_lt(tree / "root", tree / "lists")
    else:
        from pipeline.sources.inat import load_inat2018
        source = load_inat2018(tree / "root", tree / "lists")
    out = bench(source, work, workers=workers)
    out.pop("runs")
    return out


def table_rows(report: dict) -> list[tuple[str, str, str]]:
    """(dataset, measurement, value) rows for the terminal table."""
    def mb(b):
        return "-" if b is None else f"{b / 2**20:,.0f} MB"

    rows = []
    for kind, res in report.get("datasets", {}).items():
        if "tree" in res:
            t = res["tree"]
            rows.append((kind, "tree", f"{t['files']:,} files, {t['bytes'] / 2**30:.1f} GiB, {t['seconds']:.0f} s"))
        for name in ("convert", "ffcv", "info", "verify"):
            if name in res:
                r = res[name]
                rate = f", {r['images_per_s']:,.0f} images/s" if "images_per_s" in r else ""
                rows.append((kind, name, f"{r['seconds']:,.1f} s{rate}, peak RSS {mb(r['peak_rss_tree_bytes'])}"))
        if "bench-convert" in res:
            b = res["bench-convert"]
            ours, theirs = b["results"]
            rows.append((kind, "convert vs FFCV writer",
                         f"{ours['images_per_s']:,.0f} vs {theirs['images_per_s']:,.0f} images/s "
                         f"({b['ratio_to_ffcv']:.2f}x); peak RSS {mb(ours['peak_rss_tree_bytes'])} vs "
                         f"{mb(theirs['peak_rss_tree_bytes'])}"))
        for ld, r in res.get("first-batch", {}).items():
            if "skipped" in r:
                rows.append((kind, f"first batch: {ld}", "skipped: " + r["skipped"][:80]))
            else:
                per = ", ".join(mb(b) for b in r["worker_rss_bytes"]) or "no worker processes"
                rows.append((kind, f"first batch: {ld}", f"{r['first_batch_s']:.1f} s; RSS main "
                             f"{mb(r['main_rss_bytes'])}, workers {per}"))
        for which, s in res.get("sampler", {}).items():
            for world in (w for w in (1, 64) if f"world_{w}" in s):
                w = s[f"world_{world}"]
                rows.append((kind, f"sampler ({which}, {s['samples']:,} samples, {world} proc.)",
                             f"class-aware set-up {1e3 * w['class_aware_setup_s']:.1f} ms, "
                             f"{w['class_aware_step_us']:.0f} us/step; uniform epoch "
                             f"{1e3 * w['uniform_epoch_setup_s']:.1f} ms, {w['uniform_step_us']:.0f} us/step"))
        if "evaluate" in res:
            e = res["evaluate"]
            rows.append((kind, f"evaluate ({e['samples']:,} x {e['classes']:,} logits)",
                         f"{e['evaluate_s']:.2f} s; many/medium/few summary {e['summarize_ms']:.1f} ms"))
    return rows


if __name__ == "__main__":  # one first-batch measurement: DATA LOADER BATCH WORKERS -> JSON line
    print(json.dumps(first_batch(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
