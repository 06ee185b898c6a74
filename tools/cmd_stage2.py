"""`iccl stage2`: rebalance the classifier of an existing run's stage 1 with any stage-2 choice."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline.errors import DataError
from pipeline.loaders import LOADER_CHOICES

# What `--choices` writes beside OUT/CHOICE: the table (mean ± std over the runs) and the value
# each tuned choice chose in each run.
FAMILY_SUMMARY = "summary.json"

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
are chosen on a validation split, never the test split: --set val_split=val where the dataset has
a split named val (`iccl convert --val-per-class N` writes one, the demo data has one), or the carve
of a stage 1 trained with --set val_fraction=0.1 (or give a one-value grid). A stage-1 setting may be
given only as the run has it. The result is the model after the last epoch;
`iccl eval --run OUT` evaluates it again.
"""


def register(sub) -> None:
    p = sub.add_parser("stage2", help="another stage 2 (cRT, NCM, tau-norm, LWS, logit adjustment, "
                                      "MiSLAS, distillation) from an existing run's stage 1",
                       description="Start a new run at stage 2 from the stage-1 model of an existing run, "
                                   "with any stage-2 choice, and print the many / medium / few table.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="source", required=True, type=Path,
                   help="run directory whose stage1.pt is used (made by `iccl train`); with --choices, "
                        "also a folder of seed-S runs (`iccl train --seeds`, `iccl reproduce`)")
    p.add_argument("--out", required=True, type=Path,
                   help="the new run directory (created, or resumed); with --choices, the folder of "
                        "OUT/CHOICE runs and OUT/summary.json. Never inside --from")
    p.add_argument("--data", help="dataset folder, if it moved since the stage-1 run")
    p.add_argument("--loader", choices=LOADER_CHOICES)
    p.add_argument("--workers", type=int, help="decode threads / worker processes per process")
    p.add_argument("--device", help="auto (default), cpu, cuda")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a stage-2 setting, e.g. --set stage2=lws --set s2_epochs=10")
    p.add_argument("--choices", help="comma-separated stage-2 choices, or 'all': one run per choice in "
                                     "OUT/CHOICE (OUT/CHOICE/seed-S when --from holds seed-S runs, e.g. of "
                                     "`iccl train --seeds`; every seed's stage 1 must have finished), then one "
                                     "table (mean ± std over seeds), also written to OUT/summary.json with "
                                     "each run's tuned value")
    p.set_defaults(handler=cmd_stage2)


def cmd_stage2(args) -> int:
    from pipeline.atomic import write_json
    from tools.cmd_train import _is_main, parse_overrides
    from tools.report_table import mean_std, mean_std_table, print_table, results_table
    from train.config import STAGE2_CHOICES
    from train.runner import train
    from train.stage2_from import seed_runs, stage2_run_config
    explicit = dict(data=str(Path(args.data).resolve()) if args.data else None, loader=args.loader,
                    workers=args.workers, device=args.device)
    overrides = parse_overrides(args.set)
    _check_apart(args.out, args.source)
    if args.choices is None:
        cfg, source = stage2_run_config(args.source, overrides, explicit)
        report = train(cfg, args.out, stage1_source=source)
        if _is_main():
            rows = {"stage 1 (" + str(args.source) + ")": report["stage1"]} if report.get("stage1") else {}
            rows["stage 2 " + cfg.stage2 + chosen_values(cfg, [report], [args.source.name])] = report["stage2"]
            print_table(results_table(rows, f"{cfg.stage2} from {args.source}: top-1 %"))
        return 0
    if "stage2" in overrides:
        raise DataError("--choices and --set stage2=... both choose the stage 2; give one of them")
    choices = _choices(args.choices, STAGE2_CHOICES)
    sources = seed_runs(args.source)
    per_seed = sources != [args.source]  # a folder of seed-S runs: OUT/CHOICE/seed-S, even for one seed
    _check_family_out(args.out, args.source, STAGE2_CHOICES, per_seed)
    # Every configuration is checked before anything trains, and all their refusals are said at once.
    plans, problems = [], []
    for choice in choices:
        for src in sources:
            try:
                plans.append((choice, src, *stage2_run_config(src, {**overrides, "stage2": choice}, explicit)))
            except DataError as e:
                problems += [str(e)] if str(e) not in problems else []
    if problems:
        raise DataError(" ".join(problems))
    reports = {}
    for choice, src, cfg, source in plans:
        out = args.out / choice / (src.name if per_seed else "")
        reports.setdefault(choice, (cfg, []))[1].append(train(cfg, out, stage1_source=source))
    names = [src.name for src in sources]
    stage1 = [source["stage1_eval"] for _, _, _, source in plans[:len(sources)] if source["stage1_eval"]]
    rows = {"stage 1": stage1}
    summary = _earlier_summary(args.out, args.source, names)
    summary["stage1"] = {**mean_std(stage1), "n": len(stage1)} if stage1 else None
    for choice, (cfg, runs) in reports.items():
        rows[choice + chosen_values(cfg, runs, names)] = [r["stage2"] for r in runs]
        summary["stage2"][choice] = {**mean_std([r["stage2"] for r in runs]), "n": len(runs)}
        chosen = [r.get("stage2_choice", {}).get("chosen") for r in runs]
        if any(chosen):
            summary["chosen"][choice] = dict(zip(names, chosen))
    if _is_main():
        write_json(args.out / FAMILY_SUMMARY, summary)
        print_table(mean_std_table(rows, f"stage-2 choices from {args.source}: top-1 %"))
    return 0


