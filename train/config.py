"""Run configuration: one flat, typed record; presets carry the paper's recipes (docs/METHOD.md).

Every field can be overridden from the command line (`iccl train ... --set key=value`); the resolved
config is saved as `config.json` in the run directory and inside every checkpoint, so a run can be
resumed and evaluated without repeating its options.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, fields

from pipeline.errors import DataError
from train.presets import (CE_OVERRIDES, PRESETS, STAGE2_CHOICES, STAGE2_DEFAULTS, STAGE2_FIELDS,
                           STAGE2_TUNED)
from train.settings import CHOICES, FLAGS, METHODS, RANGES, RGB_SETTINGS, TEXT_SETTINGS, UNBOUNDED


@dataclass
class Config:
    preset: str = "synthetic-lt"
    method: str = "iccl"           # "iccl", or "ce": plain cross-entropy, then cRT in stage 2
    seed: int = 0
    # model
    arch: str = "resnet32"           # resnet32, a torchvision ResNet name, or timm:NAME (model.backbones)
    pretrained: str = ""             # a local weights file for the encoder (.pth / .safetensors); "" = none
    proj_dim: int = 64
    proj_hidden: int | None = None  # None: the encoder's feature dimension
    # data
    data: str = ""
    train_split: str = "train"
    eval_split: str = "test"
    loader: str = "auto"
    workers: int = 2
    augment: str = "pad_crop"      # "pad_crop" (32-px) or "rrc" (random resized crop)
    image_size: int = 32
    pad: int = 4
    jitter: float = 0.0
    eval_resize: int = 32
    mean: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
    std: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)
    # stage 1 optimisation; lr is for a global batch of lr_ref_batch and scales linearly with it
    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1
    lr_ref_batch: int = 128
    momentum: float = 0.9
    nesterov: bool = False         # Nesterov momentum (BBN's CIFAR code uses it; the presets do not)
    weight_decay: float = 2e-4
    schedule: str = "step"         # "step": linear warm-up then x lr_step_factor at lr_steps; "cosine"
    lr_warmup_epochs: int = 5
    lr_steps: tuple[int, ...] = (120, 160)
    lr_step_factor: float = 0.01
    # ICCL (stage 1)
    warmup_epochs: int = 100       # T_w: uniform branch only (CE + centroid contrastive)
    gamma: float = 0.0             # class-aware sampler p_k ~ n_k^-gamma
    alpha: float = 1.0             # lambda ~ Beta(alpha, alpha_b): the weight of the class-agnostic image
    alpha_b: float = 1.0           # second Beta parameter (the paper's Table 5 tries Beta(0.2, 1.0))
    lambda_per: str = "sample"     # one lambda per "sample" (Eq. 3 per pair) or one per "batch" (mixup's code)
    fused_forward: bool = True     # one forward over [x_a; x_mix] (batch norm over both); False: one each
                                   # (the CIFAR presets: README, "Where the full budget falls short")
    tau: float = 0.1
    centroid_momentum: float = 0.99
    w_u: float = 1.0               # w^u of Eq. 8: weight of the uniform-branch CE, warm-up included
    w_u_zero_after_warmup: bool = False  # the paper's CIFAR rule: w^u = 0 once the warm-up ends
    w_il: float = 1.0
    # stage 2 (classifier rebalancing): one of STAGE2_CHOICES, see docs/METHOD.md
    stage2: str = "distill"
    val_fraction: float = 0.0      # per class, held out of BOTH stages as the validation split
    val_split: str = ""            # or a converted split as the validation split (nothing held out)
    s2_tau_norm_grid: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(21))  # tau_norm exponent
    s2_logit_adjust_grid: tuple[float, ...] = tuple(round(0.25 * i, 2) for i in range(13))  # LA tau
    s2_mislas_eps_head: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4)  # epsilon_1 candidates (MiSLAS)
    s2_mislas_eps_tail: float = 0.0  # epsilon_K, the smoothing of the rarest class
    s2_epochs: int = 10
    s2_lr: float = 0.01            # for a global batch of lr_ref_batch, cosine to 0
    s2_gamma: float = 1.0
    s2_beta: float = 0.5           # distillation weight; 0 = plain cRT
    s2_temperature: float = 4.0
    s2_finetune_encoder: bool = True
    s2_reinit_classifier: bool = False  # ICCL starts from the stage-1 classifier; cRT re-initialises
    # performance and bookkeeping
    compile: bool = False
    amp: str = "auto"              # autocast: auto (bf16 on CUDA and on CPUs with native bf16), bf16, fp32
    channels_last: bool = True
    device: str = "auto"
    eval_every: int = 0            # evaluate every N epochs (0: only at the end of each stage)
    eval_batch_size: int = 256
    checkpoint_minutes: float = 10.0  # also checkpoint mid-epoch this often (long ImageNet epochs)
    log_every: int = 50            # steps between metric lines
    sync_bn: bool = False          # SyncBatchNorm across processes (off: the usual per-GPU statistics)
    tensorboard: bool = False      # also write the metrics as TensorBoard events in RUN/tensorboard

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        known = {f.name for f in fields(cls)}
        d = dict(d)
        if "w_u_after_warmup" in d:  # runs written before the CIFAR rule became a switch
            d["w_u_zero_after_warmup"] = d.pop("w_u_after_warmup") == 0
        unknown = set(d) - known
        if unknown:
            raise DataError(f"unknown config keys {', '.join(sorted(unknown))}")
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**kw)  # types and values are checked by `validate`

    @property
    def w_u_after_warmup(self) -> float:
        """w^u once the warm-up is over: 0 under the CIFAR rule, else w_u."""
        return 0.0 if self.w_u_zero_after_warmup else self.w_u

    def scaled_lr(self, lr: float) -> float:
        return lr * self.batch_size / self.lr_ref_batch


# A --seeds folder holds one run per seed in seed-S/ and this file (the seeds and their options).
SEEDS_FILE = "seeds.json"

_DEFAULTS = Config()  # the type of each setting (a --set string is parsed to it)


def allowed(key: str) -> str:
    """What `key` may be, in words (for messages and `iccl train --list-settings`)."""
    if key in CHOICES:
        return "one of " + ", ".join(CHOICES[key])
    if key == "loader":
        from pipeline.loaders import LOADER_CHOICES
        return "one of " + ", ".join(LOADER_CHOICES)
    if key == "amp":
        from pipeline.device import AMP_MODES
        return "one of " + ", ".join(AMP_MODES)
    if key == "device":
        return "auto, cpu, cuda or cuda:N"  # as pipeline.device.pick_device takes them
    if key == "arch":
        from model.network import ARCHITECTURES
        return "one of " + ", ".join(ARCHITECTURES) + ", or timm:NAME (any timm model)"
    if key in TEXT_SETTINGS:
        return TEXT_SETTINGS[key]
    if key in UNBOUNDED:
        return UNBOUNDED[key]
    if key in RANGES:
        default = getattr(_DEFAULTS, key)
        return ("3 values, each " if key in RGB_SETTINGS else "values, each " if isinstance(default, tuple)
                else "none, or " if default is None else "") + str(RANGES[key])
    kind = type(getattr(_DEFAULTS, key))
    return {bool: "true or false", str: "text"}.get(kind, "3 numbers" if key in RGB_SETTINGS else "")


def parse_value(key: str, text: str):
    """A `--set key=text` string as the setting's type (that of its default)."""
    cur = getattr(_DEFAULTS, key)
    try:
        if isinstance(cur, bool):
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if isinstance(cur, tuple):
            items = [t for t in text.replace("(", "").replace(")", "").split(",") if t.strip()]
            kind = type(cur[0]) if cur else float
            return tuple(kind(t) for t in items)
        if cur is None:
            return None if text.lower() == "none" else int(text)
        return type(cur)(text)
    except ValueError:
        example = ",".join(map(str, cur)) if isinstance(cur, tuple) else cur
        raise DataError(f"--set {key}={text}: expected a value like {example}"
                        f"{' (' + allowed(key) + ')' if allowed(key) else ''}") from None


