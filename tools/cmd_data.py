"""`iccl convert`, `iccl info`, `iccl verify`: make a converted dataset, describe it, check it."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline.cpus import usable_cpus
from pipeline.errors import ON_ERROR, DataError

REQUIRED = "required"
# Source kind -> the source options it takes, with their defaults.
SOURCE_OPTIONS = {
    "cifar10-lt": {"source": REQUIRED, "imbalance": 100.0, "seed": 0, "val_per_class": 0},
    "cifar100-lt": {"source": REQUIRED, "imbalance": 100.0, "seed": 0, "val_per_class": 0},
    "imagenet-lt": {"root": REQUIRED, "lists": REQUIRED},
    "inat2018": {"root": REQUIRED, "lists": None},
    "folder": {"root": REQUIRED, "holdout": None, "seed": 0},
    "synthetic-lt": {"classes": 10, "image_size": 32, "imbalance": 100.0, "max_per_class": 500,
                     "test_per_class": 100, "val_per_class": 100, "seed": 0},
}

CONVERT_DESCRIPTION = """\
Convert a dataset once into the format every loader reads: per split, WebDataset shards
(shard-000000.tar with KEY.jpg|png + KEY.cls members) and an index of every sample; meta.json
(classes, per-class counts, the many/medium/few groups) is written last, when all is complete.
Optionally an FFCV .beton per split.

JPEGs are stored as they are (no quality loss) when they are plain 3-channel baseline or
progressive files; grayscale, CMYK, palette or alpha images are converted to RGB; other formats
are re-encoded as baseline JPEG, and so are PNG files named .jpg/.jpeg (a JPEG dataset stays all
JPEG); other PNGs and pixel arrays (CIFAR, synthetic) stay lossless PNG. The table counts the
images converted to RGB and those re-encoded.
16-bit PNG, TIFF, PGM and PPM images are scaled to 8 bits (round(v x 255 / max)), counted as converted.
Every image is decoded once while converting, so a corrupt file is found now, not mid-training.

