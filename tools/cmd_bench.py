"""`iccl bench ...`: throughput measurements, one sub-subcommand each (`iccl bench pipeline`, ...).

Every measurement compares against a baseline measured in the same run, on the same machine, so
the ratios mean something even where the absolute numbers do not travel.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.cpus import usable_cpus
from pipeline.errors import DataError
from pipeline.loaders import LOADER_CHOICES, LOADERS
from train.config import PRESETS
from train.settings import AUGMENTS

PIPELINE_DESCRIPTION = """\
Decoded images per second of each data loader in two-stream training mode (uniform + class-aware
stream, so 2 x BATCH images per step, augmented as in training: pad-crop + flip for images up to
64 px, else random resized crop 224 + flip + colour jitter 0.4), every loader with the same CPU
budget (--workers threads / worker processes, as many torch threads); construction and --warmup
steps are not timed. Also the decode-only ceiling of this machine's CPU cores: the same images
decoded, without augmentation, by the decoders training uses for their format (simplejpeg for
JPEG, Pillow for PNG) in --workers processes, and by DALI's CPU decoder with --workers threads
(when installed): the ceiling is the faster of the two, named under the table with both rates.
Samples that do not decode are counted, reported and left out of the ceiling. No loader can
reach that ceiling, since every loader must also crop, resize, flip and jitter: the floor is that
unavoidable work done plainly with the fastest tools here, decode (simplejpeg) + the same augmentation with
OpenCV on uint8 (one resize of the crop, a flip, jitter as histogram + LUT + grey blend), in
--workers processes, no framework. The table gives images/s, the ratio to the reference loader
(DataLoader + Pillow), and the fractions of the decode ceiling and of the floor.
Loaders that cannot run on the data (resident on images of different sizes, ffcv without a
.beton, a package not installed) are listed as skipped, with the reason."""

PIPELINE_EPILOG = """\
bench data (--make-data DIR; created once, a rerun reuses it), long-tailed over 10 classes
(n_k ~ 10^(-k/9)) and written by the conversion engine exactly like real data, plus a .beton when
ffcv is installed:
  default  --images N (2000) ImageNet-size photographs: baseline 4:2:0 JPEGs, quality 90, in
           ImageNet's common shapes (mostly 500x375; also 500x333, 500x400 and portrait), each a
           mosaic of real CIFAR-10 test photographs upscaled 1-2x (bicubic) with light grain
           (sigma 4): real photographic content at ImageNet's size and about its entropy, ~70 KB a
           file (ImageNet averages ~110 KB)
  --tiny   --images N CIFAR-size images: the CIFAR-10 test images, 32x32, lossless PNG
The CIFAR-10 test images are read from the download named by --tiles-from (the .tar.gz or its
extracted folder, binary or python version); without it, smooth multi-octave noise tiles stand in.

examples:
  iccl bench pipeline --make-data /tmp/bench-photos --images 2000 --tiles-from cifar-10-binary.tar.gz --json photos.json
  iccl bench pipeline --make-data /tmp/bench-tiny --tiny --images 10000 --tiles-from cifar-10-binary.tar.gz
  iccl bench pipeline --data data/imagenet-lt --loaders dali,reference --steps 50"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="measure throughput (data loaders; the training step)",
        description="Measure throughput against baselines measured in the same run.")
    sub = p.add_subparsers(dest="bench_command", metavar="WHAT")
    _register_pipeline(sub)
    _register_train(sub)
    from tools import cmd_bench_scale  # lt-trees, convert, scale: the real dataset sizes
    cmd_bench_scale.register(sub)

    def show_help(_args) -> int:
        p.print_help()
        return 1
    p.set_defaults(handler=show_help)


