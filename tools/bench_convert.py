"""`iccl bench convert`: images per second and peak memory of `iccl convert` against FFCV's own
writer, on the same training images in the same run.

Ours: `pipeline.convert.convert` of the source's train split, as `iccl convert` runs it (JPEGs kept
byte-for-byte, each one decoded once to check it; `workers` spawned processes).
FFCV: what FFCV's ImageNet example (ffcv-imagenet, write_imagenet.py) does: an indexed dataset
returning (PIL RGB image, label) as torchvision's ImageFolder does, written by
`DatasetWriter(path, {"image": RGBImageField(write_mode="jpg", max_resolution=R, jpeg_quality=Q),
"label": IntField()}, num_workers=workers)` with `from_indexed_dataset`. "jpg" rather than the
example's "proportion" mix of raw and jpg, so that FFCV's file stays photograph-sized; FFCV
decodes and re-encodes every image either way.

Before the clocks run, every input file is read once (untimed), so both writers find the inputs
in the page cache when the tree fits in memory; with `repeats` > 1 the two alternate and the best
of each is kept. Peak memory: the largest sum of the resident set sizes of the process and all its
children, sampled every 0.1 s with psutil (when installed), and the peak RSS of the largest
single process from `resource.getrusage`.
"""
from __future__ import annotations

import os
import resource
import shutil
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from pipeline.cpus import usable_cpus
from pipeline.errors import DataError
from pipeline.progress import say
from pipeline.sources.base import Source

DEFAULT_MAX_RESOLUTION = 512  # >= ImageNet's 500-px sides: FFCV keeps their size, as we do
QUALITY = 90


class PeakRss:
    """Context manager: the peak, over its duration, of the summed RSS (bytes) of this process
    and its descendants (psutil, sampled every `every_s`); None without psutil."""

    def __init__(self, every_s: float = 0.1):
        self.every_s, self.peak = every_s, None
        self._stop = threading.Event()

    def _sample(self, psutil) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me] + me.children(recursive=True):
                try:
                    total += p.memory_info().rss
                except psutil.Error:  # exited between listing and reading
                    pass
            self.peak = max(self.peak or 0, total)
            self._stop.wait(self.every_s)

    def __enter__(self):
        try:
            import psutil
        except ImportError:
            return self
        self._thread = threading.Thread(target=self._sample, args=(psutil,), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if hasattr(self, "_thread"):
            self._thread.join()


def _max_rss_bytes() -> dict:
    """Peak RSS so far (since the process started, so monotone over a run) of this process and
    of its largest waited-for child (Linux reports KiB)."""
    return {"self_so_far": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "largest_child_so_far": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}


def measure(name: str, write: Callable[[], None], images: int) -> dict:
    t0 = time.perf_counter()
    with PeakRss() as rss:
        write()
    seconds = time.perf_counter() - t0
    return {"writer": name, "seconds": round(seconds, 2), "images_per_s": images / seconds,
            "peak_rss_tree_bytes": rss.peak, "max_rss_bytes": _max_rss_bytes()}


class _PilDataset:
    """(PIL RGB image, label) by index, as torchvision's ImageFolder with its default loader."""

    def __init__(self, paths, labels):
        self.paths, self.labels = list(paths), [int(x) for x in labels]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image

        with open(self.paths[i], "rb") as f:
            return Image.open(f).convert("RGB"), self.labels[i]


def write_ffcv(paths, labels, out: Path, workers: int, max_resolution: int, quality: int) -> None:
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    from pipeline.ffcv_writer import _bar_to  # FFCV's own tqdm bar -> our progress reporting
    from pipeline.progress import progress

    writer = DatasetWriter(str(out), {
        "image": RGBImageField(write_mode="jpg", max_resolution=max_resolution, jpeg_quality=quality),
        "label": IntField(),
    }, num_workers=workers)
    with progress(len(paths), "ffcv writer", unit="images") as task, _bar_to(task):
        writer.from_indexed_dataset(_PilDataset(paths, labels))


def _warm(paths) -> float:
    """Read every input once (untimed by the comparisons); returns the seconds it took."""
    t0 = time.perf_counter()
    for p in paths:
        with open(p, "rb") as f:
            while f.read(1 << 20):
                pass
    return time.perf_counter() - t0


def run(source: Source, work: Path, *, workers: Optional[int] = None,
        max_resolution: int = DEFAULT_MAX_RESOLUTION, quality: int = QUALITY, repeats: int = 1,
        keep: bool = False) -> dict:
    """Both writers on the train split of `source` (all of it: our converter insists that every
    class has training images, so make a smaller source, e.g. `iccl bench lt-trees --scale`, to
    bench less); outputs go to WORK/ours and WORK/ffcv.beton, removed afterwards unless `keep`.
    Returns the report."""
    from pipeline.convert import convert
    
    workers = workers or usable_cpus()
    train = source.splits["train"]
    n = len(train.labels)
    if repeats < 1:
        raise DataError("--repeats must be positive")
    paths, labels = list(train.items), train.labels
    if not all(isinstance(p, (str, os.PathLike)) for p in paths[:1]):
        raise DataError(f"{source.name}: bench convert needs a source of image files "
                        f"(imagenet-lt, inat2018, folder), not pixel arrays")
    one = Source(source.name, source.classes, {"train": train}, source.description)
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    say(f"bench convert: reading the {n} inputs once (page cache)")
    warm_s = _warm(paths)
    ours_dir, beton = work / "ours", work / "ffcv.beton"
    runs = {"ours": [], "ffcv": []}
    try:
        for r in range(repeats):
            for name in ("ours", "ffcv"):
                shutil.rmtree(ours_dir, ignore_errors=True)
                beton.unlink(missing_ok=True)
                say(f"bench convert: {name} ({r + 1}/{repeats})")
                if name == "ours":
                    write = lambda: convert(one, ours_dir, workers=workers, quality=quality)  # noqa: E731
                else:
                    write = lambda: write_ffcv(paths, labels, beton, workers, max_resolution, quality)  # noqa: E731
                row = measure(name, write, n)
                row["output_bytes"] = (sum(p.stat().st_size for p in ours_dir.rglob("*") if p.is_file())
                                       if name == "ours" else beton.stat().st_size)
                runs[name].append(row)
    finally:
        if not keep:
            shutil.rmtree(ours_dir, ignore_errors=True)
            beton.unlink(missing_ok=True)
    best = {name: max(rows, key=lambda r: r["images_per_s"]) for name, rows in runs.items()}
    return {
        "source": source.name, "images": n, "workers": workers, "repeats": repeats,
        "warm_read_s": round(warm_s, 2), "input_bytes": sum(os.path.getsize(p) for p in paths),
        "ffcv": {"write_mode": "jpg", "max_resolution": max_resolution, "jpeg_quality": quality},
        "results": [best["ours"], best["ffcv"]], "runs": runs,
        "ratio_to_ffcv": best["ours"]["images_per_s"] / best["ffcv"]["images_per_s"],
    }
