"""Run configuration: one flat, typed record; presets carry the paper's recipes (spec/ICCL.md).

Every field can be overridden from the command line (`iccl train ... --set key=value`); the resolved
config is saved as `config.json` in the run directory and inside every checkpoint, so a run can be
resumed and evaluated without repeating its options.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields

from pipeline.device import AMP_MODES
from pipeline.errors import DataError


@dataclass
class Config:
    preset: str = "synthetic-lt"
    method: str = "iccl"           # "iccl", or "ce": plain cross-entropy, then cRT in stage 2
    seed: int = 0
    # model
    arch: str = "resnet32"
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
    weight_decay: float = 2e-4
    schedule: str = "step"         # "step": linear warm-up then x lr_step_factor at lr_steps; "cosine"
    lr_warmup_epochs: int = 5
    lr_steps: tuple[int, ...] = (120, 160)
    lr_step_factor: float = 0.01
    # ICCL (stage 1)
    warmup_epochs: int = 100       # T_w: uniform branch only (CE + centroid contrastive)
    gamma: float = 0.0             # class-aware sampler p_k ~ n_k^-gamma
    alpha: float = 1.0             # lambda ~ Beta(alpha, alpha)
    tau: float = 0.1
    centroid_momentum: float = 0.99
    w_u: float = 1.0               # weight of the uniform-branch CE (Eq. 8)
    w_u_after_warmup: float = 0.0  # CIFAR: the paper drops the uniform CE after warm-up
    w_il: float = 1.0
    # stage 2 (classifier rebalancing)
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

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise DataError(f"unknown config keys {sorted(unknown)}")
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**kw)

    def scaled_lr(self, lr: float) -> float:
        return lr * self.batch_size / self.lr_ref_batch


def _cifar(**kw) -> dict:
    base = dict(arch="resnet32", proj_dim=64, augment="pad_crop", image_size=32, eval_resize=32,
                epochs=200, batch_size=128, lr=0.1, lr_ref_batch=128, weight_decay=2e-4,
                schedule="step", lr_warmup_epochs=5, lr_steps=(120, 160), lr_step_factor=0.01,
                warmup_epochs=100, w_u_after_warmup=0.0, s2_epochs=10, s2_lr=0.01,
                s2_finetune_encoder=True)
    base.update(kw)
    return base


_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

PRESETS: dict[str, dict] = {
    "cifar10-lt": _cifar(),
    "cifar100-lt": _cifar(),
    "imagenet-lt": dict(
        arch="resnext50_32x4d", proj_dim=128, augment="rrc", image_size=224, eval_resize=256, jitter=0.4,
        mean=_IMAGENET_MEAN, std=_IMAGENET_STD, epochs=90, batch_size=256, lr=0.1, lr_ref_batch=256,
        weight_decay=5e-4, schedule="cosine", lr_warmup_epochs=0, warmup_epochs=45, w_u_after_warmup=1.0,
        s2_epochs=10, s2_lr=0.1, s2_finetune_encoder=False, workers=8),
    "inat2018": dict(
        arch="resnet50", proj_dim=128, augment="rrc", image_size=224, eval_resize=256, jitter=0.0,
        mean=_IMAGENET_MEAN, std=_IMAGENET_STD, epochs=90, batch_size=512, lr=0.2, lr_ref_batch=512,
        weight_decay=1e-4, schedule="cosine", lr_warmup_epochs=0, warmup_epochs=45, w_u_after_warmup=1.0,
        s2_epochs=10, s2_lr=0.2, s2_finetune_encoder=False, eval_split="val", workers=8),
    # The embedded demo: ~3 minutes on 2 CPU cores; the CIFAR recipe's shape at 30 epochs. Its few
    # classes have 5-13 images, so stage 2 keeps the encoder frozen (fine-tuning it on a reverse-
    # sampled batch of so few images over-fits them).
    "synthetic-lt": _cifar(epochs=30, lr_warmup_epochs=5, lr_steps=(20, 25), warmup_epochs=15,
                           s2_epochs=4, s2_finetune_encoder=False),
}

# What --method ce changes: no second stream, no projection loss; stage 2 is cRT (class-balanced,
# re-initialised classifier, no distillation), as in the Decoupling work.
CE_OVERRIDES = dict(s2_gamma=0.0, s2_beta=0.0, s2_reinit_classifier=True)


def _parse_value(cur, text: str, key: str):
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
        raise DataError(f"--set {key}={text}: expected a value like {cur!r}") from None


def resolve(preset: str, method: str = "iccl", overrides: dict[str, str] | None = None,
            **explicit) -> Config:
    """Preset, then the method's changes, then `explicit` typed values, then `--set` strings.
    Changing `epochs` scales `warmup_epochs` (T_w), `lr_warmup_epochs` and `lr_steps` with it
    (rounded) unless they are given."""
    if preset not in PRESETS:
        raise DataError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if method not in ("iccl", "ce"):
        raise DataError(f"unknown method {method!r}; choose iccl or ce")
    values = dict(PRESETS[preset], preset=preset, method=method)
    if method == "ce":
        values.update(CE_OVERRIDES)
    epochs = explicit.get("epochs")
    if epochs and epochs != values["epochs"]:
        # A shorter or longer run keeps the recipe's shape: T_w and the lr steps scale with it.
        f = epochs / values["epochs"]
        values["warmup_epochs"] = round(values["warmup_epochs"] * f)
        values["lr_warmup_epochs"] = round(values["lr_warmup_epochs"] * f)
        if "lr_steps" in values:  # cosine presets have no steps
            values["lr_steps"] = tuple(round(s * f) for s in values["lr_steps"])
    values.update({k: v for k, v in explicit.items() if v is not None})
    cfg = Config(**values)
    for key, text in (overrides or {}).items():
        if key not in {f.name for f in fields(Config)}:
            raise DataError(f"--set {key}=...: no such setting. Settings: "
                            f"{', '.join(f.name for f in fields(Config))}")
        setattr(cfg, key, _parse_value(getattr(cfg, key), text, key))
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    problems = []
    if cfg.epochs < 1:
        problems.append("epochs must be >= 1")
    if not 0 <= cfg.warmup_epochs <= cfg.epochs:
        problems.append(f"warmup_epochs={cfg.warmup_epochs} must be within [0, epochs={cfg.epochs}]")
    if cfg.schedule not in ("step", "cosine"):
        problems.append(f"schedule={cfg.schedule!r}: use step or cosine")
    if cfg.augment not in ("pad_crop", "rrc"):
        problems.append(f"augment={cfg.augment!r}: use pad_crop or rrc")
    if cfg.batch_size < 1 or cfg.s2_epochs < 0:
        problems.append("batch_size must be >= 1 and s2_epochs >= 0")
    if not 0.0 <= cfg.s2_beta <= 1.0:
        problems.append(f"s2_beta={cfg.s2_beta} must be in [0, 1]")
    if cfg.alpha <= 0 or cfg.tau <= 0:
        problems.append("alpha and tau must be > 0")
    if cfg.amp not in AMP_MODES:
        problems.append(f"amp={cfg.amp!r}: use {', '.join(AMP_MODES)}")
    if problems:
        raise DataError("invalid configuration: " + "; ".join(problems))


def load_config_json(path) -> Config:
    try:
        return Config.from_dict(json.loads(open(path).read()))
    except (OSError, ValueError, TypeError) as e:
        raise DataError(f"{path}: not a readable run config ({e})") from e
