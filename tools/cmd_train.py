"""`iccl train`, `iccl eval`, `iccl demo`."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from pipeline.errors import DataError
from pipeline.loaders import LOADER_CHOICES
from train.config import PRESETS, SEEDS_FILE
from train.settings import METHODS

TRAIN_EXAMPLES = """\
examples:
  iccl train --preset cifar10-lt --data data/cifar10-lt-100 --out runs/iccl
  iccl train --preset cifar10-lt --data data/cifar10-lt-100 --out runs/ce --method ce
  iccl train --out runs/iccl                       # resume an interrupted run
  iccl train --preset cifar10-lt --data D --out runs/lws --set stage2=lws   # another stage 2
  iccl stage2 --from runs/iccl --out runs/iccl-lws --set stage2=lws         # ... from an existing stage 1
  iccl train --preset cifar10-lt --data D --out runs/s --seeds 0,1,2   # mean ± std over seeds
  iccl train --out runs/s                          # resume every seed of that folder
  torchrun --nproc_per_node 8 -m tools.cli train --preset imagenet-lt --data D --out runs/in
  iccl train --preset photos --data data/photos --out runs/photos --set pretrained=resnet50.pth
  iccl train --preset photos --data data/photos --out runs/cpu --epochs 10 --set arch=resnet18
      --set image_size=96 --set eval_resize=112          # (one line) sized for a 2-core CPU

