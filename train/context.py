"""Everything a stage needs, built once from the config: device, process group, data, loaders.

This is the only place `train` touches `pipeline`: splits are opened, loaders made and images
normalised / mixed here; the stages see batches of normalised tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

from pipeline.atomic import output_dir
from pipeline.cpus import usable_cpus
from pipeline.dataset import ShardedSplit
from pipeline.device import autocast_dtype, pick_device, upload
from pipeline.errors import DataError
from pipeline.holdout import carve_validation, subset
from pipeline.loaders import make_eval_loader, make_train_loader
from pipeline.loaders.base import AugmentSpec, EvalSpec, TrainLoader
from pipeline.loaders.resident import stored_size
from pipeline.mixing import mix_normalize, normalize, sample_lambda
from train.config import Config
from train.distributed import DistInfo, init_from_env
from train.inference import autocast_for
from train.metrics import MetricsLog

_LAMBDA_STREAM = 7  # keeps the lambda draws independent of the samplers' and augmentation's streams


@dataclass
class Context:
    cfg: Config
    run_dir: Path
    device: torch.device
    dist: DistInfo
    train: ShardedSplit
    eval: ShardedSplit | None
    metrics: MetricsLog
    amp_dtype: torch.dtype | None
    val: ShardedSplit | None = None  # cfg.val_split, or carved from the training split (cfg.val_fraction)
    _loaders: dict = field(default_factory=dict)
    corrupt_images_said: bool = False  # train.loop says it once per run

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    @property
    def groups(self) -> dict[str, list[int]]:
        return self.train.meta["shot_groups"]

    def say(self, message: str) -> None:
        if self.dist.is_main:
            from pipeline.progress import say
            say(message)

    # --- data ------------------------------------------------------------------------------
    def train_loader(self, *, uniform: bool, class_aware_gamma: float | None, batch_size: int) -> TrainLoader:
        """One loader per stream combination, made on first use and reused across epochs."""
        key = (uniform, class_aware_gamma, batch_size)
        if key not in self._loaders:
            cfg = self.cfg
            augment = AugmentSpec(kind=cfg.augment, size=cfg.image_size, pad=cfg.pad, jitter=cfg.jitter)
            self._loaders[key] = make_train_loader(
                self.train, loader=cfg.loader, batch_size=batch_size, uniform=uniform,
                class_aware_gamma=class_aware_gamma, augment=augment, seed=cfg.seed,
                rank=self.dist.rank, world_size=self.dist.world_size, device=self.device,
                workers=cfg.workers)
        return self._loaders[key]

    def eval_batches(self):
        """The evaluation loader, made once per run (FFCV compiles code per loader it builds)."""
        if "eval" not in self._loaders:
            self._loaders["eval"] = self._make_eval_loader()
        return self._loaders["eval"]

    def plain_batches(self, which: str):
        """Un-augmented batches (the evaluation transform) of "train" or "val", for the stage-2
        choices that read features: NCM's class means, the validation search of tuned values."""
        key = ("plain", which)
        if key not in self._loaders:
            split = self.train if which == "train" else self.val
            self._loaders[key] = self._make_eval_loader(split)
        return self._loaders[key]

    def _make_eval_loader(self, split: ShardedSplit | None = None):
        cfg = self.cfg
        return make_eval_loader(split or self.eval, loader=cfg.loader, batch_size=cfg.eval_batch_size,
                                spec=EvalSpec(size=cfg.image_size, resize=cfg.eval_resize),
                                rank=self.dist.rank, world_size=self.dist.world_size,
                                device=self.device, workers=cfg.workers)

    def close(self) -> None:
        for loader in self._loaders.values():
            loader.close()
        self._loaders.clear()
        self.metrics.close()

    # --- on-device preparation --------------------------------------------------------------
    def normalize(self, x_u8: torch.Tensor) -> torch.Tensor:
        return normalize(x_u8, self.cfg.mean, self.cfg.std)

    def lambdas(self, epoch: int, step: int, n_local: int) -> torch.Tensor:
        """(n_local,) float32: lambda ~ Beta(alpha, alpha_b) per sample (or one for the whole
        global batch with lambda_per="batch"), drawn for the global batch and sliced per rank, so
        that N processes see exactly the lambdas one process would."""
        g = torch.Generator().manual_seed(_seed_of(self.cfg.seed, _LAMBDA_STREAM, epoch, step))
        n_global = n_local * self.dist.world_size
        lam = sample_lambda(n_global if self.cfg.lambda_per == "sample" else 1, self.cfg.alpha, g,
                            torch.device("cpu"), b=self.cfg.alpha_b).expand(n_global).clone()
        return upload(lam[self.dist.rank * n_local:(self.dist.rank + 1) * n_local], self.device)

    def mix(self, x_a_u8, x_c_u8, lam):
        return mix_normalize(x_a_u8, x_c_u8, lam, self.cfg.mean, self.cfg.std)

    def autocast(self):
        return autocast_for(self.device, self.amp_dtype)


