"""Everything a stage needs, built once from the config: device, process group, data, loaders.

This is the only place `train` touches `pipeline`: splits are opened, loaders made and images
normalised / mixed here; the stages see batches of normalised tensors.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.dataset import ShardedSplit
from pipeline.device import autocast_dtype, pick_device
from pipeline.errors import DataError
from pipeline.loaders import make_eval_loader, make_train_loader
from pipeline.loaders.base import AugmentSpec, EvalSpec, TrainLoader
from pipeline.mixing import mix_normalize, normalize, sample_lambda
from train.config import Config
from train.distributed import DistInfo, init_from_env
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

    def _make_eval_loader(self):
        cfg = self.cfg
        return make_eval_loader(self.eval, loader=cfg.loader, batch_size=cfg.eval_batch_size,
                                spec=EvalSpec(size=cfg.image_size, resize=cfg.eval_resize),
                                rank=self.dist.rank, world_size=self.dist.world_size,
                                device=self.device, workers=cfg.workers)

    def close(self) -> None:
        for loader in self._loaders.values():
            loader.close()
        self._loaders.clear()

    # --- on-device preparation --------------------------------------------------------------
    def normalize(self, x_u8: torch.Tensor) -> torch.Tensor:
        return normalize(x_u8, self.cfg.mean, self.cfg.std)

    def lambdas(self, epoch: int, step: int, n_local: int) -> torch.Tensor:
        """lambda ~ Beta(alpha, alpha) per sample, drawn for the global batch and sliced per rank,
        so that N processes see exactly the lambdas one process would."""
        g = torch.Generator().manual_seed(_seed_of(self.cfg.seed, _LAMBDA_STREAM, epoch, step))
        lam = sample_lambda(n_local * self.dist.world_size, self.cfg.alpha, g, torch.device("cpu"))
        lam = lam[self.dist.rank * n_local:(self.dist.rank + 1) * n_local]
        if self.device.type == "cuda":  # from pinned memory the copy does not stall the host
            lam = lam.pin_memory()
        return lam.to(self.device, non_blocking=True)

    def mix(self, x_a_u8, x_c_u8, lam):
        return mix_normalize(x_a_u8, x_c_u8, lam, self.cfg.mean, self.cfg.std)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.bfloat16,
                              enabled=self.amp_dtype is not None)


def _seed_of(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0] >> 1)


def build_context(cfg: Config, run_dir: Path, with_eval: bool = True) -> Context:
    """`with_eval` False: no evaluation split is needed (benchmarks)."""
    device = pick_device(cfg.device)
    dist = init_from_env(device)
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.world_size))
    if not cfg.data:
        raise DataError("no dataset: pass --data DIR (a folder written by `iccl convert`)")
    train = ShardedSplit(cfg.data, cfg.train_split)
    eval_split = None
    if with_eval:
        if cfg.eval_split not in train.meta["splits"]:
            raise DataError(f"{cfg.data}: no {cfg.eval_split!r} split to evaluate on (it has "
                            f"{sorted(train.meta['splits'])}); pass --set eval_split=NAME")
        eval_split = ShardedSplit(cfg.data, cfg.eval_split)
    run_dir.mkdir(parents=True, exist_ok=True)
    return Context(cfg=cfg, run_dir=run_dir, device=device, dist=dist, train=train, eval=eval_split,
                   metrics=MetricsLog(run_dir / "metrics.jsonl", enabled=dist.is_main),
                   amp_dtype=autocast_dtype(device, cfg.amp))
