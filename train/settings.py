"""What each setting may be: the one list of allowed values per setting, and the words for it.

Data only: `train.config` checks a configuration against these tables (`validate`) and words them
for messages and `iccl train --list-settings` (`allowed`).
"""
from __future__ import annotations

from dataclasses import dataclass

from train.presets import PRESETS, STAGE2_CHOICES

METHODS = ("iccl", "ce")
SCHEDULES = ("step", "cosine")
AUGMENTS = ("pad_crop", "rrc")
LAMBDA_PER = ("sample", "batch")


@dataclass(frozen=True)
class Range:
    """Allowed numbers: lo <= x (lo < x when lo_open) and x <= hi (x < hi when hi_open); None: no
    bound on that side."""
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def holds(self, x) -> bool:
        return ((self.lo is None or (x > self.lo if self.lo_open else x >= self.lo))
                and (self.hi is None or (x < self.hi if self.hi_open else x <= self.hi)))

    def __str__(self) -> str:
        def num(x) -> str:
            return str(int(x)) if float(x).is_integer() else f"{x:g}"
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {num(self.lo)}"
        return f"in {'(' if self.lo_open else '['}{num(self.lo)}, {num(self.hi)}{')' if self.hi_open else ']'}"


_POSITIVE, _AT_LEAST_1, _NON_NEGATIVE, _UNIT = Range(0, lo_open=True), Range(1), Range(0), Range(0, 1)

# The one list of what each setting may be. Choice-valued settings whose list lives with the code
# that acts on them are checked through that code (train.config._check_owned): loader (pipeline.loaders),
# amp and device (pipeline.device), arch (model.network). A tuple setting's Range holds for each item.
CHOICES: dict[str, tuple[str, ...]] = {
    "preset": tuple(PRESETS), "method": METHODS, "schedule": SCHEDULES, "augment": AUGMENTS,
    "stage2": STAGE2_CHOICES, "lambda_per": LAMBDA_PER,
}
RANGES: dict[str, Range] = {
    "seed": Range(0, 2**32 - 1), "proj_dim": _AT_LEAST_1, "proj_hidden": _AT_LEAST_1,
    "workers": _NON_NEGATIVE, "image_size": _AT_LEAST_1, "pad": _NON_NEGATIVE, "jitter": _UNIT,
    "eval_resize": _AT_LEAST_1, "std": _POSITIVE,
    "epochs": _AT_LEAST_1, "batch_size": _AT_LEAST_1, "lr": _POSITIVE, "lr_ref_batch": _AT_LEAST_1,
    "momentum": _UNIT, "weight_decay": _NON_NEGATIVE,
    "lr_warmup_epochs": _NON_NEGATIVE, "lr_steps": _NON_NEGATIVE, "lr_step_factor": Range(0, 1, lo_open=True),
    "warmup_epochs": _NON_NEGATIVE, "alpha": _POSITIVE, "tau": _POSITIVE, "centroid_momentum": _UNIT,
    "alpha_b": _POSITIVE, "w_u": _NON_NEGATIVE, "w_il": _NON_NEGATIVE, "val_fraction": Range(0, 1, hi_open=True),
    "s2_tau_norm_grid": _NON_NEGATIVE, "s2_logit_adjust_grid": _NON_NEGATIVE,
    "s2_mislas_eps_head": _NON_NEGATIVE, "s2_mislas_eps_tail": _NON_NEGATIVE,
    "s2_epochs": _NON_NEGATIVE, "s2_lr": _POSITIVE, "s2_beta": _UNIT, "s2_temperature": _POSITIVE,
    "eval_every": _NON_NEGATIVE, "eval_batch_size": _AT_LEAST_1, "checkpoint_minutes": _NON_NEGATIVE,
    "log_every": _AT_LEAST_1,
}
# Numbers with no bound: the class-aware samplers' exponent (p_k ~ n_k^-gamma, pipeline.samplers).
UNBOUNDED = {k: "any number (p_k ~ n_k^-gamma: 0 class-balanced, 1 reverse, -1 instance-balanced)"
             for k in ("gamma", "s2_gamma")}
# Free-text settings, checked against the dataset when a run starts.
TEXT_SETTINGS = {"data": "a folder written by `iccl convert`", "train_split": "a split of the dataset",
                 "eval_split": "a split of the dataset",
                 "val_split": "a split of the dataset, not the training or evaluation one (empty: none)"}
# Settings that hold three values (one per RGB channel).
RGB_SETTINGS = ("mean", "std")
# Dedicated flags of `iccl train` for some settings (the same setting may also come with --set).
FLAGS = {"batch_size": "--batch-size", "epochs": "--epochs", "lr": "--lr", "seed": "--seed",
         "loader": "--loader", "workers": "--workers", "device": "--device", "compile": "--compile",
         "data": "--data", "preset": "--preset", "method": "--method"}