def setting_text(value) -> str:
    """A setting's value as `--set` takes it (what `parse_value` reads back): 0.1,0.2 for a tuple,
    true / false, none."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    return "none" if value is None else str(value)


def check_known(overrides: dict[str, str]) -> None:
    """Raise DataError naming the first `--set` key that is no setting, with the nearest one."""
    known = {f.name for f in fields(Config)}
    for key in overrides:
        if key not in known:
            near = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {near[0]}? " if near else ""
            raise DataError(f"--set {key}=...: no such setting; {hint}Settings: {', '.join(sorted(known))} "
                            f"(`iccl train --list-settings` shows them with their values)")


def resolve(preset: str | None = None, method: str | None = None,
            overrides: dict[str, str] | None = None, *, base: dict | None = None, **explicit) -> Config:
    """The config of a run: the preset's recipe (or `base`, a saved run's settings), then the
    method's changes, then `explicit` typed values (dedicated flags; None: not given), then
    `overrides` (`--set` strings). A setting given both as a flag and with --set must agree, else
    DataError. Changing `epochs` (either way) scales `warmup_epochs` (T_w), `lr_warmup_epochs` and
    `lr_steps` with it (rounded) unless they are given too. Everything is validated (`validate`) before it is returned."""
    check_known(overrides or {})
    said = {key: parse_value(key, text) for key, text in (overrides or {}).items()}
    flags = {k: v for k, v in dict(explicit, preset=preset, method=method).items() if v is not None}
    for key in set(flags) & set(said):
        if flags[key] != said[key]:
            flag = FLAGS.get(key, key)
            raise DataError(f"{flag} {flags[key]} and --set {key}={overrides[key]} say different "
                            f"things; give the setting once.")
    given = {**flags, **said}
    if base is None:
        preset, method = given.pop("preset", None), given.pop("method", "iccl")
        if preset not in PRESETS:
            raise DataError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}"
                            if preset else f"pass --preset NAME, one of {', '.join(PRESETS)}")
        if method not in METHODS:
            raise DataError(f"method={method!r}: choose one of {', '.join(METHODS)}")
        values = dict(PRESETS[preset], preset=preset, method=method)
        if method == "ce":
            values.update(CE_OVERRIDES)
    else:
        values = dict(base)
    epochs = given.get("epochs")
    if epochs and epochs != values.get("epochs", _DEFAULTS.epochs) and base is None:
        # A shorter or longer run keeps the recipe's shape: T_w and the lr steps scale with it.
        f = epochs / values["epochs"]
        values["warmup_epochs"] = round(values.get("warmup_epochs", _DEFAULTS.warmup_epochs) * f)
        values["lr_warmup_epochs"] = round(values.get("lr_warmup_epochs", _DEFAULTS.lr_warmup_epochs) * f)
        if "lr_steps" in values:  # cosine presets have no steps
            values["lr_steps"] = tuple(round(s * f) for s in values["lr_steps"])
    if "stage2" in given:  # a stage-2 choice brings its defaults before the other settings given
        choice = given.pop("stage2")
        if choice not in STAGE2_CHOICES:
            raise DataError(f"--set stage2={choice}: choose one of {', '.join(STAGE2_CHOICES)}")
        # The preset's stage 2 first (a run's saved values may be another choice's), then the choice's.
        recipe = PRESETS.get(values.get("preset"), {})
        values.update({name: recipe.get(name, getattr(_DEFAULTS, name)) for name in STAGE2_FIELDS})
        values.update(STAGE2_DEFAULTS[choice], stage2=choice)
    values.update(given)
    cfg = Config.from_dict(values)
    validate(cfg)
    return cfg


def _type_problem(key: str, value) -> str | None:
    cur = getattr(_DEFAULTS, key)
    number = (int, float) if isinstance(cur, float) else (int,)
    if isinstance(cur, bool):
        ok = isinstance(value, bool)
    elif isinstance(cur, (int, float)) or cur is None:
        ok = (cur is None and value is None) or (isinstance(value, number) and not isinstance(value, bool))
    elif isinstance(cur, tuple):
        kinds = (int,) if cur and isinstance(cur[0], int) else (int, float)
        ok = isinstance(value, (tuple, list)) and all(
            isinstance(v, kinds) and not isinstance(v, bool) for v in value)
    else:
        ok = isinstance(value, str)
    return None if ok else f"{key}={value!r}: expected a value like {cur!r}"


def _value_problem(key: str, value) -> str | None:
    if key in CHOICES and value not in CHOICES[key]:
        return f"{key}={value!r}: {allowed(key)}"
    if key in RGB_SETTINGS and len(value) != 3:
        return f"{key}={value!r}: needs 3 values (R, G, B)"
    if isinstance(value, (str, bool)):
        return None
    rule = RANGES.get(key)
    items = value if isinstance(value, (tuple, list)) else () if value is None else (value,)
    for v in items:
        if not math.isfinite(v) or (rule is not None and not rule.holds(v)):
            return f"{key}={value!r}: must be {'each ' if len(items) > 1 else ''}{rule or 'finite'}"
    return None


def _check_owned(cfg: Config) -> list[str]:
    """The settings whose allowed values are kept by the code that uses them."""
    from model.network import check_arch
    from pipeline.device import AMP_MODES, pick_device
    from pipeline.loaders import LOADER_CHOICES

    problems = []
    if cfg.loader not in LOADER_CHOICES:
        problems.append(f"loader={cfg.loader!r}: {allowed('loader')}")
    if cfg.amp not in AMP_MODES:
        problems.append(f"amp={cfg.amp!r}: {allowed('amp')}")
    try:
        check_arch(cfg.arch)
    except ValueError as e:
        problems.append(f"arch={cfg.arch!r}: {e}")
    try:
        pick_device(cfg.device)
    except DataError as e:
        problems.append(f"device={cfg.device!r}: {e}")
    return problems


def _stage2_problems(cfg: Config) -> list[str]:
    """Stage-2 settings that contradict each other."""
    problems = []
    if cfg.stage2 != "distill" and cfg.s2_beta > 0:
        problems.append(f"s2_beta={cfg.s2_beta}: distillation belongs to stage2=distill (set s2_beta=0)")
    if cfg.val_split and cfg.val_fraction > 0:
        problems.append(f"val_split={cfg.val_split} and val_fraction={cfg.val_fraction}: two validation "
                        f"splits; keep one (val_fraction=0 keeps every training image)")
    if cfg.val_split and cfg.val_split in (cfg.train_split, cfg.eval_split, "test"):
        role = ("trained on" if cfg.val_split == cfg.train_split else
                "reported on (eval_split)" if cfg.val_split == cfg.eval_split else "named test")
        problems.append(f"val_split={cfg.val_split}: the split {role}; choices are never made on it: "
                        f"name another split, e.g. the val split of `iccl convert --val-per-class N`")
    if cfg.stage2 in STAGE2_TUNED and cfg.val_fraction == 0 and not cfg.val_split:
        setting, name = STAGE2_TUNED[cfg.stage2]
        if len(getattr(cfg, setting)) > 1:
            problems.append(
                f"stage2={cfg.stage2} chooses {name} among {setting} on a validation split, and there is "
                f"none: --set val_split=val where the dataset has a split named val (`iccl convert "
                f"--val-per-class N` writes one, the demo data has one; `iccl info DATA` lists the "
                f"splits), or train stage 1 with --set val_fraction=0.1 (both stages then leave those "
                f"images out), or fix the value with --set {setting}=VALUE")
    if not (cfg.s2_tau_norm_grid and cfg.s2_logit_adjust_grid and cfg.s2_mislas_eps_head):
        problems.append("the stage-2 grids (s2_tau_norm_grid, s2_logit_adjust_grid, s2_mislas_eps_head) "
                        "need at least one value")
    if not all(e < 1.0 for e in (*cfg.s2_mislas_eps_head, cfg.s2_mislas_eps_tail)):
        problems.append("MiSLAS smoothing (s2_mislas_eps_head, s2_mislas_eps_tail) must be in [0, 1)")
    return problems


def validate(cfg: Config) -> None:
    """DataError listing every setting of `cfg` outside what it may be (CHOICES, RANGES, the
    lists kept by loaders, devices and networks), and settings that contradict each other."""
    problems = [p for f in fields(Config) for p in [_type_problem(f.name, getattr(cfg, f.name))] if p]
    if not problems:  # values are only comparable once their types are right
        problems = [p for f in fields(Config) for p in [_value_problem(f.name, getattr(cfg, f.name))] if p]
        problems += _check_owned(cfg)
        if cfg.warmup_epochs > cfg.epochs:
            problems.append(f"warmup_epochs={cfg.warmup_epochs} must be within [0, epochs={cfg.epochs}]")
        problems += _stage2_problems(cfg)
    if problems:
        raise DataError("invalid configuration: " + "; ".join(problems)
                        + " (`iccl train --list-settings` shows what each setting may be)")


def load_config_json(path) -> Config:
    try:
        return Config.from_dict(json.loads(open(path).read()))
    except (OSError, ValueError, TypeError) as e:
        raise DataError(f"{path}: not a readable run config ({e})") from e
