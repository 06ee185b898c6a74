"""`iccl bench lt-trees | convert | scale`: the real dataset sizes (registered by tools/cmd_bench.py)."""
from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.cpus import usable_cpus
from pipeline.errors import DataError

DATASETS = ("imagenet-lt", "inat2018")  # tools.bench_scale.DATASETS, without importing numpy for --help

TREES_DESCRIPTION = """\
Write a JPEG tree in the real layout of ImageNet-LT or iNaturalist 2018, with the real per-class
training counts (shipped) and the real val/test lists (--lists-dir; made-up lists of the published
shape without it), plus the list files, so that `iccl convert
imagenet-lt` / `iccl convert inat2018` run on it exactly as users run them on the real data:

  imagenet-lt  OUT/root/train/<wnid>/<wnid>_<n>.JPEG, OUT/root/val/<wnid>/ILSVRC2012_val_<n>.JPEG
               at ImageNet's sizes (500x375 mostly); OUT/lists/ImageNet_LT_{train,val,test}.txt:
               115,846 / 20,000 / 50,000 images over 1,000 classes (~13 GB at --scale 1)
  inat2018     OUT/root/train_val2018/<supercategory>/<id>/<hash>.jpg at 128x96 or 96x128 (long
               side 128 px, so that 462k files fit a small disk: ~3.5 GB on disk);
               OUT/lists/iNaturalist18_{train,val}.txt (or, with --json, OUT/root/train2018.json
               and val2018.json): 437,513 / 24,426 images over 8,142 classes

Content: photographic mosaics of the CIFAR-10 test images (--tiles-from, as `iccl bench pipeline
--make-data` uses them; smooth-noise tiles without it), a pool of 256 JPEGs per tree; each file
is a pool JPEG with its own name in a JPEG comment, so the files differ and decode like
photographs of their size. Writing is file copies in --workers
processes: a few minutes for either tree at --scale 1 on 2 cores. A rerun finds a finished tree."""

TREES_EPILOG = """\
examples:
  iccl bench lt-trees imagenet-lt --out /data/fake-imagenet-lt --tiles-from cifar-10-binary.tar.gz
      --lists-dir ImageNet_LT_lists/   (one line: the folder of the official ImageNet_LT_val.txt, _test.txt)
  iccl convert imagenet-lt --root /data/fake-imagenet-lt/root --lists /data/fake-imagenet-lt/lists --out data/in-lt
  iccl bench lt-trees inat2018 --out /data/fake-inat --scale 0.01 --json
  iccl bench lt-trees inat2018 --out /tmp/t --counts my_counts.json --lists-dir my_lists/"""

CONVERT_DESCRIPTION = """\
Conversion speed and memory: `iccl convert` (JPEGs kept byte-for-byte, each decoded once to check
it) against FFCV's own writer as FFCV's ImageNet example uses it (DatasetWriter with
RGBImageField(write_mode="jpg", max_resolution, jpeg_quality) and IntField, fed PIL images as
torchvision's ImageFolder gives them), on the same training images in the same run, both with
--workers processes. Every input is read once first (untimed) so both find the page cache equally
warm. Reports images/s, the ratio ours / FFCV, and peak RSS (the process tree, psutil)."""

CONVERT_EPILOG = """\
examples:
  iccl bench convert imagenet-lt --root T/root --lists T/lists --work /tmp/bc --json convert.json
  iccl bench convert folder --root /data/my-images --work /tmp/bc --repeats 2"""

SCALE_DESCRIPTION = """\
ImageNet-LT and iNaturalist 2018 at their real sizes (or --scale of every class), end to end:
generate the trees (`iccl bench lt-trees`), `iccl convert` (seconds, images/s, peak RSS),
optionally the .beton (--ffcv), `iccl bench convert` against FFCV's writer, `iccl info`,
`iccl verify`, time to the first two-stream batch and RSS per loader worker (reference, dali,
ffcv), sampler set-up and per-step draw time at 8,142 classes, and one evaluation with
many / medium / few on random logits. Results go to WORK/scale.json after each step; a rerun
skips finished steps (resumable); the table is printed at the end."""

