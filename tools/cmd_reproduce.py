"""`iccl reproduce`: the paper's CIFAR-LT comparison (CE, cRT, ICCL) in one resumable command."""
from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.errors import DataError
from pipeline.loaders import LOADER_CHOICES

# Top-1 % after classifier rebalancing, from the paper (arXiv 2110.10048; docs/METHOD.md): (ICCL, CE, cRT).
PAPER = {
    "cifar10-lt": {100: (82.1, 70.4, 75.7), 50: (84.7, 74.8, 80.4), 10: (89.7, 86.4, 88.3)},
    "cifar100-lt": {100: (46.6, 38.3, 42.3), 50: (51.6, 43.9, 46.8), 10: (62.1, 55.7, 58.1)},
}
REDUCED_EPOCHS = 60

DESCRIPTION = f"""\
Convert CIFAR-10/100 to its long-tailed version, then train CE (whose stage 2 is cRT) and ICCL
(both stages) with the same seed, schedule shape and evaluation, and print one table: CE, cRT,
ICCL, by many / medium / few, beside the paper's numbers. Everything lands in --out and every
part resumes: rerun the same command after an interruption.

The default is the reduced budget that fits a 2-core CPU in 40-60 minutes per seed (the lower end on
CPUs with native bf16): {REDUCED_EPOCHS} stage-1 epochs (T_w = 30, lr x0.01 at 36 and 48, 5 warm-up
epochs), 10 stage-2 epochs. --full runs the paper's recipe (200 epochs, T_w = 100, steps at 120
and 160): a GPU job."""


def register(sub) -> None:
    p = sub.add_parser("reproduce", help="CE vs cRT vs ICCL on CIFAR-10/100-LT, as in the paper",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example:\n  iccl reproduce cifar10-lt --source cifar-10-binary.tar.gz "
                              "--imbalance 100 --out runs/reproduce")
    p.add_argument("dataset", choices=sorted(PAPER), help="cifar10-lt or cifar100-lt")
    p.add_argument("--source", required=True, type=Path,
                   help="the official CIFAR download (python or binary version, .tar.gz or folder)")
    p.add_argument("--imbalance", type=float, default=100.0, help="imbalance ratio R (100, 50, 10, ...)")
    p.add_argument("--out", type=Path, help="where data, runs and summary.json go "
                                            "(default runs/reproduce-DATASET-R)")
    p.add_argument("--full", action="store_true", help="the paper's 200-epoch recipe (a GPU job)")
    p.add_argument("--epochs", type=int, help=f"stage-1 epochs (default {REDUCED_EPOCHS}; 200 with --full)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds; several give mean ± std")
    p.add_argument("--methods", default="ce,iccl", help="which of ce,iccl to run (default both)")
    p.add_argument("--device", default="auto")
    p.add_argument("--loader", default="auto", choices=LOADER_CHOICES)
    p.add_argument("--val-per-class", type=int, default=0, metavar="N",
                   help="also convert a balanced validation split of N images per class, drawn from the "
                        "training images the long-tailed subset leaves out (a class with fewer left out "
                        "gives up its own: at R = 100 on CIFAR-10, the head class), and report each stage on it; `iccl stage2 --from RUN` then tunes "
                        "τ-norm, logit adjustment and MiSLAS on it. The tables stay on the test split.")
    p.set_defaults(handler=cmd_reproduce)