def _choices(text: str, known: tuple[str, ...]) -> tuple[str, ...]:
    """--choices as a tuple; DataError for none, an unknown or a repeated choice."""
    choices = known if text == "all" else tuple(c.strip() for c in text.split(",") if c.strip())
    bad = [c for c in choices if c not in known]
    if bad or not choices:
        raise DataError(f"--choices {','.join(bad) or repr(text)}: choose among {', '.join(known)} or 'all'")
    twice = sorted({c for c in choices if choices.count(c) > 1})
    if twice:
        raise DataError(f"--choices {text}: {', '.join(twice)} given twice; name each choice once")
    return choices


def _check_apart(out: Path, source: Path) -> None:
    """--out and --from are separate folders: neither is, or holds, the other."""
    o, s = out.resolve(), source.resolve()
    if o == s or s in o.parents or o in s.parents:
        where = "is" if o == s else "is inside" if s in o.parents else "holds"
        raise DataError(f"--out {out} {where} --from {source}; the new runs go in a folder of their own, "
                        f"e.g. --out {s.parent / (s.name + '-stage2')}")


def _check_family_out(out: Path, source: Path, known: tuple[str, ...], per_seed: bool) -> None:
    """--out of `--choices`: a new folder, or the --out of an earlier `--choices` from the same
    --from (it holds only CHOICE folders, laid out the same way, and the summary); never a run or a
    file."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: a file; choose a folder")
    if (out / "config.json").is_file():
        raise DataError(f"--out {out}: holds a run; --choices writes one run per choice in OUT/CHOICE, so "
                        f"choose a new folder (or the --out of an earlier --choices).")
    if not out.is_dir():
        return
    ours = (*known, FAMILY_SUMMARY)
    other = sorted(p.name for p in out.glob("*") if p.name not in ours and not p.name.startswith("."))
    if other:
        listed = ", ".join(other[:3]) + (", ..." if len(other) > 3 else "")
        raise DataError(f"--out {out}: holds other files ({listed}); "
                        f"--choices writes one run per choice in OUT/CHOICE, so choose a new folder (or the "
                        f"--out of an earlier --choices).")
    summary = out / FAMILY_SUMMARY
    before = json.loads(summary.read_text()).get("from") if summary.is_file() else None
    if before and Path(before) != source.resolve():
        raise DataError(f"--out {out}: holds the stage-2 choices of --from {before}; choose a new folder "
                        f"for those of {source}.")
    for choice in known:
        run_here = (out / choice / "config.json").is_file()
        seeds_here = any((out / choice).glob("seed-*"))
        if (per_seed and run_here) or (not per_seed and seeds_here):
            raise DataError(f"--out {out}: {out / choice} holds {'one run' if run_here else 'seed-S runs'}, "
                            f"made from a {'single run' if run_here else 'folder of seeds'}; --from {source} "
                            f"is {'a folder of seeds' if per_seed else 'a single run'}: choose a new folder.")


def _earlier_summary(out: Path, source: Path, names: list[str]) -> dict:
    """The summary an earlier `--choices` into `out` wrote, when it covered the same runs (its
    other choices stay in the table), else a new one."""
    path = out / FAMILY_SUMMARY
    summary = json.loads(path.read_text()) if path.is_file() else {}
    if summary.get("runs") != names:
        summary = {}
    return {"from": str(source.resolve()), "runs": names, "stage1": None,
            "stage2": summary.get("stage2", {}), "chosen": summary.get("chosen", {})}


def chosen_values(cfg, reports: list[dict], runs: list[str]) -> str:
    """' (tau = 1.25 chosen on val)', or with several runs (named by `runs`, e.g. seed-0)
    ' (tau chosen on val: seed-0 1.0, seed-1 1.25)': a tuned choice's value in each run and where it
    was chosen; '' for a choice that tunes nothing."""
    from train.runner import tuned_on_val
    values = [(r.get("stage2_choice", {}).get("chosen") or {}) for r in reports]
    if not any(values):
        return ""
    name = next(iter(values[0]))
    where = ("given" if not tuned_on_val(cfg) else f"chosen on {cfg.val_split}" if cfg.val_split
             else f"chosen on the carve val_fraction={cfg.val_fraction}")
    each = [v.get(name) for v in values]
    if len(set(each)) == 1:
        return f" ({name} = {each[0]} {where}{', every seed' if len(each) > 1 and where != 'given' else ''})"
    return f" ({name} {where}: {', '.join(f'{run} {v}' for run, v in zip(runs, each))})"