# --- bench pipeline ---------------------------------------------------------------------------
def _register_pipeline(sub) -> None:
    p = sub.add_parser("pipeline", help="images/s of every data loader vs the decode-only ceiling",
                       description=PIPELINE_DESCRIPTION, epilog=PIPELINE_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("data (one of --data, --make-data)")
    src.add_argument("--data", type=Path, metavar="DIR", help="a dataset written by `iccl convert`")
    src.add_argument("--make-data", type=Path, metavar="DIR",
                     help="write the bench data (see below) to DIR unless already there, then bench it")
    src.add_argument("--images", type=int, default=2000, metavar="N",
                     help="--make-data: number of images, at least 10 (default 2000)")
    src.add_argument("--tiny", action="store_true",
                     help="--make-data: 32x32 PNGs instead of ImageNet-size JPEGs")
    src.add_argument("--tiles-from", type=Path, metavar="CIFAR10",
                     help="--make-data: the CIFAR-10 download whose test images make the pictures "
                          "(default: smooth-noise tiles)")
    src.add_argument("--split", default="train", help="split to read (default train)")
    run = p.add_argument_group("what to measure")
    run.add_argument("--loaders", default=",".join(LOADERS), metavar="LIST",
                     help=f"comma-separated, from {','.join(LOADERS)} (default: all)")
    run.add_argument("--batch-size", type=int, default=128, metavar="B",
                     help="images per stream per step (default 128; a step reads 2 x B)")
    run.add_argument("--steps", type=int, default=20, metavar="N", help="timed steps (default 20)")
    run.add_argument("--warmup", type=int, default=3, metavar="N",
                     help="untimed steps first (JIT compilation, worker start-up; default 3)")
    run.add_argument("--repeats", type=int, default=1, metavar="R",
                     help="time R windows of --steps steps per loader (and R ceiling runs) and "
                          "keep the best: steadier on a machine others use (default 1)")
    run.add_argument("--workers", type=int, default=usable_cpus(), metavar="W",
                     help=f"decode threads / worker processes of every loader and of the ceiling "
                          f"(default: all {usable_cpus()} cores)")
    run.add_argument("--augment", choices=("auto", *AUGMENTS), default="auto",
                     help="auto (default): pad_crop for images up to 64 px, else rrc")
    run.add_argument("--size", type=int, metavar="PX",
                     help="crop size (default: the stored size for pad_crop, 224 for rrc)")
    run.add_argument("--jitter", type=float, metavar="J", help="rrc colour jitter (default 0.4)")
    run.add_argument("--device", default="auto", help="auto (default: the GPU if any), cpu, cuda")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON to FILE")
    p.set_defaults(handler=_pipeline)


def _pipeline(args) -> int:
    from pipeline.atomic import write_json
    from tools.bench_pipeline import check_options, run

    if (args.data is None) == (args.make_data is None):
        raise DataError("give one of --data DIR (a converted dataset) or --make-data DIR "
                        "(see `iccl bench pipeline --help`)")
    loaders = tuple(name.strip() for name in args.loaders.split(",") if name.strip())
    check_options(loaders, args.batch_size, args.steps, args.warmup, args.workers, args.size,
                  args.jitter, args.repeats)  # before any bench data is made
    data = args.data
    if args.make_data is not None:
        from tools.bench_data import NUM_CLASSES, make_bench_data
        if args.images < NUM_CLASSES:
            raise DataError(f"--images {args.images}: must be at least {NUM_CLASSES} (one per class)")
        make_bench_data(args.make_data, images=args.images, tiny=args.tiny, workers=args.workers,
                        tiles_from=args.tiles_from)
        data = args.make_data
    report = run(data, split=args.split, loaders=loaders, batch_size=args.batch_size,
                 steps=args.steps, warmup=args.warmup, workers=args.workers, augment=args.augment,
                 size=args.size, jitter=args.jitter, device=args.device, repeats=args.repeats)
    _print_pipeline(report)
    if args.json:
        write_json(args.json, report)
    return 0


def _print_pipeline(report: dict) -> None:
    from rich.table import Table

    from tools.report_table import out_console

    aug = report["augment"]
    what = (f"pad {aug['pad']} + crop {aug['size']}" if aug["kind"] == "pad_crop"
            else f"rrc {aug['size']}" + (f" + jitter {aug['jitter']}" if aug["jitter"] else ""))
    table = Table(title=f"two-stream loading, {report['num_samples']} images of {report['data']}: "
                        f"{what} + flip, {report['workers']} workers, {report['device']}")
    for name, justify in (("loader", "left"), ("images/s", "right"), ("x reference", "right"),
                          ("of decode ceiling", "right"), ("of floor", "right"), ("setup s", "right"),
                          ("note", "left")):
        table.add_column(name, justify=justify)
    skipped = []
    for r in report["results"]:
        if r["images_per_s"] is None:
            skipped.append(f"{r['loader']}: {r['skipped']}")
            table.add_row(r["loader"], "-", "-", "-", "-", "-", "skipped (below)")
            continue
        ratio = r["ratio_to_reference"]
        table.add_row(r["loader"], f"{r['images_per_s']:,.0f}", f"{ratio:.2f}" if ratio else "-",
                      f"{100 * r['fraction_of_decode_ceiling']:.0f}%",
                      f"{100 * r['fraction_of_floor']:.0f}%", f"{r['setup_s']:.1f}", "")
    decoders = ", ".join(f"{k} {v:,.0f}/s" for k, v in report["decoders"].items())
    console = out_console()
    console.print(table)
    console.print(f"decode-only ceiling: {report['decode_ceiling_images_per_s']:,.0f} images/s "
                  f"({report['decoder']}; measured: {decoders})", highlight=False)
    console.print(f"floor (decode + the same augmentation, simplejpeg + OpenCV): "
                  f"{report['floor_images_per_s']:,.0f} images/s", highlight=False)
    for line in skipped:
        console.print(f"skipped {line}", highlight=False)


# --- bench train ------------------------------------------------------------------------------
TRAIN_EPILOG = """\
variants:
  naive       a paper codebase's step: mixing on the host in float32, two forward passes (uniform,
              interpolative), NCHW, no autocast, no compilation
  fused       ours: on-device mixing fused with normalisation, the preset's forwards (one per
              branch on the CIFAR presets, one over [x_a; x_mix] elsewhere: fused_forward),
              channels_last, autocast as in training (bf16 on CUDA and on CPUs with native bf16
              instructions; --set amp=fp32 to compare without it), compiled with --compile
  end-to-end  fused, fed by the real loader from --data (decode, augment, transfer included)
naive and fused run on the same ready-made batch, so they measure the step alone; end-to-end shows
whether the pipeline keeps up (ideal: the same images/s as fused). utilisation = FLOPs of the step
(torch's flop counter) x steps/s over the FLOP/s of a 2048^3 matmul in the dtype the variant
computes in (the "dtype" column), measured in the same run.

examples:
  iccl bench train --preset cifar10-lt --data data/cifar10-lt-100 --json train.json
  iccl bench train --preset imagenet-lt --variants naive,fused --batch-size 64 --steps 5"""


def _register_train(sub) -> None:
    p = sub.add_parser("train", help="images/s of the stage-1 step: naive vs fused vs end-to-end",
                       description="Images per second of the ICCL stage-1 training step (two streams, "
                                   "so 2 x BATCH images per step), ours against a paper-codebase "
                                   "baseline, measured in one run on the same model and inputs; warm-up "
                                   "steps (and compilation) are timed separately.",
                       epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cifar10-lt", choices=tuple(PRESETS), metavar="NAME",
                   help=f"model and recipe, one of {', '.join(PRESETS)} (default cifar10-lt)")
    p.add_argument("--data", help="converted dataset: needed for end-to-end (and sets the classes)")
    p.add_argument("--variants", default=None,
                   help="comma-separated from naive,fused,end-to-end (default: all that apply)")
    p.add_argument("--batch-size", type=int, help="images per stream per step (default: the preset's)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--compile", action="store_true", help="torch.compile the fused step")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda")
    p.add_argument("--loader", default="auto", choices=LOADER_CHOICES,
                   help="loader of the end-to-end variant (default auto)")
    p.add_argument("--workers", type=int, default=usable_cpus(), help="loader threads / workers")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a training setting, as in `iccl train` (e.g. w_u_zero_after_warmup=false)")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON to FILE")
    p.set_defaults(handler=_train)


