"""`iccl stage2`: rebalance the classifier of an existing run's stage 1 with any stage-2 choice."""
from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.errors import DataError
from pipeline.loaders import LOADER_CHOICES

EXAMPLES = """\
examples:
  iccl stage2 --from runs/c10-iccl --out runs/c10-iccl-lws --set stage2=lws
  iccl stage2 --from runs/c10-ce   --out runs/c10-ce-ncm   --set stage2=ncm
  iccl stage2 --from runs/c10-iccl --out runs/c10-iccl-la  --set stage2=logit_adjust
  iccl stage2 --from runs/c10-iccl --out runs/c10-iccl-la1 --set stage2=logit_adjust --set s2_logit_adjust_grid=1.0
  iccl stage2 --from runs/c10-iccl --out runs/c10-iccl-lws --set stage2=lws   # again: resumes
  iccl stage2 --from runs/c10-iccl --out runs/c10-iccl-family --choices all --set val_split=val
  iccl stage2 --from runs/seeds --out runs/seeds-family --choices crt,lws     # RUN/seed-S of --seeds

Choices (--set stage2=...):
  distill       the paper's stage 2: CE + distillation from the stage-1 classifier, reverse sampler
  crt           classifier re-training: re-initialised classifier, CE, class-balanced, encoder frozen
  ncm           nearest class mean of the training features (no training)
  tau_norm      w_k / ||w_k||^p, p chosen on the validation split among s2_tau_norm_grid (no training)
  lws           learnable weight scaling: one scale per class trained, class-balanced
  logit_adjust  logits - tau * log(prior), tau chosen among s2_logit_adjust_grid (no training)
  mislas        label-aware smoothing (concave, eps_1 chosen among s2_mislas_eps_head) with LWS

Only stage-2 settings may change (stage2, s2_*, val_split); the stage 1 is the run's, read from its
stage1.pt (nothing is copied: OUT/stage1_source.json records its path and SHA-256). Tuned values
are chosen on a validation split, never the test split: --set val_split=val where the dataset was
converted with --val-per-class N, or the carve of a stage 1 trained with --set val_fraction=0.1
(or give a one-value grid). The result is the model after the last epoch;
`iccl eval --run OUT` evaluates it again.
"""


def register(sub) -> None:
    p = sub.add_parser("stage2", help="another stage 2 (cRT, NCM, tau-norm, LWS, logit adjustment, "
                                      "MiSLAS, distillation) from an existing run's stage 1",
                       description="Start a new run at stage 2 from the stage-1 model of an existing run, "
                                   "with any stage-2 choice, and print the many / medium / few table.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="source", required=True, type=Path,
                   help="run directory whose stage1.pt is used (made by `iccl train`)")
    p.add_argument("--out", required=True, type=Path, help="the new run directory (created, or resumed)")
    p.add_argument("--data", help="dataset folder, if it moved since the stage-1 run")
    p.add_argument("--loader", choices=LOADER_CHOICES)
    p.add_argument("--workers", type=int, help="decode threads / worker processes per process")
    p.add_argument("--device", help="auto (default), cpu, cuda")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a stage-2 setting, e.g. --set stage2=lws --set s2_epochs=10")
    p.add_argument("--choices", help="comma-separated stage-2 choices, or 'all': one run per choice in "
                                     "OUT/CHOICE (OUT/CHOICE/seed-S when --from holds the seed-S runs of "
                                     "`iccl train --seeds`), then one table (mean ± std over seeds)")
    p.set_defaults(handler=cmd_stage2)


def cmd_stage2(args) -> int:
    from tools.cmd_train import _is_main, parse_overrides
    from tools.report_table import mean_std_table, print_table, results_table
    from train.config import STAGE2_CHOICES
    from train.runner import train
    from train.stage2_from import stage2_run_config
    explicit = dict(data=str(Path(args.data).resolve()) if args.data else None, loader=args.loader,
                    workers=args.workers, device=args.device)
    overrides = parse_overrides(args.set)
    if not args.choices:
        if args.out.resolve() == args.source.resolve():
            raise DataError(f"--out {args.out} is the --from run itself; choose a new directory")
        cfg, source = stage2_run_config(args.source, overrides, explicit)
        report = train(cfg, args.out, stage1_source=source)
        if _is_main():
            rows = {"stage 1 (" + str(args.source) + ")": report["stage1"]} if report.get("stage1") else {}
            rows["stage 2 " + cfg.stage2 + chosen_values(cfg, [report])] = report["stage2"]
            print_table(results_table(rows, f"{cfg.stage2} from {args.source}: top-1 %"))
        return 0
    if "stage2" in overrides:
        raise DataError("--choices and --set stage2=... both choose the stage 2; give one of them")
    if (args.out / "config.json").is_file():
        raise DataError(f"--out {args.out}: holds a run; --choices writes one run per choice in "
                        f"OUT/CHOICE, so choose a new folder (or the --out of an earlier --choices).")
    choices = STAGE2_CHOICES if args.choices == "all" else tuple(c.strip() for c in args.choices.split(","))
    bad = [c for c in choices if c not in STAGE2_CHOICES]
    if bad:
        raise DataError(f"--choices {','.join(bad)}: choose among {', '.join(STAGE2_CHOICES)} or 'all'")
    seeds = sorted(p for p in args.source.glob("seed-*") if (p / "stage1.pt").is_file())
    sources = seeds if seeds and not (args.source / "stage1.pt").is_file() else [args.source]
    # Every configuration is checked before anything trains: a refusal costs nothing.
    plans = [(c, src, *stage2_run_config(src, {**overrides, "stage2": c}, explicit))
             for c in choices for src in sources]
    rows = {"stage 1": [source["stage1_eval"] for _, _, _, source in plans[:len(sources)]
                        if source["stage1_eval"]]}
    reports = {}
    for choice, src, cfg, source in plans:
        out = args.out / choice / (src.name if len(sources) > 1 else "")
        reports.setdefault(choice, (cfg, []))[1].append(train(cfg, out, stage1_source=source))
    for choice, (cfg, runs) in reports.items():
        rows[choice + chosen_values(cfg, runs)] = [r["stage2"] for r in runs]
    if _is_main():
        print_table(mean_std_table(rows, f"stage-2 choices from {args.source}: top-1 %"))
    return 0


def chosen_values(cfg, reports: list[dict]) -> str:
    """' (tau = 1.0, 1.25, 1.0 chosen on val)': a tuned choice's value in each run, and where it was
    chosen; '' for a choice that tunes nothing."""
    from train.runner import tuned_on_val
    values = [r.get("stage2_choice", {}).get("chosen") or {} for r in reports]
    if not any(values):
        return ""
    name = next(iter(values[0]))
    where = ("given" if not tuned_on_val(cfg) else f"chosen on {cfg.val_split}" if cfg.val_split
             else f"chosen on the carve val_fraction={cfg.val_fraction}")
    return f" ({name} = {', '.join(str(v.get(name)) for v in values)} {where})"