SCALE_EPILOG = """\
steps: tree, convert, ffcv (only with --ffcv), bench-convert, info, verify, first-batch, sampler,
evaluate. Disk at --scale 1 (measured): ImageNet-LT 13 GB tree + 13 GB shards (+ 12 GB of .beton
with --ffcv) + ~9 GB of scratch during bench-convert; iNaturalist 3.6 + 3.1 (+ 2.4) + ~2 GB.
Time at --scale 1 on 2 cores (measured): ImageNet-LT ~11 min, iNaturalist ~6 min, of which
--ffcv ~4 min; the 1 % run takes ~8 min (start-up costs dominate it).

examples:
  iccl bench scale --work /tmp/scale-1pc --scale 0.01        # ~8 min on 2 cores
  iccl bench scale --work /data/scale --ffcv --json scale.json  # the real sizes: ~17 min on 2 cores
  iccl bench scale --work /data/scale --datasets inat2018 --skip bench-convert"""


def register(sub) -> None:
    _register_trees(sub)
    _register_convert(sub)
    _register_scale(sub)


def _raw(sub, name, help, description, epilog):
    return sub.add_parser(name, help=help, description=description, epilog=epilog,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def _common(p, scale: bool = True) -> None:
    if scale:
        p.add_argument("--scale", type=float, default=1.0, metavar="F",
                       help="keep max(1, round(F x n)) images of every class in every split "
                            "(default 1: the real sizes)")
    p.add_argument("--counts", type=Path, metavar="FILE",
                   help="per-class training counts (JSON with ImageNet_LT_train_cls_num and "
                        "iNaturalist18_train_cls_num; default: the real counts, shipped in "
                        "tools/data/lt_class_counts.json)")
    p.add_argument("--lists-dir", type=Path, metavar="DIR",
                   help="folder with the real ImageNet_LT_val.txt, ImageNet_LT_test.txt, "
                        "iNaturalist18_val.txt (default: beside --counts when given; without them "
                        "lists of the published shape are made up)")
    p.add_argument("--tiles-from", type=Path, metavar="CIFAR10",
                   help="the CIFAR-10 download (.tar.gz or extracted, binary or python version) "
                        "whose test images tile the JPEGs (default: smooth-noise tiles)")
    p.add_argument("--workers", type=int, default=usable_cpus(), metavar="N",
                   help=f"processes (default: all {usable_cpus()} cores)")


def _register_trees(sub) -> None:
    p = _raw(sub, "lt-trees", "write ImageNet-LT / iNaturalist 2018 JPEG trees at their real sizes",
             TREES_DESCRIPTION, TREES_EPILOG)
    p.add_argument("kind", choices=DATASETS, metavar="DATASET", help=" or ".join(DATASETS))
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="OUT/root, OUT/lists")
    p.add_argument("--json", action="store_true", help="inat2018: the COCO-style train2018.json / "
                                                       "val2018.json instead of the list files")
    _common(p)
    p.set_defaults(handler=_trees)


def _trees(args) -> int:
    from tools.lt_trees import make_tree

    rec = make_tree(args.kind, args.out, scale=args.scale, counts_file=args.counts,
                    lists_dir=args.lists_dir, json_annotations=args.json, workers=args.workers,
                    tiles_from=args.tiles_from)
    print(f"{args.kind}: {rec['files']:,} files ({', '.join(f'{s} {n:,}' for s, n in rec['images'].items())}) "
          f"in {rec['root']}" + (f", lists in {rec['lists']}" if rec["lists"] else ""))
    return 0