def _train(args) -> int:
    from pipeline.atomic import write_json
    from tools.bench_train import VARIANTS, run

    variants = ([v.strip() for v in args.variants.split(",") if v.strip()] if args.variants
                else [v for v in VARIANTS if args.data or v != "end-to-end"])
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise DataError(f"--variants: unknown {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    if args.steps < 1 or args.warmup < 0:
        raise DataError("--steps must be positive and --warmup at least 0")
    from tools.cmd_train import parse_overrides
    report = run(args.preset, args.data, args.batch_size, args.steps, args.warmup, args.compile,
                 args.device, variants, args.loader, args.workers, parse_overrides(args.set))
    _print_train(report)
    if args.json:
        write_json(args.json, report)
    return 0


def _print_train(report: dict) -> None:
    from rich.table import Table

    from tools.report_table import print_table
    device = report["device_name"] or f"{report['device']}, {report['threads']} threads"
    table = Table(title=f"stage-1 step, preset {report['preset']} (w_u after warm-up "
                        f"{report['w_u_after_warmup']:g}) on {device}{', compiled' if report['compile'] else ''}")
    for name in ("variant", "dtype", "images/s", "x naive", "ms/step", "warm-up s", "utilisation"):
        table.add_column(name, justify="left" if name in ("variant", "dtype") else "right")
    for r in report["results"]:
        ratio = r["ratio_to_naive"]
        table.add_row(r["variant"], r["dtype"], f"{r['images_per_s']:,.0f}", f"{ratio:.2f}" if ratio else "-",
                      f"{r['step_ms']:.1f}", f"{r['warmup_s']:.1f}", f"{100 * r['utilisation']:.1f}%")
    print_table(table)
