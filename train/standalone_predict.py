"""Classify images with an exported ICCL model; needs only torch, numpy and pillow.

    python predict.py IMAGE|FOLDER [...] [--top-k 5] [--json]

A folder stands for the image files below it (.jpg .jpeg .png .bmp .webp, any case; sorted; hidden
entries skipped), as for `iccl predict`. Exit
status: 0 all classified, 1 some files could not be read (their lines say why), 2 none could.

Copied into every `iccl export` folder, next to model.pt2, classes.json and transform.json; it never
imports the project that trained the model. The image transform is the project's evaluation
transform, written out here: EXIF orientation applied, RGB, shorter side resized to
transform["resize"] (Pillow bilinear; new long side int(resize * long / short)), centre crop
transform["crop"]. The program takes the pixel values as float32 (N, 3, crop, crop), 0..255, and
normalises with the mean / std itself.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

HERE = Path(__file__).resolve().parent
# The project's list (pipeline.sources.folder.IMAGE_EXTENSIONS), written out because this file must not
# import the project; a test keeps the two equal.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def image_paths(inputs: list[str]) -> list[str]:
    """Files as given; folders replaced by their image files (recursively, sorted, no hidden ones)."""
    out = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            found = [p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                     and not any(part.startswith(".") for part in p.relative_to(path).parts)]
            out += [str(p) for p in sorted(found, key=lambda p: p.parts)]  # as `iccl predict` orders them
        else:
            out.append(name)
    return out


def load_image(path: str, resize: int, crop: int) -> np.ndarray:
    """(crop, crop, 3) uint8 RGB: upright, shorter side to `resize`, centre crop."""
    with Image.open(path) as im:
        img = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    h, w = img.shape[:2]
    if min(h, w) != resize:
        h, w = (resize, int(resize * w / h)) if h <= w else (int(resize * h / w), resize)
        img = np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR))
    top, left = (h - crop) // 2, (w - crop) // 2
    return img[top:top + crop, left:left + crop]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", help="image files or folders of them")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="one JSON object per image on stdout")
    args = parser.parse_args(argv)
    transform = json.loads((HERE / "transform.json").read_text())
    classes = json.loads((HERE / "classes.json").read_text())
    program = torch.export.load(str(HERE / "model.pt2")).module()
    paths, failed = image_paths(args.images), 0
    if not paths:
        print(f"no image files in {' '.join(args.images)}", file=sys.stderr)
        return 2
    for path in paths:
        try:
            pixels = load_image(path, transform["resize"], transform["crop"])
        except Exception as e:  # an unreadable file: say so and go on with the others
            print(json.dumps({"path": path, "error": f"{type(e).__name__}: {e}"}) if args.json
                  else f"{path}\terror: {e}", flush=True)
            failed += 1
            continue
        x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)[None].float()
        with torch.no_grad():
            probs = torch.softmax(program(x), dim=1)[0]
        p, idx = probs.topk(min(args.top_k, len(classes)))
        top = [(classes[k], float(v)) for k, v in zip(idx.tolist(), p.tolist())]
        if args.json:
            print(json.dumps({"path": path, "top": [{"class": c, "prob": v} for c, v in top]}), flush=True)
        else:
            print(path + "\t" + "\t".join(f"{c} {v:.4f}" for c, v in top), flush=True)
    if failed == len(paths):
        print(f"none of the {len(paths)} images could be read", file=sys.stderr)
        return 2
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
