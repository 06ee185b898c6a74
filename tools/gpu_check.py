"""Run every GPU-only code path once on a CUDA machine, then the benchmarks and the CIFAR-10-LT
recipe, within one time limit; print one table.

    python3 tools/gpu_check.py --quick                  # ~8 minutes on one H200
    python3 tools/gpu_check.py --quick --cifar-source cifar-10-python.tar.gz
    python3 tools/gpu_check.py --quick --cifar-source cifar-10-python.tar.gz --cifar-data data/cifar10-lt-100
    python3 tools/gpu_check.py --dry-run --quick        # the plan and its time budget; no GPU needed

In order, each step reporting ok / FAIL / timeout / skipped with its detail instead of stopping:
  1. bench data: ImageNet-size JPEGs and CIFAR-size PNGs (tools/bench_data.py), in --work, made
     of the CIFAR-10 test images of --cifar-source (of smooth-noise tiles without it);
  2. the GPU paths: DALI decoding on the GPU ("mixed") through our loader; bf16 autocast of a
     ResNet-50 step (loss within 2% of fp32); channels_last (same logits as NCHW, TF32 off, so
     the comparison is fp32 against fp32); torch.compile of the fused step (static shapes, same
     loss as eager); NCCL all-reduce and the centroid gather with every visible GPU (with one
     GPU that is one rank, and the row says it proves nothing about communication);
  3. `iccl bench pipeline` on the ImageNet-size JPEGs (every loader, two streams of 128);
  4. `iccl bench train` for ResNet-32 (cifar10-lt recipe, 32 px) and ResNet-50 (inat2018 recipe,
     224 px, compiled): naive / fused / end-to-end;
  5. with the time left: the full CIFAR-10-LT ICCL recipe (200 + 10 epochs, resident loader) on
     CIFAR-10-LT (R = 100): --cifar-data as it is, else converted from --cifar-source, else
     synthetic data of the same shape (10 classes, 5,000 down to 50 training images of 32 px; its accuracy is not
     comparable to the paper's); its wall time and accuracy.
Steps 3-5 run as `iccl` subprocesses. The time limit (--time-limit, default 480 s with --quick,
1,800 s without) bounds the whole run: each step gets at most its share and what is left; a step
cut off is reported as timeout, the ones after it as skipped. Everything (the table as
gpu-check.md, gpu-check.json, each step's log and JSON report, the recipe's run directory) goes
to --out: $OUT when that variable is set, else a temporary folder.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runnable from a plain checkout

import torch  # noqa: E402

from pipeline.cpus import usable_cpus  # noqa: E402
from tools.gpu_paths import bf16_autocast, channels_last, compiled_step, dali_mixed, nccl  # noqa: E402

DEFAULT_LIMIT_S = {True: 480, False: 1800}  # --quick, full
END_MARGIN_S = 10  # kept back for the table and the files after the last step
MIN_STEP_S = 20  # a step is not started with less time than this left


@dataclass
class Row:
    check: str
    status: str  # ok | FAIL | timeout | skipped
    detail: str
    seconds: float = 0.0


@dataclass
class Step:
    """One line of the table: `run` (in this process) or `commands` (`iccl` subprocesses, whose
    JSON reports `summarise` turns into the detail), with at most `share_s` seconds."""
    name: str
    share_s: float
    run: Optional[Callable[[], str]] = None
    commands: list[list[str]] = field(default_factory=list)  # run in turn, sharing the time
    summarise: Optional[Callable[[], str]] = None


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="sizes that fit ~8 minutes on one H200")
    ap.add_argument("--time-limit", type=float, metavar="S",
                    help="seconds for the whole run (default 480 with --quick, 1800 without)")
    ap.add_argument("--out", type=Path, metavar="DIR",
                    help="results: the table, JSON, logs, the recipe's run "
                         "(default $OUT, else a temp folder)")
    ap.add_argument("--work", type=Path, metavar="DIR",
                    help="generated and converted data (default: a temp folder)")
    ap.add_argument("--cifar-source", type=Path, metavar="PATH",
                    help="the CIFAR-10 download (as `iccl convert cifar10-lt --source` takes): its "
                         "test images tile the bench pictures (smooth noise without it), and the "
                         "recipe's data is converted from it unless --cifar-data is given")
    ap.add_argument("--cifar-data", type=Path, metavar="DIR",
                    help="CIFAR-10-LT (R = 100) already converted by `iccl convert cifar10-lt`: the "
                         "recipe trains on it as it is. Without it and --cifar-source the recipe "
                         "runs on synthetic data of the same shape")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit (no GPU needed)")
    args = ap.parse_args(argv)
    if args.cifar_data and not (args.cifar_data / "meta.json").is_file():
        ap.error(f"--cifar-data {args.cifar_data}: no meta.json there; give the --out folder of "
                 f"`iccl convert cifar10-lt`")
    if args.time_limit is None:
        args.time_limit = DEFAULT_LIMIT_S[args.quick]
    if args.time_limit <= END_MARGIN_S + MIN_STEP_S:
        ap.error(f"--time-limit {args.time_limit:g}: give at least {END_MARGIN_S + MIN_STEP_S + 1} seconds")
    if args.out is None:
        default = Path(tempfile.gettempdir()) / "iccl-gpu-check"
        args.out = Path(os.environ["OUT"]) if os.environ.get("OUT") else default
    if args.work is None:
        args.work = Path(tempfile.gettempdir()) / "iccl-gpu-check-data"
    for name in ("out", "work", "cifar_source", "cifar_data"):  # the subprocesses run in ROOT
        if getattr(args, name) is not None:
            setattr(args, name, getattr(args, name).resolve())
    return args


def _iccl(*args: str) -> list[str]:
    return [sys.executable, "-m", "tools.cli", "-q", *args]


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def plan(args: argparse.Namespace) -> list[Step]:
    """The steps of this run, in order (module docstring)."""
    quick, out, work = args.quick, args.out, args.work
    # Enough pictures that warm-up and timed steps (256 per stream for ResNet-50: 5 + 10 steps,
    # or 5 + 30) stay inside one epoch: at an epoch end the loader's prefetch queue drains and
    # refills, which short epochs count again and again (the first H200 run's 1,000 pictures made
    # an epoch of 3 steps).
    n_photos = 5000 if quick else 10000
    photos, tiny = work / f"photos-{n_photos}", work / "cifar-size"
    steps = 10 if quick else 30

    def cap(quick_s: float, full_s: float) -> float:
        """A step's most seconds: the quick caps (all but the recipe's) sum to 425 s, within
        the 470 s a 480 s limit leaves, so the recipe always gets what the others leave."""
        return quick_s if quick else full_s

    def data() -> str:
        from tools.bench_data import make_bench_data
        make_bench_data(photos, images=n_photos, workers=usable_cpus(),
                        tiles_from=args.cifar_source)
        make_bench_data(tiny, images=10000, tiny=True, workers=usable_cpus(), tiles_from=args.cifar_source)
        return f"{photos} (ImageNet-size JPEG), {tiny} (32-px PNG)"

    def pipeline_summary() -> str:
        r = _read_json(out / "bench-pipeline.json")
        rows = [f"{x['loader']} {x['images_per_s']:,.0f}/s" for x in r["results"] if x["images_per_s"]]
        return "; ".join(rows) + f"; decode-only ceiling (CPU) {r['decode_ceiling_images_per_s']:,.0f}/s"

    def train_summary(name: str) -> Callable[[], str]:
        def summary() -> str:
            r = _read_json(out / f"bench-train-{name}.json")
            return "; ".join(f"{x['variant']} {x['images_per_s']:,.0f}/s (x{x['ratio_to_naive']:.2f})"
                             for x in r["results"]) + f"; {r['autocast']}, compile={r['compile']}"
        return summary

    recipe_data, run = work / "cifar10-lt-100", out / "recipe-cifar10-lt-iccl"
    real_data = bool(args.cifar_source or args.cifar_data)
    if args.cifar_data:
        recipe_data, convert = args.cifar_data, None
    elif args.cifar_source:
        convert = ["convert", "cifar10-lt", "--source", str(args.cifar_source), "--imbalance", "100"]
    else:
        recipe_data = work / "synthetic-cifar10-lt-shape"
        convert = ["convert", "synthetic-lt", "--classes", "10", "--imbalance", "100",
                   "--max-per-class", "5000", "--test-per-class", "1000"]
    recipe = [_iccl(*convert, "--out", str(recipe_data))] if convert else []
    recipe += [_iccl("train", "--preset", "cifar10-lt", "--data", str(recipe_data), "--out", str(run),
                    "--loader", "resident")]
    return [
        Step("bench data", cap(90, 240), run=data),
        Step("DALI mixed decode", cap(20, 60), run=lambda: dali_mixed(photos)),
        Step("bf16 autocast", cap(15, 60), run=bf16_autocast),
        Step("channels_last (TF32 off)", cap(15, 60), run=channels_last),
        Step("torch.compile (static shapes)", cap(60, 180), run=compiled_step),
        Step("NCCL", cap(15, 60), run=nccl),
        Step("bench pipeline (ImageNet-size JPEG)", cap(50, 300),
             commands=[_iccl("bench", "pipeline", "--data", str(photos), "--steps", str(steps),
                           "--warmup", "3", "--json", str(out / "bench-pipeline.json"))],
             summarise=pipeline_summary),
        Step("bench train (ResNet-32, 32 px)", cap(40, 180),
             commands=[_iccl("bench", "train", "--preset", "cifar10-lt", "--data", str(tiny),
                           "--steps", str(steps), "--warmup", "5",
                           "--loader", "resident", "--json", str(out / "bench-train-resnet32.json"))],
             summarise=train_summary("resnet32")),
        Step("bench train (ResNet-50, 224 px, compiled)", cap(120, 400),
             commands=[_iccl("bench", "train", "--preset", "inat2018", "--data", str(photos),
                           "--batch-size", "256", "--steps", str(steps), "--warmup", "5", "--compile",
                           "--loader", "dali", "--json", str(out / "bench-train-resnet50.json"))],
             summarise=train_summary("resnet50")),
        Step("CIFAR-10-LT ICCL recipe (200 + 10 epochs)", float("inf"),
             commands=recipe,
             summarise=lambda: recipe_summary(run, real_data)),
    ]


def recipe_summary(run: Path, real_data: bool) -> str:
    """Top-1 (overall / many / medium) at the end of each stage, from the run's report, or how
    far it got from its metrics log."""
    report = run / "report.json"
    what = "CIFAR-10-LT" if real_data else "synthetic data (not comparable to the paper)"
    if report.is_file() and "stage2" in (r := _read_json(report)):
        s1, s2 = r["stage1"], r["stage2"]
        took = r.get("train_seconds_this_session")
        return (f"{what}: stage 1 {s1['top1']:.2f}, ICCL {s2['top1']:.2f} "
                f"(many {s2['many']:.2f}, medium {s2['medium']:.2f}; paper 82.1)"
                + (f"; {took:.0f} s of training" if took else ""))
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
              if '"event": "epoch"' in line] if (run / "metrics.jsonl").is_file() else []
    last = f"{epochs[-1]['stage']} epoch {epochs[-1]['epoch'] + 1}" if epochs else "no epoch"
    return f"{what}: stopped after {last}"


class _TimeLimit(Exception):
    pass


def _on_alarm(signum, frame):
    raise _TimeLimit()


def run_step(step: Step, left_s: float, out: Path) -> Row:
    """Run one step with at most min(its share, left_s) seconds; skipped when less than
    MIN_STEP_S is left (a step whose own share is shorter still runs)."""
    if left_s < MIN_STEP_S:
        return Row(step.name, "skipped", f"time limit: {left_s:.0f} s left")
    budget = min(step.share_s, left_s)
    t = time.perf_counter()
    try:
        if step.run is not None:
            signal.signal(signal.SIGALRM, _on_alarm)
            signal.alarm(max(1, int(budget)))
            try:
                detail = step.run()
            finally:
                signal.alarm(0)
        else:
            log = out / f"{log_name(step.name)}.log"
            end = time.monotonic() + budget
            for command in step.commands:
                with open(log, "a") as f:
                    f.write(f"$ {' '.join(command)}\n")
                    f.flush()
                    proc = subprocess.run(command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                          env={**os.environ, "PYTHONPATH": python_path()},
                                          timeout=max(1.0, end - time.monotonic()))
                if proc.returncode != 0:
                    tail = log.read_text()[-300:].strip().replace("\n", " | ")
                    raise RuntimeError(f"exit {proc.returncode}: {tail}")
            detail = step.summarise() if step.summarise else "ok"
        return Row(step.name, "ok", detail, time.perf_counter() - t)
    except (_TimeLimit, subprocess.TimeoutExpired):
        detail = f"cut off after {budget:.0f} s"
        if step.summarise is not None:
            with contextlib.suppress(Exception):
                detail += f"; {step.summarise()}"
        return Row(step.name, "timeout", detail, time.perf_counter() - t)
    except Exception as e:  # a failed check is a result to show, not a reason to stop
        import traceback
        traceback.print_exc()
        return Row(step.name, "FAIL", f"{type(e).__name__}: {e}"[:400], time.perf_counter() - t)


def python_path() -> str:
    """PYTHONPATH for the `iccl` subprocesses: this checkout first, then what the caller had
    (packages installed with `pip install --target` are found through it)."""
    return os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)


def log_name(step: str) -> str:
    """'bench train (ResNet-32, 32 px)' -> 'bench-train-resnet-32-32-px'."""
    return "-".join("".join(c if c.isalnum() else " " for c in step.lower()).split())


def format_table(rows: list[Row], title: str) -> str:
    """The rows as a Markdown table (the file written to --out; the terminal gets the same)."""
    lines = [f"### {title}", "", "| check | result | detail | s |", "|---|---|---|---|"]
    for r in rows:
        detail = r.detail.replace("|", "/").replace("\n", " ")
        lines.append(f"| {r.check} | {r.status} | {detail} | {r.seconds:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    steps = plan(args)
    if args.dry_run:
        print(f"time limit {args.time_limit:.0f} s; results in {args.out}; data in {args.work}")
        for s in steps:
            share = "the time left" if s.share_s == float("inf") else f"<= {s.share_s:.0f} s"
            what = "; ".join(" ".join(c) for c in s.commands) if s.commands else "in this process"
            print(f"- {s.name} ({share}): {what}")
        return 0
    if not torch.cuda.is_available():
        print("no CUDA device: this script checks the GPU paths and needs a GPU "
              "(--dry-run shows the plan without one)", file=sys.stderr)
        return 2
    deadline = time.monotonic() + args.time_limit - END_MARGIN_S
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for s in steps:
        rows.append(run_step(s, deadline - time.monotonic(), args.out))
        print(format_table(rows[-1:], s.name).splitlines()[-1], flush=True)
    title = (f"GPU check: {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, "
             f"torch {torch.__version__} (CUDA {torch.version.cuda}), limit {args.time_limit:.0f} s")
    table = format_table(rows, title)
    print(table)
    (args.out / "gpu-check.md").write_text(table)
    (args.out / "gpu-check.json").write_text(json.dumps(
        {"title": title, "rows": [asdict(r) for r in rows], "quick": args.quick,
         "time_limit_s": args.time_limit}, indent=1))
    return 0 if all(r.status == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