def _register_convert(sub) -> None:
    from tools.cmd_data import SOURCE_OPTIONS  # light: no heavy imports

    p = _raw(sub, "convert", "images/s and peak memory of `iccl convert` vs FFCV's own writer",
             CONVERT_DESCRIPTION, CONVERT_EPILOG)
    kinds = ("imagenet-lt", "inat2018", "folder")
    assert set(kinds) <= set(SOURCE_OPTIONS)
    p.add_argument("kind", choices=kinds, metavar="SOURCE", help=", ".join(kinds))
    p.add_argument("--root", type=Path, required=True, metavar="PATH", help="as for `iccl convert`")
    p.add_argument("--lists", type=Path, metavar="PATH", help="as for `iccl convert`")
    p.add_argument("--work", type=Path, required=True, metavar="DIR",
                   help="scratch folder for both outputs (removed afterwards)")
    p.add_argument("--workers", type=int, default=usable_cpus(), metavar="N",
                   help=f"processes of both writers (default: all {usable_cpus()} cores)")
    p.add_argument("--max-resolution", type=int, default=512, metavar="PX",
                   help="FFCV's max_resolution (default 512: ImageNet's 500-px images keep their size)")
    p.add_argument("--quality", type=int, default=90, metavar="Q", help="JPEG quality (default 90)")
    p.add_argument("--repeats", type=int, default=1, metavar="R", help="alternate R times, keep the best")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON to FILE")
    p.set_defaults(handler=_convert)


def _convert(args) -> int:
    from pipeline.atomic import write_json
    from tools.bench_convert import run
    from tools.cmd_data import SOURCE_OPTIONS, _load_source

    for name in {n for options in SOURCE_OPTIONS.values() for n in options}:  # the options not offered here
        if not hasattr(args, name):
            setattr(args, name, None)
    report = run(_load_source(args), args.work, workers=args.workers,
                 max_resolution=args.max_resolution, quality=args.quality, repeats=args.repeats)
    ours, ffcv = report["results"]
    mb = lambda b: "-" if b is None else f"{b / 2**20:,.0f} MB"  # noqa: E731
    print(f"{report['images']:,} images, {args.workers} workers: ours {ours['images_per_s']:,.0f} images/s "
          f"(peak RSS {mb(ours['peak_rss_tree_bytes'])}), FFCV's writer {ffcv['images_per_s']:,.0f} "
          f"images/s (peak RSS {mb(ffcv['peak_rss_tree_bytes'])}): {report['ratio_to_ffcv']:.2f}x")
    if args.json:
        write_json(args.json, report)
    return 0


def _register_scale(sub) -> None:
    p = _raw(sub, "scale", "ImageNet-LT and iNaturalist 2018 at their real sizes, end to end (resumable)",
             SCALE_DESCRIPTION, SCALE_EPILOG)
    p.add_argument("--work", type=Path, required=True, metavar="DIR", help="trees, datasets, scale.json")
    p.add_argument("--datasets", default=",".join(DATASETS), metavar="LIST",
                   help=f"comma-separated from {','.join(DATASETS)} (default: both)")
    p.add_argument("--skip", default="", metavar="LIST", help="steps to leave out (see below)")
    p.add_argument("--ffcv", action="store_true", help="also add the .beton files (step ffcv)")
    p.add_argument("--json", type=Path, metavar="FILE", help="also copy WORK/scale.json to FILE")
    _common(p)
    p.set_defaults(handler=_scale)


def _scale(args) -> int:
    from rich.table import Table

    from pipeline.atomic import write_json
    from tools.bench_scale import STEPS, run, table_rows
    from tools.report_table import print_table

    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if set(datasets) - set(DATASETS) or not datasets:
        raise DataError(f"--datasets {args.datasets!r}: choose from {', '.join(DATASETS)}")
    if skip - set(STEPS):
        raise DataError(f"--skip: unknown steps {sorted(skip - set(STEPS))}; they are {', '.join(STEPS)}")
    report = run(args.work, scale=args.scale, datasets=datasets, skip=skip, ffcv=args.ffcv,
                 workers=args.workers, counts_file=args.counts, lists_dir=args.lists_dir,
                 tiles_from=args.tiles_from)
    table = Table(title=f"real-size measurements, --scale {args.scale:g}, {report['workers']} workers")
    for name in ("dataset", "measurement", "result"):
        table.add_column(name)
    for row in table_rows(report):
        table.add_row(*row)
    print_table(table)
    if args.json:
        write_json(args.json, report)
    return 0
