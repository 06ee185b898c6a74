"""The study of this project's own choices for ICCL on CIFAR-10-LT (README, "Where the full budget
falls short of the paper"): every choice the paper leaves open, measured one at a time against the
presets, at a reduced budget, on a validation split -- never on the test split.

    python3 -m tools.gap_study --source cifar-10-binary.tar.gz --out runs/gap
    python3 -m tools.gap_study --source ... --out runs/gap --arms base,unfused --results results/gap-study

The data: CIFAR-10-LT, R = 100, with a balanced validation split of 200 images per class drawn from
the training images the long-tailed split leaves out (`iccl convert cifar10-lt --val-per-class 200`;
only the head class gives up 200 of its 5,000). Every run evaluates on that split
(`eval_split=val`), so a choice is made without ever reading the test split.

Each arm is one change to the cifar10-lt preset (ICCL, seed 0, 60 + 10 epochs by default, the lr
warm-up kept at 5 epochs): a stage-1 arm trains both stages; a stage-2 arm starts from the base
arm's stage 1 (`iccl stage2 --from`), minutes instead of a retraining. Every run resumes (rerun the
same command); after each finished arm the small result files are written to --results: one JSON
per arm (validation top-1 and many / medium / few after each stage, the settings changed, the wall
time) and summary.json, and the table is printed.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from pipeline.errors import DataError

VAL_PER_CLASS = 200
EPOCHS = 60
# name -> (what it changes, --set overrides; a callable takes the stage-1 epochs E). The stage-2
# arms (prefix "s2-") start from the base arm's stage 1. The arms up to `unfused` ran when the
# presets had one fused forward, and pin it (FUSED) so that a rerun is the run measured; `unfused`
# won (README), the presets took it, and the later arms change one thing of them as they are now,
# to be read against the `unfused` arm.
FUSED = {"fused_forward": "true"}
STAGE1_ARMS: dict[str, tuple[str, dict]] = {
    "base": ("the cifar10-lt preset before this study (one fused forward)", FUSED),
    "ce": ("plain cross-entropy, then cRT (the baseline)", {"method": "ce", **FUSED}),
    "unfused": ("one forward per branch: batch norm never mixes clean and interpolated images "
                "(the presets since)", {"fused_forward": "false"}),
    "keep-wu": ("w_u stays 1 after the warm-up (the CIFAR rule sets it to 0)",
                {"w_u_zero_after_warmup": "false", **FUSED}),
    "tw-quarter": ("T_w a quarter of the epochs instead of half",
                   {"warmup_epochs": lambda e: e // 4, **FUSED}),
    "tw-three-quarters": ("T_w three quarters of the epochs", {"warmup_epochs": lambda e: 3 * e // 4}),
    "lambda-batch": ("one lambda per batch instead of per sample", {"lambda_per": "batch"}),
    "centroid-m0.9": ("centroid momentum 0.9 instead of 0.99", {"centroid_momentum": "0.9"}),
    "tau-0.2": ("centroid temperature tau 0.2 instead of 0.1", {"tau": "0.2"}),
    "bbn-schedule": ("BBN's optimiser: Nesterov, lr decays one epoch earlier",
                     {"nesterov": "true", "lr_steps": lambda e: f"{round(0.6 * e) - 1},{round(0.8 * e) - 1}"}),
}
STAGE2_ARMS: dict[str, tuple[str, dict]] = {
    "s2-frozen": ("stage 2 keeps the encoder frozen (lr 0.1, as the ImageNet recipes)",
                  {"s2_finetune_encoder": "false", "s2_lr": "0.1"}),
    "s2-lr0.001": ("stage-2 lr 0.001 instead of 0.01", {"s2_lr": "0.001"}),
    "s2-lr0.05": ("stage-2 lr 0.05 instead of 0.01", {"s2_lr": "0.05"}),
    "s2-beta0": ("no distillation (beta 0)", {"s2_beta": "0"}),
    "s2-gamma0": ("class-balanced stage 2 (gamma' 0) instead of reverse (1)", {"s2_gamma": "0"}),
    "s2-T2": ("distillation temperature 2 instead of 4", {"s2_temperature": "2"}),
}
# run order: the base, the first suspect the demo data pointed at (w^u after the warm-up), the
# stage-2 variants (minutes each, from the base's stage 1), the second suspect (T_w), the
# baseline, then the other stage-1 arms
_FIRST = ("base", "keep-wu")
_NEXT = ("tw-quarter", "ce")
ORDER = (*_FIRST, *STAGE2_ARMS, *_NEXT, *(a for a in STAGE1_ARMS if a not in _FIRST + _NEXT))


def _values(overrides: dict, epochs: int) -> dict[str, str]:
    """The --set values of an arm at this many stage-1 epochs."""
    return {k: str(v(epochs) if callable(v) else v) for k, v in overrides.items()}


def stage1_configs(arms: tuple[str, ...], epochs: int, seed: int, data: Path) -> dict:
    """arm -> the validated train.config.Config of each stage-1 arm in `arms` (evaluated on "val",
    the lr warm-up kept at 5 epochs). Raises DataError for an unknown arm or a refused setting."""
    from train.config import resolve
    unknown = [a for a in arms if a not in STAGE1_ARMS and a not in STAGE2_ARMS]
    if unknown:
        raise DataError(f"--arms {','.join(unknown)}: choose among {','.join(ORDER)}")
    plans = {}
    for arm in arms:
        if arm in STAGE1_ARMS:
            sets = {"eval_split": "val", "lr_warmup_epochs": "5", **_values(STAGE1_ARMS[arm][1], epochs)}
            method = sets.pop("method", "iccl")
            plans[arm] = resolve("cifar10-lt", method, sets, data=str(Path(data).resolve()), epochs=epochs,
                                 seed=seed)
    return plans


def _short(result: dict | None) -> dict | None:
    return None if result is None else {k: round(result[k], 2) if result.get(k) is not None else None
                                        for k in ("top1", "many", "medium", "few")}


def main(argv: list[str] | None = None) -> int:
    what = {name: w for name, (w, _) in {**STAGE1_ARMS, **STAGE2_ARMS}.items()}
    arms = "\n".join(f"  {name:18} {what[name]}" for name in ORDER)
    p = argparse.ArgumentParser(prog="python3 -m tools.gap_study", description=__doc__,
                                epilog="arms, in the order they run:\n" + arms,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, type=Path, help="the official CIFAR-10 download")
    p.add_argument("--out", required=True, type=Path, help="data and runs (resumable)")
    p.add_argument("--results", type=Path, help="where the small result files go (e.g. results/gap-study)")
    p.add_argument("--arms", help="comma-separated arm names (default all); they run in the order "
                                  "listed below, whatever the order given")
    p.add_argument("--epochs", type=int, default=EPOCHS, help=f"stage-1 epochs (default {EPOCHS})")
    p.add_argument("--seed", type=int, default=0, help="training seed of every arm (default 0)")
    args = p.parse_args(argv)
    try:
        return _run(args)
    except DataError as e:
        print(f"gap_study: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # --out / --results unwritable or full
        print(f"gap_study: {e.filename or ''}: {e.strerror or e}; choose a writable folder with free "
              f"space and rerun.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the training loop has saved where it stopped
        print("gap_study: interrupted; rerun the same command to resume.", file=sys.stderr)
        return 130


def _run(args) -> int:
    from pipeline.atomic import write_json
    from pipeline.convert import convert
    from pipeline.format import META_FILE
    from pipeline.progress import say
    from pipeline.sources.cifar import load_cifar_lt
    from tools.report_table import print_table, results_table
    from train.runner import train
    from train.stage2_from import stage2_run_config

    asked = ORDER if not args.arms else tuple(a.strip() for a in args.arms.split(","))
    arms = tuple(sorted(asked, key=lambda a: ORDER.index(a) if a in ORDER else -1))  # base first
    data = args.out / "data"
    plans = stage1_configs(arms, args.epochs, args.seed, data)  # checked before anything is written
    if not (data / META_FILE).is_file():
        source = load_cifar_lt(args.source, 10, 100, seed=0, val_per_class=VAL_PER_CLASS)  # checked first
        say(f"converting {args.source} to CIFAR-10-LT (R = 100, {VAL_PER_CLASS} validation images per class)")
        convert(source, data)
    summary_path = args.results / "summary.json" if args.results else None
    summary = json.loads(summary_path.read_text()) if summary_path and summary_path.is_file() else {}
    summary.setdefault("arms", {})
    summary.update(dataset="cifar10-lt", imbalance=100, epochs=args.epochs, seed=args.seed,
                   val_per_class=VAL_PER_CLASS, evaluated_on="val")
    for arm in arms:
        t0 = time.monotonic()
        if arm in STAGE1_ARMS:
            what, sets = STAGE1_ARMS[arm]
            say(f"gap study: {arm} ({what})")
            report = train(plans[arm], args.out / arm)
        else:
            what, sets = STAGE2_ARMS[arm]
            if not (args.out / "base" / "final.pt").is_file():
                raise DataError(f"arm {arm} starts from the base arm's stage 1: run --arms base first")
            say(f"gap study: {arm} ({what}), from {args.out / 'base'}")
            cfg, source = stage2_run_config(args.out / "base", sets)
            report = train(cfg, args.out / arm, stage1_source=source)
        entry = {"what": what, "set": _values(sets, args.epochs), "stage1": _short(report.get("stage1")),
                 "stage2": _short(report.get("stage2")), "seconds_this_session": round(time.monotonic() - t0)}
        summary["arms"][arm] = {**summary["arms"].get(arm, {}), **entry}
        if args.results:
            args.results.mkdir(parents=True, exist_ok=True)
            write_json(summary_path, summary)
    rows = {}
    for arm, e in summary["arms"].items():
        if e.get("stage1"):
            rows[f"{arm}: stage 1"] = e["stage1"]
        rows[f"{arm}: stage 2"] = e["stage2"]
    print_table(results_table(rows, f"CIFAR-10-LT R = 100, {args.epochs} + 10 epochs, seed {args.seed}: "
                                    f"validation top-1 %"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
