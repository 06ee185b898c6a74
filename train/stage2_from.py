"""A stage-2 run that starts from another run's stage-1 model (`iccl stage2 --from RUN --out RUN2`).

Nothing big is copied: RUN2 records where its stage 1 came from in `stage1_source.json` (the path
and SHA-256 of RUN/stage1.pt, RUN's stage-1 evaluation) and trains, resumes and evaluates like any
run. Its config is RUN's, with only the stage-2 settings (`STAGE2_FIELDS`), the split stage 2 tunes on
(`val_split`: a converted split that stage 1 never read) and the settings that change speed, not
results, allowed to differ.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pipeline.errors import DataError
from train import checkpoint
from train.config import SEEDS_FILE, STAGE2_FIELDS, Config, check_known, resolve
from train.inference import stage1_path
from train.runner import RESUMABLE_CHANGES

# What a stage 2 from an existing stage 1 may set: its own settings, and the converted split it
# tunes on (stage 1 never reads val_split; a carve, val_fraction, changed stage 1's images and stays).
STAGE2_SIDE = (*STAGE2_FIELDS, "val_split")


def stage2_run_config(source_run: Path, overrides: dict[str, str],
                      explicit: dict | None = None) -> tuple[Config, dict]:
    """(the new run's config, its stage-1 source record). `overrides` are `--set` strings,
    `explicit` typed speed settings (data, loader, workers, device). Raises DataError when RUN has no
    finished stage 1 or an override would change stage 1."""
    source_run = Path(source_run).resolve()
    if not source_run.is_dir():
        raise DataError(f"--from {source_run}: no such folder; pass the --out of an `iccl train` run.")
    if (source_run / SEEDS_FILE).is_file():
        raise DataError(f"--from {source_run}: a --seeds folder; pass --choices CHOICE for one stage 2 per "
                        f"seed, or --from {source_run}/seed-S for one of its runs.")
    if not (source_run / "config.json").is_file():
        raise DataError(f"--from {source_run}: not a run directory (no config.json); pass the --out of an "
                        f"`iccl train` run.")
    path = stage1_path(source_run)
    if not path.is_file():
        raise DataError(f"{path}: missing; the stage 1 of {source_run} has not finished. Resume it with "
                        f"`iccl train --out {source_run}`, then run this again.")
    check_known(overrides)
    stage1_only = sorted(k for k in overrides if k not in STAGE2_SIDE and k not in RESUMABLE_CHANGES)
    if stage1_only:
        raise DataError(f"--set {', '.join(stage1_only)}: fixed by the stage 1 of {source_run}, which this "
                        f"run reuses. Change only {', '.join(STAGE2_SIDE)} here, or train a new run.")
    saved = checkpoint.load(path)
    values = Config.from_dict(saved["config"]).to_dict()  # also reads configs of older versions
    if overrides.get("val_split") and values["val_fraction"] > 0:
        raise DataError(f"--set val_split={overrides['val_split']}: {source_run} was trained with a carve "
                        f"(val_fraction={values['val_fraction']}), which stays its validation split; drop "
                        f"--set val_split.")
    cfg = resolve(None, None, overrides, base=values, **(explicit or {}))
    report = source_run / "report.json"
    source_report = json.loads(report.read_text()) if report.is_file() else {}
    record = {"run": str(source_run), "stage1": str(path.resolve()), "stage1_sha256": _sha256(path),
              "stage1_eval": source_report.get("stage1"), "stage1_val": source_report.get("stage1_val"),
              "val_split": values["val_split"]}
    return cfg, record


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