A rerun of the same command resumes where it stopped (finished shards are kept). Output folders
hold one conversion: a different request into the same --out is refused, except after a
conversion that stopped at a bad input: the source changed to fix it starts the folder over."""

CONVERT_EPILOG = """\
sources and the options they need:
  cifar10-lt, cifar100-lt  --source PATH: the official CIFAR download, python or binary version,
                           as the .tar.gz or its extracted folder; --imbalance, --seed shape the
                           long-tailed training split (the test split stays balanced);
                           --val-per-class N adds a balanced split 'val' drawn from the training
                           images the long-tailed split leaves out (default 0: none; a class with
                           too few gives up the rest from training, recorded in meta.json as
                           val_taken_from_train), to make choices on without touching the test
                           split: stage 2's tuned values (`--set val_split=val`), whole recipes
                           (`--set eval_split=val`)
  imagenet-lt              --root PATH: the ImageNet folder (train/<wnid>/, val/<wnid>/);
                           --lists PATH: the folder with ImageNet_LT_{train,val,test}.txt
  inat2018                 --root PATH: the iNaturalist 2018 folder (train_val2018/, *2018.json);
                           --lists PATH (optional): the folder with iNaturalist18_{train,val}.txt,
                           used instead of the JSON files
  folder                   --root PATH: ROOT/<class>/<images> (all train), or ROOT/train/<class>/
                           with optional ROOT/val/ and ROOT/test/. Classes are the folder names
                           sorted by code point (as torchvision's ImageFolder: "B" before "a");
                           images in subfolders of a class folder belong to that class.
                           --holdout F|N, --seed S: draw a test split from a ROOT/<class>/ tree,
                           a fraction F of each class or N images per class (every class keeps at
                           least one training image); refused when ROOT has train/, val/ or
                           test/. Images with an EXIF orientation are turned upright (re-encoded).
  synthetic-lt             generated images, no download: --classes, --image-size, --imbalance,
                           --max-per-class, --test-per-class, --val-per-class, --seed

examples:
  iccl convert cifar10-lt --source cifar-10-python.tar.gz --imbalance 100 --out data/cifar10-lt-100
  iccl convert imagenet-lt --root /data/imagenet --lists lists/ --max-side 256 --out data/imagenet-lt
  iccl convert folder --root ~/photos --holdout 0.2 --max-side 512 --out data/photos
  iccl convert synthetic-lt --classes 20 --out data/synthetic --ffcv

bad items (missing, unreadable or corrupt files, labels out of range, 32-bit or floating-point
pixels, images with a side under 8 pixels, also once shrunk to --max-side) stop the conversion with
a message naming them; rerun with --on-error skip to leave them out (listed in OUT/skipped.json).
A shard whose items were all left out is not written (meta.json lists the shards of each split)."""


def register(subparsers) -> None:
    _register_convert(subparsers)
    _register_info(subparsers)
    _register_verify(subparsers)


# --- convert ----------------------------------------------------------------------------------
def _register_convert(subparsers) -> None:
    p = subparsers.add_parser(
        "convert", help="convert a dataset once into shards + index (+ FFCV)",
        description=CONVERT_DESCRIPTION, epilog=CONVERT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", metavar="SOURCE", choices=sorted(SOURCE_OPTIONS),
                   help=f"what to convert: {', '.join(SOURCE_OPTIONS)}")
    p.add_argument("--out", required=True, type=Path, metavar="DIR",
                   help="output folder (created; must be new, empty, or hold this same conversion)")
    src = p.add_argument_group("source options (which apply depends on SOURCE, see below)")
    src.add_argument("--source", type=Path, metavar="PATH",
                     help="CIFAR: the official python- or binary-version .tar.gz, or its extracted folder")
    src.add_argument("--root", type=Path, metavar="PATH",
                     help="imagenet-lt, inat2018, folder: the folder holding the images")
    src.add_argument("--lists", type=Path, metavar="PATH",
                     help="imagenet-lt (required), inat2018 (optional): the folder of split list files")
    src.add_argument("--imbalance", type=float, metavar="R",
                     help="CIFAR-LT, synthetic-lt: largest / smallest training class size (default 100)")
    src.add_argument("--seed", type=int, metavar="S",
                     help="CIFAR-LT, synthetic-lt, folder: seed of the subsampling / generation / "
                          "holdout draw (default 0)")
    src.add_argument("--holdout", type=_holdout, metavar="F|N",
                     help="folder: move a fraction F (0 < F < 1, e.g. 0.2) or N images (a whole "
                          "number, e.g. 10) of each class into a test split, drawn from --seed "
                          "over the files found (one left out by --on-error skip leaves its split "
                          "one image short)")
    src.add_argument("--classes", type=int, metavar="K",
                     help="synthetic-lt: number of classes (default 10)")
    src.add_argument("--image-size", type=int, metavar="PX",
                     help="synthetic-lt: side of the square images (default 32)")
    src.add_argument("--max-per-class", type=int, metavar="N",
                     help="synthetic-lt: training images of the largest class (default 500)")
    src.add_argument("--test-per-class", type=int, metavar="N",
                     help="synthetic-lt: test images per class (default 100)")
    src.add_argument("--val-per-class", type=int, metavar="N",
                     help="synthetic-lt: validation images per class, split 'val' (default 100; 0: "
                          "none); CIFAR-LT: the same, drawn from the training images the long-tailed "
                          "split leaves out (default 0)")
    out = p.add_argument_group("output options")
    out.add_argument("--max-side", type=int, metavar="N",
                     help="shrink images whose longer side exceeds N pixels to N and store them as "
                          "baseline JPEG (e.g. 256 for ImageNet-scale training; default: keep sizes)")
    out.add_argument("--quality", type=int, default=90, metavar="Q",
                     help="JPEG quality (1-100) of images that must be re-encoded (default 90)")
    out.add_argument("--shard-size", type=int, default=1000, metavar="N",
                     help="samples per shard (default 1000: ~100 MB of ImageNet JPEGs)")
    out.add_argument("--workers", type=int, default=usable_cpus(), metavar="N",
                     help=f"processes encoding shards in parallel (default: all {usable_cpus()} cores)")
    out.add_argument("--ffcv", action="store_true",
                     help="also write an FFCV file per split (OUT/<split>.beton); adding it to a "
                          "finished conversion by rerunning with --ffcv works too")
    out.add_argument("--on-error", choices=ON_ERROR, default="stop",
                     help="bad items: stop with a message naming them (default), or leave them "
                          "out and list them in OUT/skipped.json")
    p.set_defaults(handler=_convert)


def _source_args(args) -> dict:
    """The source options of args.kind, defaults filled in; DataError for missing or stray ones."""
    wanted = SOURCE_OPTIONS[args.kind]
    every = {name for opts in SOURCE_OPTIONS.values() for name in opts}
    stray = sorted(n for n in every - set(wanted) if getattr(args, n) is not None)
    if stray:
        raise DataError(f"{', '.join(_flag(n) for n in stray)} does not apply to {args.kind} "
                        f"(see `iccl convert --help`).")
    values = {}
    for name, default in wanted.items():
        value = getattr(args, name)
        if value is None and default == REQUIRED:
            raise DataError(f"{args.kind} needs {_flag(name)} PATH (see `iccl convert --help`).")
        values[name] = default if value is None else value
    return values


def _holdout(text: str) -> float | int:
    """--holdout: "0.2" is a fraction of each class, "10" a number of images per class."""
    from pipeline.sources.folder import check_holdout

    try:
        value = int(text) if text.strip().isdigit() else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a fraction (0.2) or a number of images "
                                         f"per class (10)") from None
    try:
        check_holdout(value)
    except DataError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _load_source(args):
    o = _source_args(args)
    if args.kind in ("cifar10-lt", "cifar100-lt"):
        from pipeline.sources.cifar import load_cifar_lt
        return load_cifar_lt(o["source"], 10 if args.kind == "cifar10-lt" else 100,
                             o["imbalance"], o["seed"], val_per_class=o["val_per_class"])
    if args.kind == "imagenet-lt":
        from pipeline.sources.imagenet_lt import load_imagenet_lt
        return load_imagenet_lt(o["root"], o["lists"])
    if args.kind == "inat2018":
        from pipeline.sources.inat import load_inat2018
        return load_inat2018(o["root"], o["lists"])
    if args.kind == "folder":
        from pipeline.sources.folder import load_folder
        return load_folder(o["root"], o["holdout"], o["seed"])
    from pipeline.sources.synthetic import make_synthetic_lt
    return make_synthetic_lt(num_classes=o["classes"], image_size=o["image_size"],
                             imbalance=o["imbalance"], max_per_class=o["max_per_class"],
                             test_per_class=o["test_per_class"], val_per_class=o["val_per_class"],
                             seed=o["seed"])


def _convert(args) -> int:
    from pipeline.convert import convert
    from pipeline.inspect import split_bytes

    meta = convert(_load_source(args), args.out, shard_size=args.shard_size, workers=args.workers,
                   max_side=args.max_side, quality=args.quality, ffcv=args.ffcv,
                   on_error=args.on_error)
    _print_splits(f"{meta['name']} -> {args.out}", [
        (split, m["num_samples"], sum(1 for c in m["class_counts"] if c), m["num_shards"],
         split_bytes(args.out, split, m), m["skipped"], m["converted_to_rgb"],
         m["reencoded"], m["formats"])
        for split, m in meta["splits"].items()],
        ("split", "samples", "classes", "shards", "size", "skipped", "to RGB", "re-encoded", "formats"))
    if args.kind == "folder" and set(meta["splits"]) == {"train"}:
        print(f"note: {args.out} has a train split only, so there is nothing to evaluate on. Convert "
              f"again into a new --out with --holdout 0.2 (a fifth of each class) or --holdout N (N "
              f"images per class) to draw a test split, or lay the images out as ROOT/train/<class>/ "
              f"and ROOT/test/<class>/.")
    return 0


# --- info -------------------------------------------------------------------------------------
def _register_info(subparsers) -> None:
    p = subparsers.add_parser(
        "info", help="describe a converted dataset",
        description="Describe a converted dataset: per split the number of samples and of "
                    "non-empty classes, the imbalance ratio (largest / smallest class), how many "
                    "of its classes are many-shot (> 100 training images), medium (20-100) and few "
                    "(< 20): for every split, the test split too, the groups are decided by the "
                    "TRAINING counts, as the field reports accuracy; then the formats written and "
                    "the size on disk (shards, index and FFCV file; 1 MB = 10^6 bytes, the same "
                    "figure `iccl convert` reports).",
        epilog="example:\n  iccl info data/cifar10-lt-100\n  iccl info data/cifar10-lt-100 --json "
               "| jq .splits.train.imbalance_ratio",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", metavar="DIR", type=Path, help="the --out folder of `iccl convert`")
    p.add_argument("--json", action="store_true",
                   help="print JSON on stdout instead of a table (includes per-class counts)")
    p.set_defaults(handler=_info)


def _info(args) -> int:
    from pipeline.format import read_meta
    from pipeline.inspect import dataset_info

    info = dataset_info(args.root)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    _print_splits(f"{info['name']}: {len(info['classes'])} classes ({args.root})", [
        (split, s["num_samples"], s["num_classes"],
         f"{s['imbalance_ratio']:.1f}" if s["imbalance_ratio"] else "-",
         f"{s['many']}/{s['medium']}/{s['few']}", s["bytes"], s["formats"])
        for split, s in info["splits"].items()],
        ("split", "samples", "classes", "imbalance", "many/medium/few by train count", "size",
         "formats"))
    source = read_meta(args.root).get("source") or {}
    taken = source.get("val_taken_from_train") or []
    if any(taken):  # CIFAR-LT with --val-per-class: the few classes that gave up their own images
        shown = ", ".join(f"{info['classes'][k]} {n}" for k, n in enumerate(taken) if n)
        print(f"val: {source['val_per_class']} per class from the CIFAR training images the long-tailed "
              f"subset leaves out; taken from the train split where too few were left: {shown}")
    return 0


# --- verify -----------------------------------------------------------------------------------
def _register_verify(subparsers) -> None:
    p = subparsers.add_parser(
        "verify", help="re-read and check every file of a converted dataset",
        description="Check a converted dataset end to end: every shard against its checksum and "
                    "its index (members, offsets, sizes, labels), every image decoded, class "
                    "counts against meta.json, the FFCV files if any. Prints `OK: ...` and exits "
                    "0, or lists each problem with the file and the fix and exits 1.",
        epilog="example:\n  iccl verify data/imagenet-lt --workers 8",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", metavar="DIR", type=Path, help="the --out folder of `iccl convert`")
    p.add_argument("--workers", type=int, default=usable_cpus(), metavar="N",
                   help=f"processes checking shards in parallel (default: all {usable_cpus()} cores)")
    p.set_defaults(handler=_verify)


def _verify(args) -> int:
    from pipeline.format import read_meta
    from pipeline.inspect import verify
    from pipeline.progress import count

    if args.workers < 1:
        raise DataError(f"--workers {args.workers}: must be at least 1.")
    meta = read_meta(args.root)
    problems = verify(args.root, args.workers)
    if problems:
        print(f"{count(len(problems), 'problem')} in {args.root}:")
        for p in problems:
            print(f"  - {p}")
        return 1
    splits = meta["splits"].values()
    print(f"OK: {sum(s['num_samples'] for s in splits)} samples in "
          f"{sum(s['num_shards'] for s in splits)} shards verified.")
    return 0


# --- output -----------------------------------------------------------------------------------
def _print_splits(title: str, rows: list[tuple], header: tuple[str, ...]) -> None:
    """A table of splits on stdout (rich; uncoloured and full width when stdout is a file)."""
    from rich import box
    from rich.table import Table

    from tools.report_table import out_console

    console = out_console()
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    for h in header:
        table.add_column(h, justify="left" if h in ("split", "formats") else "right",
                         no_wrap=h in ("split", "formats", "size"))
    for row in rows:
        table.add_row(*(_cell(h, v) for h, v in zip(header, row)))
    console.print(table)


def _cell(name: str, value) -> str:
    if name == "size":
        return _human_bytes(value)
    if isinstance(value, list):
        return "+".join(value)
    return f"{value:,}" if isinstance(value, int) else str(value)


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
