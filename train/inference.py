"""The trained model at inference: uint8 images in, float32 logits out.

One code path for `iccl eval`, `iccl predict` and the exported program: normalise with the run's
mean / std (`pipeline.mixing.normalize`), encoder, the (rebalanced) linear classifier, under the
run's autocast setting. The projection head is a training-time module and is never used here.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Callable, ContextManager, Sequence

import torch

from model.network import ICCLNet, build_network
from pipeline.errors import DataError
from pipeline.mixing import normalize
from train import checkpoint
from train.config import SEEDS_FILE, Config


def autocast_for(device: torch.device, amp_dtype: torch.dtype | None) -> ContextManager:
    """torch.autocast in `amp_dtype` on `device`'s type; a disabled one (fp32) when it is None."""
    return torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None)


def place(net: ICCLNet, device: torch.device, channels_last: bool) -> ICCLNet:
    """Move `net` to `device`, in channels_last memory when the run trains that way."""
    net = net.to(device)
    return net.to(memory_format=torch.channels_last) if channels_last else net


@torch.no_grad()
def classify(net: ICCLNet, x_u8: torch.Tensor, *, mean: Sequence[float], std: Sequence[float],
             autocast: Callable[[], ContextManager]) -> torch.Tensor:
    """Logits (N, K) float32 of a uint8 (N, 3, H, W) RGB batch on the network's device:
    (x/255 − mean)/std, encoder, classifier, under `autocast()`."""
    with autocast():
        return net.classifier(net.encoder(normalize(x_u8, mean, std))).float()


STAGE1_SOURCE = "stage1_source.json"  # written by `iccl stage2 --from`: where stage 1 came from


def read_stage1_source(run_dir: Path) -> dict | None:
    """What `iccl stage2 --from` recorded about the run's stage 1 (None for a run that trained its own)."""
    path = Path(run_dir) / STAGE1_SOURCE
    return json.loads(path.read_text()) if path.is_file() else None


def stage1_path(run_dir: Path) -> Path:
    """The run's stage-1 model: its own stage1.pt, or the one `iccl stage2 --from` recorded."""
    source = read_stage1_source(run_dir)
    return Path(source["stage1"]) if source else Path(run_dir) / "stage1.pt"


def resume_target(run_dir: Path) -> Path:
    """What `iccl train --out` resumes a run with: its --seeds folder when it is one seed's run
    (resuming that alone would leave the other seeds and the summary undone), else the run."""
    run_dir = Path(run_dir)
    return run_dir.parent if (run_dir.parent / SEEDS_FILE).is_file() else run_dir


def saved_model_path(run_dir: Path, stage: int = 2) -> Path:
    """final.pt (stage 2, the rebalanced model) or the stage-1 model of a run (`stage1_path`), with
    clear errors when the run directory or the model is missing."""
    run_dir = Path(run_dir)
    if (run_dir / SEEDS_FILE).is_file():
        seeds = json.loads((run_dir / SEEDS_FILE).read_text())["seeds"]
        raise DataError(f"{run_dir}: a --seeds folder, one run per seed; pass one of them, e.g. "
                        f"{run_dir / f'seed-{seeds[0]}'}.")
    if not (run_dir / "config.json").is_file():
        inside = next(itertools.chain(run_dir.glob("*/config.json"), run_dir.glob("*/*/config.json")), None)
        hint = (f"; it holds runs (e.g. {inside.parent}): pass one of them" if inside  # `stage2 --choices`
                else ". Pass the --out of `iccl train`")
        raise DataError(f"{run_dir}: not a run directory (no config.json){hint}.")
    path = run_dir / "final.pt" if stage == 2 else stage1_path(run_dir)
    if not path.is_file():
        raise DataError(f"{path}: missing; stage {stage} of this run has not finished. Resume it with "
                        f"`iccl train --out {resume_target(run_dir)}`.")
    return path


def load_model(run_dir: Path, stage: int = 2) -> tuple[Config, list[str], ICCLNet]:
    """(config, class names, network in eval mode on the CPU) of a run's saved model."""
    path = saved_model_path(run_dir, stage)
    saved = checkpoint.load(path)
    cfg = Config.from_dict(saved["config"])
    classes = list(saved.get("classes") or [str(k) for k in range(saved["num_classes"])])
    net = build_network(cfg.arch, saved["num_classes"], cfg.proj_dim, cfg.proj_hidden)
    net.load_state_dict(saved["net"])
    return cfg, classes, net.eval()