def _seed_of(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0] >> 1)


def _check_batch(cfg: Config, train: ShardedSplit, world_size: int) -> None:
    """The global batch must fit the training split once and split evenly over the processes."""
    if cfg.batch_size > len(train):
        raise DataError(f"--batch-size {cfg.batch_size}: the {cfg.train_split} split of {cfg.data} has "
                        f"{len(train)} samples, fewer than one batch. Lower the batch size (at most "
                        f"{len(train)}).")
    if cfg.batch_size % world_size:
        raise DataError(f"--batch-size {cfg.batch_size}: not a multiple of the {world_size} processes; "
                        f"change the batch size or the process count.")


def _check_crop(cfg: Config, train: ShardedSplit) -> None:
    """pad_crop needs images at least image_size - 2·pad px a side. Checked on the first image whose
    header reads (the datasets pad_crop is for, CIFAR-style, have one size; a corrupt image is
    replaced in training, not refused here)."""
    if cfg.augment != "pad_crop":
        return
    size = next((s for s in map(partial(stored_size, train), range(min(len(train), 64))) if s), None)
    if size and min(size) + 2 * cfg.pad < cfg.image_size:
        fits = min(size) + 2 * cfg.pad
        raise DataError(f"--set image_size={cfg.image_size}: a {cfg.image_size}-px crop does not fit the "
                        f"{size[0]}x{size[1]} images of {cfg.data} padded by {cfg.pad} px; set image_size "
                        f"to at most {fits}, and eval_resize with it (e.g. --set image_size={min(size)} "
                        f"--set eval_resize={min(size)}).")


def _named_split(cfg: Config, setting: str, splits) -> str:
    name = getattr(cfg, setting)
    if name not in splits:
        hint = (" (`iccl convert ... --val-per-class N` writes a validation split named val)"
                if setting == "val_split" else ", or `iccl eval --split NAME` for a run already trained")
        raise DataError(f"{cfg.data}: no split named {name} for {setting} (it has {', '.join(sorted(splits))}); choose "
                        f"one of them with --set {setting}=NAME{hint}")
    return name


def build_context(cfg: Config, run_dir: Path, with_eval: bool = True, training: bool = True) -> Context:
    """`with_eval` False: no evaluation split is needed (benchmarks). `training` False: only
    evaluation follows (no batch to fit, nothing to write in `run_dir`)."""
    device = pick_device(cfg.device)
    dist = init_from_env(device)
    if device.type == "cpu":
        # Divided by all processes, not only this machine's: never oversubscribes, and every
        # rank computes with the same thread count (the multi-node test's bit-for-bit check).
        torch.set_num_threads(max(1, usable_cpus() // dist.world_size))
    if not cfg.data:
        raise DataError("no dataset: pass --data DIR (a folder written by `iccl convert`)")
    if not Path(cfg.data).is_dir():
        raise DataError(f"{cfg.data}: no such folder. If a run's dataset has moved since it was made, "
                        f"pass --data NEW/PATH to the same command; otherwise pass the output folder of "
                        f"`iccl convert`.")
    train = ShardedSplit(cfg.data, cfg.train_split)
    if training:
        _check_crop(cfg, train)
    val = None
    if cfg.val_fraction > 0:  # both stages train without the validation images
        fit_idx, val_idx = carve_validation(train.labels, cfg.val_fraction, train.num_classes)
        train, val = (subset(train, fit_idx, f"{cfg.train_split}-fit"),
                      subset(train, val_idx, f"{cfg.train_split}-val"))
    if cfg.val_split and training:  # evaluation alone never reads it
        val = ShardedSplit(cfg.data, _named_split(cfg, "val_split", train.meta["splits"]))
    eval_split = None
    if with_eval:
        eval_split = ShardedSplit(cfg.data, _named_split(cfg, "eval_split", train.meta["splits"]))
    if (training and not cfg.fused_forward and cfg.method == "iccl" and cfg.w_u_after_warmup
            and dist.world_size > 1):  # with w^u = 0 the clean forward records no graph (train.steps)
        raise DataError("fused_forward=false with w^u > 0 after the warm-up runs two forwards with "
                        "a graph before one backward, which DistributedDataParallel refuses: run it "
                        "as one process (no torchrun), or --set fused_forward=true, or "
                        "--set w_u_zero_after_warmup=true.")
    if training:
        # Checked before anything is written, so that a refused run can be corrected and started
        # again into the same folder; a run that exists already (resume) is not probed for writing.
        _check_batch(cfg, train, dist.world_size)
        output_dir(run_dir, "--out", probe=not (run_dir / "config.json").is_file())
    return Context(cfg=cfg, run_dir=run_dir, device=device, dist=dist, train=train, eval=eval_split,
                   val=val, metrics=MetricsLog(run_dir / "metrics.jsonl", enabled=dist.is_main,
                                               tensorboard_dir=run_dir / "tensorboard" if cfg.tensorboard else None),
                   amp_dtype=autocast_dtype(device, cfg.amp))
