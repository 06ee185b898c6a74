"""`iccl bench pipeline`: decoded images per second of every loader, against the machine's decode ceiling.

In one run, on the same data and the same CPU budget (`workers` decode threads / worker processes
and as many torch threads):
  - every requested loader in two-stream training mode, the way stage 1 reads data: the uniform
    stream plus the class-aware stream (gamma = 0), so 2 x batch images per step, augmented as
    training would (pad_crop for small images, random resized crop 224 + flip + jitter for
    photographs), delivered on the training device. Construction and warm-up steps are not timed
    (reported as setup time); CUDA is synchronised before the clock is read.
  - the decode-only ceiling: the same images decoded with no augmentation by the fastest decoder
    for their format (simplejpeg for JPEG, Pillow for PNG) in `workers` processes, and by DALI's
    CPU decoder with `workers` threads for comparison; the faster is the ceiling. No loader can
    reach it: every loader must also crop, resize, flip and jitter.
  - the floor: that unavoidable work, decode + the same augmentation with simplejpeg and OpenCV in
    `workers` processes, no framework (tools/bench_floor.py). A loader's fraction of the floor
    says how much of its time goes to its own machinery.
With `repeats` > 1 every measurement is taken that many times and the best kept: on a machine
shared with other work, the least disturbed window. Loaders that cannot run on the data (resident
on images of different sizes, ffcv without a .beton, a package not installed) are reported as
skipped, with the reason.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from pipeline import codecs
from pipeline.cpus import usable_cpus
from pipeline.dataset import ShardedSplit
from pipeline.errors import DataError
from pipeline.format import EXT_CODE
from pipeline.loaders import LOADERS, make_train_loader
from pipeline.loaders.base import AugmentSpec
from pipeline.loaders.resident import stored_size
from pipeline.progress import count, progress, say
from tools.bench_floor import floor_rate

SMALL_IMAGE = 64  # images up to this side are trained with pad_crop (CIFAR), larger with rrc


def auto_augment(split: ShardedSplit, kind: str = "auto", size: Optional[int] = None,
                 jitter: Optional[float] = None) -> AugmentSpec:
    """The training augmentation for the bench: pad_crop at the stored size for small images,
    else the ImageNet-LT recipe (random resized crop 224, flip, jitter 0.4)."""
    hw = next((s for s in (stored_size(split, i) for i in range(min(len(split), 16))) if s), None)
    if hw is None:
        raise DataError(f"{split.dir}: the first images are unreadable; run `iccl verify {split.root}`")
    if kind == "auto":
        kind = "pad_crop" if max(hw) <= SMALL_IMAGE else "rrc"
    if kind == "pad_crop":
        return AugmentSpec(kind="pad_crop", size=size or min(hw), pad=4)
    return AugmentSpec(kind="rrc", size=size or 224, jitter=0.4 if jitter is None else jitter)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _endless(loader):
    """Training steps across epoch boundaries, as a long run sees them."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def measure_loader(split: ShardedSplit, name: str, augment: AugmentSpec, batch_size: int,
                   steps: int, warmup: int, workers: int, device: torch.device,
                   repeats: int = 1) -> dict:
    """Images per second of one loader in two-stream mode, the best of `repeats` windows of
    `steps` steps (on a shared machine the best window is the least disturbed one);
    {"skipped": why} when the loader cannot run on this data."""
    row = {"loader": name, "steps": steps, "batch_size": batch_size}
    t0 = time.perf_counter()
    try:
        loader = make_train_loader(split, loader=name, batch_size=batch_size, uniform=True,
                                   class_aware_gamma=0.0, augment=augment, seed=0, device=device,
                                   workers=workers)
    except DataError as e:
        return {**row, "images_per_s": None, "skipped": str(e)}
    rates = []
    try:
        with progress(warmup + repeats * steps, f"bench pipeline: {name}", unit="steps") as task:
            batches = _endless(loader)
            for _ in range(warmup):
                next(batches)
                task.advance(1)
            sync(device)
            setup_s = time.perf_counter() - t0
            for _ in range(repeats):
                t1 = time.perf_counter()
                for _ in range(steps):
                    next(batches)
                    task.advance(1)
                sync(device)
                rates.append(2 * batch_size * steps / (time.perf_counter() - t1))
    finally:
        loader.close()
    # DALI builds its pipeline once per loader (in the warm-up): epoch ends in the timed window
    # cost a reset, not a rebuild; the count is reported so that a rebuild would show.
    return {**row, "images_per_s": max(rates), "windows_images_per_s": rates,
            "setup_s": round(setup_s, 2), "skipped": None,
            "pipeline_builds": getattr(loader, "pipeline_builds", None)}


