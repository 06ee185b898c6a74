"""A stage-2 run that starts from another run's stage-1 model (`iccl stage2 --from RUN --out RUN2`).

Nothing big is copied: RUN2 records where its stage 1 came from in `stage1_source.json` (the path
and SHA-256 of RUN/stage1.pt, RUN's stage-1 evaluation) and trains, resumes and evaluates like any
run. Its config is RUN's, with only the stage-2 settings (`STAGE2_FIELDS`), the split stage 2 tunes on
(`val_split`: a converted split that stage 1 never read) and the settings that change speed, not
results, allowed to differ.
"""
from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

from pipeline.errors import DataError
from train import checkpoint
from train.config import SEEDS_FILE, STAGE2_FIELDS, Config, check_known, parse_value, resolve
from train.inference import resume_target, stage1_path
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
                        f"`iccl train --out {resume_target(source_run)}`, then run this again.")
    check_known(overrides)
    values, sha256 = _stage1_facts(str(path), *_stamp(path))
    values = dict(values)  # the cached record stays as read
    # A stage-1 setting may be given only as the run has it (a command reused across runs).
    stage1_only = sorted(k for k, text in overrides.items() if k not in STAGE2_SIDE
                         and k not in RESUMABLE_CHANGES and parse_value(k, text) != values[k])
    if stage1_only:
        raise DataError(f"--set {', '.join(stage1_only)}: fixed by the stage 1 of {source_run}, which this "
                        f"run reuses. Change only {', '.join(STAGE2_SIDE)} here, or train a new run.")
    if overrides.get("val_split") and values["val_fraction"] > 0:
        raise DataError(f"--set val_split={overrides['val_split']}: {source_run} was trained with a carve "
                        f"(val_fraction={values['val_fraction']}), which stays its validation split; drop "
                        f"--set val_split.")
    cfg = resolve(None, None, overrides, base=values, **(explicit or {}))
    report = source_run / "report.json"
    source_report = json.loads(report.read_text()) if report.is_file() else {}
    record = {"run": str(source_run), "stage1": str(path.resolve()), "stage1_sha256": sha256,
              "stage1_eval": source_report.get("stage1"), "stage1_val": source_report.get("stage1_val"),
              "val_split": values["val_split"]}
    return cfg, record


def seed_runs(source: Path) -> list[Path]:
    """The runs a `--choices` stage 2 starts from: `source` itself when it is a run, else its seed-S
    runs by seed. In a `--seeds` folder, the seeds its seeds.json lists, each of which must be there
    (a table over fewer seeds than were trained would pass for the whole); in a folder without the
    list (a method folder of `iccl reproduce`), the seed-S runs it holds. Raises DataError for a
    folder that holds neither, or a listed seed without a run folder."""
    source = Path(source)
    if not source.is_dir():
        raise DataError(f"--from {source}: no such folder; pass the --out of an `iccl train` run.")
    if (source / "config.json").is_file():
        return [source]
    runs = {p.name: p for p in source.glob("seed-*") if (p / "config.json").is_file()}
    if (source / SEEDS_FILE).is_file():
        try:
            listed = [f"seed-{s}" for s in json.loads((source / SEEDS_FILE).read_text())["seeds"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{source / SEEDS_FILE}: unreadable ({e}); it lists the folder's seeds, e.g. "
                            f'{{"seeds": [0, 1, 2]}}: restore it, or pass --from {source}/seed-S for one '
                            f"run.") from None
        missing = [name for name in listed if name not in runs]
        if missing:
            raise DataError(f"{source / missing[0]}: missing; {SEEDS_FILE} lists {', '.join(missing)}. "
                            f"Train {'it' if len(missing) == 1 else 'them'} with `iccl train --out {source}`, "
                            f"then run this again.")
        runs = {name: runs[name] for name in listed}
    if not runs:
        raise DataError(f"--from {source}: not a run directory (no config.json) and no seed-S runs in it; "
                        f"pass the --out of `iccl train` (or of `iccl train --seeds`).")
    return [runs[name] for name in sorted(runs, key=_seed_number)]


def _seed_number(name: str) -> tuple[int, str]:
    """seed-2 before seed-10."""
    tail = name.removeprefix("seed-")
    return (int(tail), "") if tail.isdigit() else (2**63, tail)


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_mtime_ns, st.st_size


@functools.lru_cache(maxsize=16)
def _stage1_facts(path: str, mtime_ns: int, size: int) -> tuple[dict, str]:
    """(the settings saved in a stage-1 checkpoint, its SHA-256), read once per file and version:
    `--choices all` asks for each seed's once per choice, and an ImageNet-size checkpoint takes
    seconds to load and hash."""
    values = Config.from_dict(checkpoint.load(Path(path))["config"]).to_dict()  # also reads older versions
    return values, _sha256(Path(path))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
