"""Loader factory: the samplers of a training stage plus one of the loaders in `LOADERS`.

Every training loader is constructed the same way,
    cls(split, uniform=UniformSampler | None, class_aware=ClassAwareSampler | None,
        augment=AugmentSpec, seed=int, steps_per_epoch=int, rank=int, world_size=int,
        device=torch.device, workers=int)
and every eval loader as
    cls(split, spec=EvalSpec, batch_size=int, rank=int, world_size=int, device=torch.device,
        workers=int).
Loader modules are imported only when chosen: DALI and FFCV may be absent on a user's machine.
Importing this package is light (no torch): `LOADERS` is the one list of loader names, read by the
command line's choices, the config's validation and the benchmarks; torch and the loader classes
load on first use.
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Optional

from pipeline.errors import DataError

if TYPE_CHECKING:
    from pipeline.dataset import ShardedSplit
    from pipeline.loaders.base import AugmentSpec, EvalLoader, EvalSpec, TrainLoader

LOADERS = ("resident", "dali", "ffcv", "reference")
LOADER_CHOICES = ("auto", *LOADERS)  # "auto": see `choose_loader`

# name -> (module, train class, eval class, what to install when the module's imports fail)
_CLASSES = {
    "resident": ("pipeline.loaders.resident", "ResidentLoader", "ResidentEvalLoader", None),
    "dali": ("pipeline.loaders.dali", "DaliLoader", "DaliEvalLoader", "nvidia-dali-cuda130"),
    "ffcv": ("pipeline.loaders.ffcv", "FfcvLoader", "FfcvEvalLoader", "ffcv"),
    "reference": ("pipeline.loaders.reference", "ReferenceLoader", "ReferenceEvalLoader", None),
}

__all__ = ["LOADERS", "LOADER_CHOICES", "Batch", "AugmentSpec", "EvalSpec", "TrainLoader", "EvalLoader",
           "choose_loader", "make_train_loader", "make_eval_loader"]


_BASE_NAMES = ("Batch", "AugmentSpec", "EvalSpec", "TrainLoader", "EvalLoader")


def __getattr__(name: str):
    """The re-exported base types, imported (with torch) when first asked for."""
    if name in _BASE_NAMES:
        from pipeline.loaders import base
        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _loader_class(name: str, train: bool):
    if name not in _CLASSES:
        raise DataError(f"--loader {name!r}: unknown; choose one of {', '.join(LOADER_CHOICES)}")
    module, train_cls, eval_cls, package = _CLASSES[name]
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise DataError(f"the {name} loader needs the package {package} ({e}); install it with "
                        f"`pip install {package}` or choose another --loader") from e
    cls = getattr(mod, train_cls if train else eval_cls, None)
    if cls is None:
        raise DataError(f"the {name} loader has no {'training' if train else 'evaluation'} loader; "
                        f"choose another --loader")
    return cls


def _dali_importable() -> bool:
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ModuleNotFoundError:  # the `nvidia` namespace itself is absent
        return False


def _beton_path(split: ShardedSplit):
    return split.root / f"{split.split}.beton"


# Largest stored side (px) at which DALI's CPU path beats the reference loader. Measured on this
# project's 2-core machine: 1.53x the reference on 32-px CIFAR PNGs, but 0.82-1.04x on ImageNet-size
# JPEG photographs, where its CPU resize to 224 dominates (README, Throughput).
DALI_CPU_MAX_SIDE = 64
_PROBE = 16  # images whose headers decide what the data is (the bench's auto augmentation does the same)


def _largest_side(split: ShardedSplit) -> Optional[int]:
    """The longest side among the first readable headers of `split` (no decoding); None if none read."""
    from pipeline.loaders.resident import stored_size

    sizes = [s for s in (stored_size(split, i) for i in range(min(len(split), _PROBE))) if s]
    return max(max(s) for s in sizes) if sizes else None


def choose_loader(split: ShardedSplit, augment: Optional[AugmentSpec], device, *,
                  eval_spec: Optional[EvalSpec] = None, world_size: int = 1) -> str:
    """The loader "auto" means. It never picks a loader measured slower than the reference loader
    for data of this kind on this kind of device:

    1. resident, when the decoded pixels fit the device's budget (training: every image shares one
       size; evaluation, `augment` None: any sizes, since the resident eval loader stores
       transformed `eval_spec.size` images of one rank's shard);
    2. on a CPU: ffcv when the split's `.beton` exists (`iccl convert --ffcv`; ~1.7-2.4x the
       reference on photographs); else dali when installed and the stored images are small (at most
       DALI_CPU_MAX_SIDE px: 1.53x the reference on CIFAR); else reference (on JPEG photographs DALI's
       CPU resize makes it 0.82-1.04x the reference, never clearly faster);
    3. on a GPU: dali when installed (nvJPEG decoding and CUDA resizing); else reference.

    Reads at most 16 image headers (and, for resident, see `resident.common_size`)."""
    import torch

    from pipeline.loaders import resident  # light: no optional dependencies
    from pipeline.loaders.base import EvalSpec

    budget = resident.resident_budget(device)
    if augment is not None:
        pad = augment.pad if augment.kind == "pad_crop" else 0
        fits = resident.common_size(split, pad, budget) is not None
    else:
        spec = eval_spec or EvalSpec()
        fits = -(-len(split) // world_size) * spec.size * spec.size * 3 <= budget
    if fits:
        return "resident"
    if torch.device(device).type == "cpu":
        if _beton_path(split).is_file():
            return "ffcv"
        side = _largest_side(split)
        small = side is not None and side <= DALI_CPU_MAX_SIDE
        return "dali" if small and _dali_importable() else "reference"
    return "dali" if _dali_importable() else "reference"


def _check_ffcv(split: ShardedSplit) -> None:
    if not _beton_path(split).is_file():
        raise DataError(f"{_beton_path(split)} is missing: the ffcv loader reads a .beton file; "
                        f"re-run `iccl convert` with --ffcv, or choose another --loader")


def make_train_loader(split: ShardedSplit, *, loader: str = "auto", batch_size: int, uniform: bool = True,
                      class_aware_gamma: Optional[float] = 0.0, augment: AugmentSpec, seed: int,
                      rank: int = 0, world_size: int = 1, device, workers: int = 2,
                      steps_per_epoch: Optional[int] = None) -> TrainLoader:
    """A training loader yielding Batch(x_a, y_a, x_c, y_c) on `device`.

    `batch_size` is the global batch per step (split over `world_size` ranks). Stage 1 of ICCL:
    `uniform=True` with a class-aware gamma; stage 2: `uniform=False` (class-aware stream only);
    the plain CE baseline: `class_aware_gamma=None` (uniform stream only). `steps_per_epoch`
    defaults to len(split) // batch_size and may not exceed it while the uniform stream is on
    (an epoch is one pass of the permutation).
    """
    import torch

    from pipeline.samplers import ClassAwareSampler, UniformSampler

    if not uniform and class_aware_gamma is None:
        raise DataError("a training loader needs at least one stream: "
                        "set uniform=True or a class-aware gamma")
    device = torch.device(device)
    full = len(split) // batch_size
    steps = full if steps_per_epoch is None else steps_per_epoch
    if uniform and steps > full:
        raise DataError(f"steps_per_epoch {steps} exceeds the {full} steps of one pass over "
                        f"{len(split)} samples at batch {batch_size}")
    try:
        uni = UniformSampler(len(split), batch_size, seed, rank, world_size) if uniform else None
        aware = None if class_aware_gamma is None else ClassAwareSampler(
            split.labels, class_aware_gamma, batch_size, seed, rank, world_size,
            steps_per_epoch=steps, num_classes=split.num_classes)
    except ValueError as e:
        raise DataError(f"{split.dir}: {e}") from e
    name = choose_loader(split, augment, device) if loader == "auto" else loader
    if name == "ffcv":
        _check_ffcv(split)
    cls = _loader_class(name, train=True)
    return cls(split, uniform=uni, class_aware=aware, augment=augment, seed=seed, steps_per_epoch=steps,
               rank=rank, world_size=world_size, device=device, workers=workers)


def make_eval_loader(split: ShardedSplit, *, loader: str = "auto", batch_size: int, spec: EvalSpec,
                     rank: int = 0, world_size: int = 1, device, workers: int = 2) -> EvalLoader:
    """An eval loader: this rank's contiguous shard of `split`, each sample once, in order;
    `batch_size` is per process."""
    import torch

    device = torch.device(device)
    name = (choose_loader(split, None, device, eval_spec=spec, world_size=world_size)
            if loader == "auto" else loader)
    if name == "ffcv":
        _check_ffcv(split)
    cls = _loader_class(name, train=False)
    return cls(split, spec=spec, batch_size=batch_size, rank=rank, world_size=world_size,
               device=device, workers=workers)