# --- the decode-only ceiling --------------------------------------------------------------------
_worker_split: Optional[ShardedSplit] = None


def _decode_chunk(root: str, split: str, idx: np.ndarray) -> list[int]:
    """Decode samples `idx` in a pool worker (the split is opened once per process); returns the
    samples that do not decode (corrupt data: training replaces them, the ceiling leaves them out)."""
    global _worker_split
    if _worker_split is None or _worker_split.root != Path(root) or _worker_split.split != split:
        _worker_split = ShardedSplit(root, split)
    bad = []
    for i in idx:
        try:
            codecs.decode(_worker_split.encoded(int(i)), _worker_split.ext(int(i)))
        except Exception:  # any decoder failure (ValueError, OSError, ...) means a corrupt sample
            bad.append(int(i))
    return bad


def decode_rate_python(split: ShardedSplit, idx: np.ndarray, workers: int) -> tuple[float, list[int]]:
    """(images per second, samples that did not decode) of simplejpeg (JPEG) / Pillow (PNG) in
    `workers` processes; process start-up and the first reads are outside the clock. Samples
    that fail count as decoded (the time was spent)."""
    chunks = np.array_split(idx, max(1, len(idx) // 64))
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_decode_chunk, [str(split.root)] * workers, [split.split] * workers,
                      np.array_split(idx[:64 * workers], workers)))  # warm: open maps, fault pages
        t0 = time.perf_counter()
        bad = [i for b in pool.map(_decode_chunk, [str(split.root)] * len(chunks),
                                   [split.split] * len(chunks), chunks) for i in b]
        return len(idx) / (time.perf_counter() - t0), sorted(set(bad))


def decode_rate_dali(split: ShardedSplit, idx: np.ndarray, workers: int, batch_size: int) -> float:
    """Images per second of DALI's CPU decoder with `workers` threads (first batch untimed)."""
    from nvidia.dali import Pipeline, fn

    batches = [idx[s:s + batch_size] for s in range(0, len(idx), batch_size)]

    def source(info):
        if info.iteration >= len(batches):
            raise StopIteration
        return [np.frombuffer(split.encoded(int(i)), np.uint8) for i in batches[info.iteration]]

    pipe = Pipeline(batch_size=batch_size, num_threads=workers, device_id=None, prefetch_queue_depth=2)
    with pipe:
        pipe.set_outputs(fn.decoders.image(fn.external_source(source=source, batch=True, batch_info=True),
                                           device="cpu"))
    pipe.build()
    pipe.run()
    t0 = time.perf_counter()
    for _ in batches[1:]:
        pipe.run()
    return sum(len(b) for b in batches[1:]) / (time.perf_counter() - t0)


def decode_ceiling(split: ShardedSplit, num_images: int, workers: int, batch_size: int,
                   repeats: int = 1) -> tuple[dict, list[int]]:
    """({decoder name: images per second, best of `repeats`}, samples that do not decode) over
    the first `num_images` samples (cycled). The Python decoders are named by what the samples
    hold: simplejpeg (JPEG), pillow (PNG), or both. DALI is timed on the samples that decode."""
    idx = np.arange(num_images) % len(split)
    exts = set(split.index["ext"][np.unique(idx)].tolist())
    name = "+".join(n for code, n in ((EXT_CODE["jpg"], "simplejpeg"), (EXT_CODE["png"], "pillow"))
                    if code in exts)
    say("bench pipeline: measuring the decode-only ceiling")
    measured = [decode_rate_python(split, idx, workers) for _ in range(repeats)]
    rates = {name: max(rate for rate, _ in measured)}
    bad = measured[0][1]
    if bad:
        say(f"bench pipeline: {count(len(bad), 'sample')} of {split.dir} do not decode (first: "
            f"{bad[0]}); left out of the ceiling. `iccl verify {split.root}` lists them.")
        idx = idx[~np.isin(idx, bad)]
    try:
        if len(idx):
            rates["dali-cpu"] = max(decode_rate_dali(split, idx, workers, batch_size) for _ in range(repeats))
    except ImportError:
        pass
    return rates, bad


