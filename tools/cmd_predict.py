"""`iccl predict`, `iccl export`."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

PREDICT_EXAMPLES = """\
examples:
  iccl predict --run runs/mine photo.jpg                    # top-5 classes of one image, CSV on stdout
  iccl predict --run runs/mine new-photos/ --out preds.csv  # every image below a folder
  iccl predict --run runs/mine data/mine/test --top-k 1 --out test.json   # a converted split

INPUT is an image file, a folder (every .jpg .jpeg .png .bmp .webp below it, sorted, EXIF
orientation applied), a converted dataset folder DATA (its evaluation split, the run's eval_split)
or one of its splits DATA/SPLIT. The final (rebalanced) model, final.pt, classifies each image
after the run's evaluation transform (shorter side to eval_resize, centre crop image_size, the
run's mean / std). On a converted split the images are read by the same evaluation loader as
`iccl eval`, so the top-1 class is exactly the one `iccl eval` counts.
Output columns: path, sample (the sample number in a converted split), label (its true class),
class_1, prob_1, ... class_K, prob_K, error (why an image could not be read; the others go on).
Exit status 1 when some images could not be read (their rows say why), 2 when none could.
"""

EXPORT_EXAMPLES = """\
examples:
  iccl export --run runs/mine --out exported/mine
  python exported/mine/predict.py photo.jpg --top-k 3        # needs only torch, numpy, pillow

Writes model.pt2 (a torch.export program: float32 (N, 3, S, S) RGB pixel values 0..255 -> logits;
it normalises itself), model.safetensors (the weights), classes.json, transform.json (resize, crop,
mean, std), predict.py and README.md. The program computes in float32: it reproduces
`iccl predict --amp fp32`. --out must be new or empty unless --force.
"""


def register(sub) -> None:
    p = sub.add_parser("predict", help="classify image files, folders or a converted split with a trained run",
                       description="Top-k classes and probabilities per image from the final model of a run.",
                       epilog=PREDICT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, type=Path, help="run directory made by `iccl train` (with final.pt)")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image file, folder, DATA or DATA/SPLIT")
    p.add_argument("--top-k", type=int, default=5, help="classes per image (default 5)")
    p.add_argument("--out", type=Path, help="FILE.csv or FILE.json (default: CSV on stdout)")
    p.add_argument("--batch-size", type=int, help="images per forward pass (default: the run's eval_batch_size)")
    p.add_argument("--amp", help="autocast: auto, bf16 or fp32 (default: the run's amp setting, as `iccl eval`); "
                                 "fp32 matches `iccl export`")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda")
    p.set_defaults(handler=cmd_predict)

    e = sub.add_parser("export", help="write a run's model as a standalone torch.export program + weights",
                       description="Export the final model of a run so that it runs without this project.",
                       epilog=EXPORT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("--run", required=True, type=Path, help="run directory made by `iccl train` (with final.pt)")
    e.add_argument("--out", required=True, type=Path, help="folder to write (new or empty)")
    e.add_argument("--force", action="store_true", help="replace an existing non-empty --out")
    e.set_defaults(handler=cmd_export)


def cmd_predict(args) -> int:
    from pipeline.errors import DataError
    from pipeline.progress import say
    from train.predict import OUTPUT_FORMATS, iter_summary, predict, write_rows
    if args.out is not None and args.out.suffix.lower() not in OUTPUT_FORMATS:
        raise DataError(f"--out {args.out}: name a .csv or .json file")
    if args.out is not None:  # checked before the work, not after it
        folder = args.out.parent.resolve()
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise DataError(f"--out {args.out}: {folder} is not a folder this user can write to; create "
                            f"it or choose another --out.")
    rows = predict(args.run, args.inputs, top_k=args.top_k, batch_size=args.batch_size, amp=args.amp,
                   device=args.device)
    # a run of K classes has at most K to list, whatever --top-k asked for
    top_k = min(args.top_k, max((len(r.classes) for r in rows), default=args.top_k))
    text = write_rows(rows, top_k, args.out)
    if text is not None:
        print(text, end="")
    for line in iter_summary(rows):
        say(line)
    if args.out is not None:
        say(f"wrote {args.out}")
    failed = [r for r in rows if r.error]
    if rows and len(failed) == len(rows):
        raise DataError(f"none of the {len(rows)} images could be read (first: {failed[0].error}); "
                        f"check that the inputs are image files (JPEG, PNG, ...) and not damaged.")
    return 1 if failed else 0  # 1: a finding, the unreadable ones are listed with their reason


def cmd_export(args) -> int:
    from pipeline.progress import say
    from train.export import export_run
    out = export_run(args.run, args.out, force=args.force)
    say(f"wrote {out}: model.pt2, model.safetensors, classes.json, transform.json, predict.py, README.md")
    return 0