def cmd_reproduce(args) -> int:
    from pipeline.atomic import write_json
    from pipeline.convert import convert
    from pipeline.format import META_FILE
    from pipeline.progress import say
    from pipeline.sources.cifar import load_cifar_lt
    from tools.report_table import mean_std, mean_std_table, print_table
    from train.config import resolve
    from train.runner import train

    from tools.cmd_train import parse_seeds
    from train.settings import METHODS

    ratio = int(args.imbalance) if args.imbalance == int(args.imbalance) else args.imbalance
    out = args.out or Path(f"runs/reproduce-{args.dataset}-{ratio}")
    data = out / "data"
    epochs = args.epochs or (None if args.full else REDUCED_EPOCHS)
    seeds = parse_seeds(args.seeds)
    if args.val_per_class < 0:
        raise DataError(f"--val-per-class {args.val_per_class}: must be 0 (no validation split) or more.")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods or set(methods) - set(METHODS):
        raise DataError(f"--methods {args.methods}: choose from {','.join(METHODS)}")
    # Every run's settings are checked before the conversion and the first run start.
    # The reduced budget keeps the recipe's 5 lr warm-up epochs (`--epochs` alone would scale them).
    reduced = {"lr_warmup_epochs": 5} if epochs == REDUCED_EPOCHS and not args.epochs else {}
    val = {"val_split": "val"} if args.val_per_class > 0 else {}
    configs = {(method, seed): _resumed(out / method / f"seed-{seed}", resolve(
                   args.dataset, method, data=str(data.resolve()), epochs=epochs, seed=seed,
                   device=args.device, loader=args.loader, **reduced, **val))
               for method in methods for seed in seeds}
    if (data / META_FILE).is_file():
        _check_data(data, args)
    else:
        say(f"converting {args.source} to {args.dataset} at ratio {ratio} in {data}")
        convert(load_cifar_lt(args.source, 10 if args.dataset == "cifar10-lt" else 100,
                              args.imbalance, seed=0, val_per_class=args.val_per_class), data)
    reports: dict[str, list[dict]] = {m: [] for m in methods}
    for (method, seed), cfg in configs.items():
        say(f"{method} seed {seed}: {cfg.epochs} + {cfg.s2_epochs} epochs -> {out / method / f'seed-{seed}'}")
        reports[method].append(train(cfg, out / method / f"seed-{seed}"))
    rows = {}
    if "ce" in reports:
        rows["CE"] = [r["stage1"] for r in reports["ce"]]
        rows["cRT"] = [r["stage2"] for r in reports["ce"]]
    if "iccl" in reports:
        rows["ICCL (stage 1)"] = [r["stage1"] for r in reports["iccl"]]
        rows["ICCL"] = [r["stage2"] for r in reports["iccl"]]
    paper = dict(zip(("ICCL", "CE", "cRT"), PAPER[args.dataset].get(ratio, (None,) * 3)))
    summary = {"dataset": args.dataset, "imbalance": ratio, "val_per_class": args.val_per_class,
               "epochs": epochs or 200, "seeds": seeds,
               "rows": {k: mean_std(v) for k, v in rows.items()}, "paper_top1": paper,
               "train_seconds": {m: [r.get("train_seconds_this_session") for r in rs] for m, rs in reports.items()}}
    write_json(out / "summary.json", summary)
    print_table(mean_std_table(rows, f"{args.dataset}, ratio {ratio}, {summary['epochs']} epochs: top-1 % "
                                     f"(paper: ICCL {paper['ICCL']}, CE {paper['CE']}, cRT {paper['cRT']})"))
    return 0


def _check_data(data: Path, args) -> None:
    """The data an earlier run of this command converted must be what this one asks for."""
    from pipeline.format import read_meta
    source = read_meta(data).get("source", {})
    have = (source.get("imbalance"), source.get("val_per_class", 0))
    if have != (args.imbalance, args.val_per_class):
        raise DataError(f"{data} holds {args.dataset} at ratio {have[0]} with --val-per-class {have[1]}, "
                        f"not ratio {args.imbalance} with --val-per-class {args.val_per_class}: rerun with "
                        f"the options it was converted with, or choose another --out.")


def _resumed(run: Path, cfg):
    """A run folder that exists resumes with the settings it started with, even where a later
    version's presets differ (e.g. the CIFAR presets' fused_forward): only what this command asks
    for (method, seed, epochs) must match, and the machine-side settings are taken as given now."""
    from dataclasses import replace

    from train.config import load_config_json
    if not (run / "config.json").is_file():
        return cfg
    old = load_config_json(run / "config.json")
    for key in ("method", "seed", "epochs"):
        if getattr(old, key) != getattr(cfg, key):
            raise DataError(f"{run} holds a run with {key} {getattr(old, key)}, not {getattr(cfg, key)}: "
                            f"rerun with the options it was started with, or choose another --out.")
    return replace(old, data=cfg.data, device=cfg.device, loader=cfg.loader)