# --- one run ------------------------------------------------------------------------------------
def check_options(loaders: tuple[str, ...], batch_size: int, steps: int, warmup: int,
                  workers: Optional[int], size: Optional[int], jitter: Optional[float],
                  repeats: int) -> None:
    """DataError for options outside what `run` takes (checked before any bench data is made)."""
    for name in loaders:
        if name not in LOADERS:
            raise DataError(f"--loaders: unknown loader {name!r}; choose from {', '.join(LOADERS)}")
    if steps < 1 or warmup < 0 or batch_size < 1 or repeats < 1 or (workers is not None and workers < 1):
        raise DataError("--steps, --batch-size, --repeats and --workers must be positive, --warmup "
                        "at least 0")
    if size is not None and size < 1:
        raise DataError(f"--size {size}: must be at least 1 pixel")
    if jitter is not None and not 0 <= jitter <= 1:
        raise DataError(f"--jitter {jitter}: must be in [0, 1]")


def run(data: str | os.PathLike, split: str = "train", loaders: tuple[str, ...] = LOADERS,
        batch_size: int = 128, steps: int = 20, warmup: int = 3, workers: Optional[int] = None,
        augment: str = "auto", size: Optional[int] = None, jitter: Optional[float] = None,
        device: str = "auto", repeats: int = 1) -> dict:
    """The whole benchmark (module docstring); returns what `--json` writes."""
    from pipeline.device import pick_device

    check_options(loaders, batch_size, steps, warmup, workers, size, jitter, repeats)
    workers = workers or usable_cpus()
    torch.set_num_threads(workers)
    dev = pick_device(device)
    ds = ShardedSplit(data, split)
    spec = auto_augment(ds, augment, size, jitter)
    # Forking (the ceiling's process pool, the reference loader's workers) comes first, while
    # no other loader has started threads (numba's, DALI's) that a fork would leave broken.
    num_images = min(2 * batch_size * steps, 4 * len(ds))
    say("bench pipeline: measuring the floor (decode + augmentation with OpenCV)")
    floor = max(floor_rate(ds, np.arange(num_images) % len(ds), spec, workers) for _ in range(repeats))
    rates, undecodable = decode_ceiling(ds, num_images, workers, batch_size, repeats)
    order = sorted(loaders, key=lambda name: name != "reference")
    measured = {name: measure_loader(ds, name, spec, batch_size, steps, warmup, workers, dev, repeats)
                for name in order}
    results = [measured[name] for name in loaders]
    decoder, ceiling = max(rates.items(), key=lambda kv: kv[1])
    reference = next((r["images_per_s"] for r in results if r["loader"] == "reference"), None)
    for r in results:
        x = r["images_per_s"]
        r["ratio_to_reference"] = x / reference if x and reference else None
        r["fraction_of_decode_ceiling"] = x / ceiling if x else None
        r["fraction_of_floor"] = x / floor if x else None
    return {
        "results": results, "decode_ceiling_images_per_s": ceiling, "decoder": decoder,
        "floor_images_per_s": floor,
        "decoders": rates, "undecodable_samples": undecodable, "data": str(data), "split": split, "num_samples": len(ds),
        "augment": {"kind": spec.kind, "size": spec.size, "pad": spec.pad, "jitter": spec.jitter,
                    "flip": spec.flip},
        "workers": workers, "repeats": repeats, "device": str(dev),
        "machine": {"usable_cpus": usable_cpus(), "torch": torch.__version__,
                    "cuda_device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None},
    }