Presets carry the paper's recipes (ResNet-32 / ResNeXt-50 / ResNet-50, epochs, schedule, batch,
lr, weight decay, augmentation, T_w, stage 2); `photos` is for your own image folders.
Backbones (--set arch=...): resnet32; torchvision's resnet18/34/50/101/152, resnext50_32x4d,
resnext101_32x8d, resnext101_64x4d, wide_resnet50_2, wide_resnet101_2; or timm:NAME for any timm
model (e.g. timm:convnext_tiny). --set pretrained=FILE loads a local .pth / .safetensors file into
the encoder (never the classifier); nothing is downloaded.
The learning rate scales linearly with --batch-size
(the preset's lr is for its own batch size). Any setting can be changed with --set KEY=VALUE
(repeatable); `iccl train --list-settings` shows them all with their values and what each may be
(add --preset NAME for another preset's values; the default lists synthetic-lt). Every setting is
checked before anything is written: a refused run can be corrected and started again into the
same --out. A setting given both by its flag and by --set (e.g. --batch-size 5 --set batch_size=3)
must say the same thing.
Stage 2 is --set stage2=distill|crt|ncm|tau_norm|lws|logit_adjust|mislas (docs/METHOD.md); the
choices that tune a value need a validation split: --set val_split=val for a dataset converted with
--val-per-class N (nothing held out of training), or a carve of the training split, --set
val_fraction=0.1.
A run directory holds config.json, metrics.jsonl, checkpoints and report.json; pointing
`iccl train` at an existing run resumes it exactly where it stopped. After the final evaluation
it also holds per_class.png, weight_norms.png and curves.png; --set tensorboard=true also writes
the metrics as TensorBoard events in RUN/tensorboard. Then: `iccl predict`, `iccl export`.
"""


def register(sub) -> None:
    p = sub.add_parser("train", help="train ICCL (or the CE baseline) through both stages",
                       description="Train stage 1 (representation) and stage 2 (classifier rebalancing), "
                                   "then evaluate overall and by many / medium / few classes.",
                       epilog=TRAIN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=tuple(PRESETS), metavar="NAME",
                   help=f"{', '.join(PRESETS)} (not needed to resume)")
    p.add_argument("--data", help="dataset folder written by `iccl convert`")
    p.add_argument("--out", type=Path, help="run directory (created, or resumed); required except with "
                                           "--list-settings")
    p.add_argument("--method", choices=METHODS, default=None,
                   help="iccl (default), or ce: plain cross-entropy then cRT, on the same machinery")
    p.add_argument("--epochs", type=int, help="stage-1 epochs; T_w (warmup_epochs), lr_warmup_epochs and "
                                              "lr_steps scale with it unless also given with --set")
    p.add_argument("--batch-size", type=int, help="global batch per stream (all processes together)")
    p.add_argument("--lr", type=float, help="stage-1 learning rate for the preset's batch size")
    p.add_argument("--seed", type=int, help="seed of initialisation, sampling, augmentation (default 0)")
    p.add_argument("--seeds", help="comma-separated seeds (whole numbers >= 0, each once): one run per "
                                   "seed in OUT/seed-S, then mean ± std in OUT/summary.json; replaces "
                                   "--seed. `iccl train --out OUT` resumes them all, `iccl eval --run OUT` "
                                   "evaluates them all")
    p.add_argument("--loader", choices=LOADER_CHOICES,
                   help="data loader. auto: resident when the decoded images fit in memory; else on a "
                        "CPU ffcv when the split has a .beton, dali for images up to 64 px, else "
                        "reference (DALI's CPU resize is slower than the reference on photographs); "
                        "on a GPU dali")
    p.add_argument("--workers", type=int, help="decode threads / worker processes per process (>= 0; "
                                               "0: the reference loader decodes in this process)")
    p.add_argument("--device", help="auto (default), cpu, cuda")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the network")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any setting, e.g. --set warmup_epochs=50 --set lr_steps=60,80")
    p.add_argument("--list-settings", action="store_true",
                   help="print every setting (of --preset, of the run in --out, else of synthetic-lt) "
                        "with what it may be, and exit")
    p.set_defaults(handler=cmd_train)

    e = sub.add_parser("eval", help="evaluate a trained run (overall, many / medium / few)",
                       description="Evaluate the final model of a run (or its stage-1 model) on the "
                                   "evaluation split of its dataset, print the table and redraw the run's "
                                   "per_class.png (from this evaluation), weight_norms.png and curves.png.")
    e.add_argument("--run", required=True, type=Path, help="run directory made by `iccl train`, or a "
                                                           "--seeds folder (then mean ± std over its seeds)")
    e.add_argument("--stage", type=int, choices=(1, 2), default=2, help="2: after rebalancing (default)")
    e.add_argument("--data", help="dataset folder, if it moved since training")
    e.add_argument("--loader", choices=LOADER_CHOICES)
    e.add_argument("--split", help="evaluate on this split of the dataset instead of the run's eval_split "
                                   "(e.g. test, for a run whose choices were made with eval_split=val)")
    e.add_argument("--json", type=Path, help="also write the result (with per-class accuracy) here")
    e.set_defaults(handler=cmd_eval)

    d = sub.add_parser("demo", help="the whole method on built-in synthetic data, in minutes on a CPU",
                       description="Make a small synthetic long-tailed dataset (10 classes, imbalance 100), "
                                   "train ICCL through both stages and print the many / medium / few table. "
                                   "Rerunning resumes; nothing is downloaded.")
    d.add_argument("--out", type=Path, default=Path("runs/demo"), help="where data and run go (runs/demo)")
    d.add_argument("--method", choices=METHODS, default="iccl",
                   help="iccl (default), or ce: plain cross-entropy then cRT, for comparison")
    d.add_argument("--epochs", type=int, help="stage-1 epochs (default: the synthetic-lt preset's)")
    d.add_argument("--seeds", help="comma-separated training seeds, e.g. 0,1,2: one run per seed in "
                                   "OUT/run-METHOD-seeds/seed-S (the data stay those of seed 0), then "
                                   "mean ± std")
    d.set_defaults(handler=cmd_demo)


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise DataError(f"--set {pair}: expected KEY=VALUE")
        k, v = pair.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def parse_seeds(text: str, flag: str = "--seeds") -> list[int]:
    """`0,1,2` -> [0, 1, 2]; DataError for anything else (not whole numbers, negative, repeated)."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise DataError(f"{flag} {text}: expected distinct whole numbers >= 0 separated by commas, "
                        f"e.g. {flag} 0,1,2")
    return seeds


def _resolve(args, seed: int | None = None, list_only: bool = False):
    """The validated config of this command line: a new run's (from --preset), or the saved
    run's in --out with this command's flags and --set applied."""
    from train.config import load_config_json, resolve
    saved = args.out / "config.json" if args.out else None
    explicit = dict(data=str(Path(args.data).resolve()) if args.data else None, epochs=args.epochs,
                    batch_size=args.batch_size, lr=args.lr, seed=seed if seed is not None else args.seed,
                    loader=args.loader, workers=args.workers, device=args.device, compile=args.compile)
    overrides = parse_overrides(args.set)
    if args.preset is None and "preset" not in overrides:
        if saved is not None and saved.is_file():
            return resolve(None, args.method, overrides, base=load_config_json(saved).to_dict(),
                           **explicit)
        if not list_only:
            where = f"{args.out}: no run to resume there; pass" if args.out else "pass"
            raise DataError(f"{where} --preset NAME and --data DIR to start one.")
        args.preset = "synthetic-lt"  # --list-settings alone: the default preset's settings
    return resolve(args.preset, args.method, overrides, **explicit)


def cmd_train(args) -> int:
    from tools.report_table import print_table, results_table
    from train.config import allowed, setting_text
    from train.runner import train
    if args.list_settings:
        cfg = _resolve(args, list_only=True)
        print(f"# preset {cfg.preset}, method {cfg.method}: KEY = VALUE  # what it may be")
        for k, v in cfg.to_dict().items():
            print(f"{k} = {setting_text(v)}" + (f"  # {allowed(k)}" if allowed(k) else ""))
        return 0
    if args.out is None:
        raise DataError("--out DIR is required: the run directory to create (or to resume)")
    if args.seeds or (args.preset is None and (args.out / SEEDS_FILE).is_file()):
        return _train_seeds(args)
    cfg = _resolve(args)
    report = train(cfg, args.out)
    if _is_main():
        print_table(results_table({"stage 1": report["stage1"], "stage 2 (rebalanced)": report["stage2"]},
                                  f"{cfg.method.upper()} on {Path(cfg.data).name}: top-1 %"))
    return 0


# A --seeds folder: OUT/seed-S/ holds one run per seed; OUT/seeds.json the seeds and the options
# they were started with (so `iccl train --out OUT` resumes them all); OUT/summary.json the mean
# and std over the seeds once all are done.
SUMMARY_FILE = "summary.json"
_SEED_OPTIONS = ("preset", "method", "data", "epochs", "batch_size", "lr", "loader", "workers", "device",
                 "compile", "set")
_RESUMABLE_OPTIONS = ("data", "loader", "workers", "device", "compile")


def _train_seeds(args) -> int:
    """One run per seed in OUT/seed-S (started or resumed), then summary.json and the table."""
    from pipeline.atomic import write_json
    from pipeline.progress import say
    from tools.report_table import mean_std_table, print_table
    from train.runner import train
    if args.seeds and (args.seed is not None or "seed" in parse_overrides(args.set)):
        raise DataError("--seeds and --seed (or --set seed=...) both choose the seed; give one.")
    seeds_file = args.out / SEEDS_FILE
    options = {k: getattr(args, k) for k in _SEED_OPTIONS}
    if options["data"]:
        options["data"] = str(Path(options["data"]).resolve())
    if args.preset is None:  # resuming: the options the folder was started with
        if not seeds_file.is_file():
            raise DataError(f"{args.out}: no --seeds folder to resume there (no {SEEDS_FILE}); pass "
                            f"--preset and --data to start one.")
        saved = json.loads(seeds_file.read_text())
        changes = {k: options[k] for k in _RESUMABLE_OPTIONS if options[k] is not None}
        options = {**saved["options"], **changes, "set": saved["options"]["set"] + args.set}
        seeds = saved["seeds"] if not args.seeds else parse_seeds(args.seeds)
    else:
        seeds = parse_seeds(args.seeds)
    runs = []
    for s in seeds:  # every setting is checked before anything is written
        sub = argparse.Namespace(**{**vars(args), **options, "seeds": None, "seed": s,
                                    "out": args.out / f"seed-{s}"})
        runs.append((_resolve(sub, seed=s), sub.out))
    if _is_main():
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(seeds_file, {"seeds": seeds, "options": options})
    reports = []
    for k, (cfg, out) in enumerate(runs):
        say(f"seed {cfg.seed} ({k + 1} of {len(runs)}): {out}")
        reports.append(train(cfg, out))
    if _is_main():
        write_json(args.out / SUMMARY_FILE, seeds_summary(seeds, reports))
        table = {"stage 1": [r["stage1"] for r in reports], "stage 2": [r["stage2"] for r in reports]}
        print_table(mean_std_table(table, f"{args.out}: top-1 % over seeds {','.join(map(str, seeds))}"))
    return 0


def seeds_summary(seeds: list[int], reports: list[dict]) -> dict:
    """summary.json of a --seeds folder: per stage the mean and sample std over the seeds of
    top-1 and many / medium / few (tools.report_table.mean_std), and each seed's numbers."""
    from tools.report_table import COLUMNS, mean_std
    stages = [k for k in ("stage1", "stage2") if all(k in r for r in reports)]
    return {"seeds": seeds, "runs": [f"seed-{s}" for s in seeds],
            **{k: mean_std([r[k] for r in reports]) for k in stages},
            "per_seed": {f"seed-{s}": {k: {c: r[k].get(c) for c in COLUMNS} for k in stages}
                         for s, r in zip(seeds, reports)}}


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def cmd_eval(args) -> int:
    from pipeline.atomic import write_json
    from tools.report_table import print_table, results_table
    from train.runner import evaluate_run
    if (args.run / SEEDS_FILE).is_file():
        return _eval_seeds(args)
    result = evaluate_run(args.run, stage=args.stage, data=args.data, loader=args.loader, split=args.split)
    if _is_main():
        split = f" on {args.split}" if args.split else ""
        print_table(results_table({f"stage {args.stage}": result}, f"{args.run}{split}: top-1 %"))
        if args.json:
            write_json(args.json, result)
    return 0


def _eval_seeds(args) -> int:
    """`iccl eval --run OUT` on a --seeds folder: every seed's run, then mean ± std."""
    from pipeline.atomic import write_json
    from tools.report_table import mean_std, mean_std_table, print_table
    from train.runner import evaluate_run
    seeds = json.loads((args.run / SEEDS_FILE).read_text())["seeds"]
    results = [evaluate_run(args.run / f"seed-{s}", stage=args.stage, data=args.data, loader=args.loader,
                            split=args.split) for s in seeds]
    if _is_main():
        split = f" on {args.split}" if args.split else ""
        print_table(mean_std_table({f"stage {args.stage}": results},
                                   f"{args.run}{split}: top-1 % over seeds {','.join(map(str, seeds))}"))
        if args.json:
            write_json(args.json, {"seeds": seeds, "mean": mean_std(results),
                                   "per_seed": {f"seed-{s}": r for s, r in zip(seeds, results)}})
    return 0


def cmd_demo(args) -> int:
    from pipeline.atomic import output_dir
    from pipeline.convert import convert
    from pipeline.format import META_FILE
    from pipeline.progress import say
    from pipeline.sources.synthetic import make_synthetic_lt
    from tools.report_table import print_table, results_table
    from train.config import resolve
    from train.runner import train
    data = args.out / "data"
    cfg = resolve("synthetic-lt", args.method, data=str(data.resolve()), epochs=args.epochs)
    if args.seeds:
        parse_seeds(args.seeds)  # checked before anything is written
    output_dir(args.out, "--out")  # checked before the data are made
    if not (data / META_FILE).is_file():
        say(f"making the synthetic long-tailed dataset in {data}")
        convert(make_synthetic_lt(), data)
    if args.seeds:  # the seeds folder of `iccl train`, so that train / eval resume and evaluate it
        from tools.cli import build_parser
        argv = ["train", "--preset", "synthetic-lt", "--method", args.method, "--data", str(data),
                "--out", str(args.out / f"run-{args.method}-seeds"), "--seeds", args.seeds]
        if args.epochs is not None:
            argv += ["--epochs", str(args.epochs)]
        return cmd_train(build_parser().parse_args(argv))
    run = args.out / f"run-{args.method}"
    report = train(cfg, run)
    print_table(results_table({"stage 1": report["stage1"], "stage 2 (rebalanced)": report["stage2"]},
                              f"{args.method.upper()} demo ({run}): top-1 %"))
    return 0  # the numbers are in RUN/report.json; `iccl eval --run RUN --json FILE` writes them too
