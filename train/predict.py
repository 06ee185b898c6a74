"""`iccl predict`: the final (rebalanced) model of a run applied to image files, folder trees or
converted dataset splits, top-k class names and probabilities per image.

Inputs, each one of:
    an image file          read with Pillow (any format it reads), EXIF orientation applied, RGB
    a folder               every image below it (.jpg .jpeg .png .bmp .webp, any case; hidden entries
                           skipped), recursively, in sorted order
    a converted dataset    DATA/SPLIT, or DATA alone for the run's evaluation split (eval_split)

Files get the run's evaluation transform on the host (`pipeline.loaders.reference.eval_transform`:
shorter side to eval_resize, bilinear, centre crop image_size), the code the resident and reference
evaluation loaders run. A converted split is read by the evaluation loader the run's `loader`
setting picks, with the evaluation batch size, exactly as `iccl eval` reads it, so the top-1 class
is the one `iccl eval` counts. Logits come from `train.inference.classify` under the run's autocast
setting (`amp`) unless `amp` is given; probabilities are softmax(logits) in float32.

An image that cannot be read or decoded gets a row with its error and no classes; the rest goes on.
"""
from __future__ import annotations

import csv
import io
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from pipeline import codecs
from pipeline.atomic import atomic_open
from pipeline.dataset import ShardedSplit
from pipeline.device import autocast_dtype, pick_device
from pipeline.errors import DataError
from pipeline.format import META_FILE, read_meta
from pipeline.loaders import make_eval_loader
from pipeline.loaders.base import EvalSpec
from pipeline.loaders.reference import eval_transform, try_decode
from pipeline.progress import progress
from pipeline.sources.folder import IMAGE_EXTENSIONS
from train.config import Config
from train.inference import autocast_for, classify, load_model, place

OUTPUT_FORMATS = (".csv", ".json")


@dataclass
class Row:
    """One image's result. `path` is the file, or the split folder with `sample` its sample number;
    `label` the true class name when the input is a converted split."""
    path: str
    sample: int | None = None
    label: str | None = None
    classes: list[str] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)
    error: str | None = None


@dataclass
class Predictor:
    """A run's final model, ready to classify uint8 batches (see module docstring)."""
    cfg: Config
    classes: list[str]
    net: torch.nn.Module
    device: torch.device
    amp_dtype: torch.dtype | None
    top_k: int

    @property
    def spec(self) -> EvalSpec:
        return EvalSpec(size=self.cfg.image_size, resize=self.cfg.eval_resize)

    def probabilities(self, x_u8: torch.Tensor) -> torch.Tensor:
        """(N, K) float32 softmax probabilities of a uint8 (N, 3, H, W) batch, on the CPU."""
        logits = classify(self.net, x_u8.to(self.device), mean=self.cfg.mean, std=self.cfg.std,
                          autocast=lambda: autocast_for(self.device, self.amp_dtype))
        return torch.softmax(logits, dim=1).cpu()

    def top(self, probs: torch.Tensor) -> list[tuple[list[str], list[float]]]:
        p, idx = probs.topk(min(self.top_k, probs.shape[1]), dim=1)
        return [([self.classes[k] for k in ks], [float(v) for v in vs])
                for ks, vs in zip(idx.tolist(), p.tolist())]


def load_predictor(run_dir: Path, top_k: int = 5, amp: str | None = None, device: str = "auto") -> Predictor:
    """The final model of `run_dir` on `device`; `amp` None: the run's setting (as `iccl eval`)."""
    if top_k < 1:
        raise DataError(f"--top-k {top_k}: must be at least 1")
    cfg, classes, net = load_model(run_dir)
    dev = pick_device(device)
    net = place(net, dev, cfg.channels_last).eval()
    return Predictor(cfg, classes, net, dev, autocast_dtype(dev, amp or cfg.amp), top_k)


# --- inputs -------------------------------------------------------------------------------------
def read_image(path: str | os.PathLike) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB, upright: the EXIF orientation is applied as at
    conversion (`pipeline.codecs.exif_upright`), as a photo viewer shows it. Raises whatever Pillow
    raises."""
    with Image.open(path) as im:
        return np.asarray(codecs.exif_upright(im)[0].convert("RGB"))


def images_under(folder: Path) -> list[Path]:
    """Image files below `folder`, recursively, sorted, hidden files and folders skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # os.walk descends these
        found += [Path(dirpath) / n for n in sorted(filenames)
                  if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found)  # by path components: a folder's files and subfolders interleave by name


def converted_split(path: Path, eval_split: str) -> tuple[Path, str] | None:
    """(dataset root, split) when `path` is a converted dataset (its evaluation split) or one of
    its split folders; None for anything else."""
    if (path / META_FILE).is_file():
        meta = read_meta(path)
        if eval_split not in meta.get("splits", {}):
            raise DataError(f"{path}: a converted dataset without the run's evaluation split "
                            f"{eval_split!r}; pass one of its splits as {path}/SPLIT "
                            f"({', '.join(sorted(meta.get('splits', {})))}).")
        return path, eval_split
    if (path.parent / META_FILE).is_file():
        return path.parent, path.name
    return None


def expand_inputs(inputs: Sequence[str | os.PathLike], eval_split: str) -> list:
    """Each input as a Path (an image file) or a (root, split) pair, folders expanded to their
    images. Raises DataError for a path that does not exist or a folder without images."""
    out = []
    for given in inputs:
        path = Path(given)
        if path.is_file():
            out.append(path)
        elif path.is_dir():
            split = converted_split(path, eval_split)
            if split is not None:
                out.append(split)
                continue
            found = images_under(path)
            if not found:
                raise DataError(f"{path}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder or "
                                f"below it. Pass image files, a folder of images or a converted dataset.")
            out += found
        else:
            raise DataError(f"{path}: no such file or folder.")
    return out


# --- prediction ---------------------------------------------------------------------------------
def predict(run_dir: Path, inputs: Sequence[str | os.PathLike], *, top_k: int = 5,
            batch_size: int | None = None, amp: str | None = None, device: str = "auto") -> list[Row]:
    """Rows in input order (a folder's images sorted, a split's samples in index order)."""
    model = load_predictor(run_dir, top_k, amp, device)
    batch_size = batch_size or model.cfg.eval_batch_size
    if batch_size < 1:
        raise DataError(f"--batch-size {batch_size}: must be at least 1")
    items = expand_inputs(inputs, model.cfg.eval_split)
    rows: list[Row] = []
    files: list[Path] = []
    for item in items + [None]:  # None flushes the files collected before a split (or the end)
        if isinstance(item, Path):
            files.append(item)
            continue
        if files:
            rows += _predict_files(model, files, batch_size)
            files = []
        if item is not None:
            rows += _predict_split(model, ShardedSplit(*item), batch_size)
    return rows


def _decode_file(path: Path, spec: EvalSpec) -> np.ndarray | str:
    """The transformed pixels, or the error message for an unreadable file."""
    try:
        img = read_image(path)
    except Exception as e:  # Pillow signals bad files with many types; each is that file's error
        return f"{type(e).__name__}: {e}"
    return eval_transform(img, spec)  # a DataError here is the run's settings, not the file


def _predict_files(model: Predictor, files: list[Path], batch_size: int) -> list[Row]:
    rows = []
    with progress(len(files), "predicting", unit="images") as bar, \
            ThreadPoolExecutor(max(1, model.cfg.workers)) as pool:
        for start in range(0, len(files), batch_size):
            chunk = files[start:start + batch_size]
            decoded = list(pool.map(lambda p: _decode_file(p, model.spec), chunk))
            good = [k for k, d in enumerate(decoded) if not isinstance(d, str)]
            tops = []
            if good:
                x = torch.from_numpy(np.stack([decoded[k] for k in good])).permute(0, 3, 1, 2)
                tops = model.top(model.probabilities(x))
            by_pos = dict(zip(good, tops))
            for k, path in enumerate(chunk):
                if k in by_pos:
                    rows.append(Row(str(path), classes=by_pos[k][0], probs=by_pos[k][1]))
                else:
                    rows.append(Row(str(path), error=decoded[k]))
            bar.advance(len(chunk))
    return rows


def _predict_split(model: Predictor, split: ShardedSplit, batch_size: int) -> list[Row]:
    if split.classes != model.classes:
        raise DataError(f"{split.root}: its classes differ from those the run was trained on "
                        f"({len(split.classes)} vs {len(model.classes)}, or another order). Pass a dataset "
                        f"converted with the same classes.")
    loader = make_eval_loader(split, loader=model.cfg.loader, batch_size=batch_size, spec=model.spec,
                              device=model.device, workers=model.cfg.workers)
    tops, labels = [], []
    try:
        with progress(len(split), f"predicting {split.dir}", unit="images") as bar:
            for x, y, *_ in loader:
                tops += model.top(model.probabilities(x))
                labels.append(y.cpu())
                bar.advance(len(y))
        skipped = int(getattr(loader, "skipped", 0))
    finally:
        loader.close()
    kept = np.arange(len(split))
    corrupt: dict[int, str] = {}
    if skipped:  # the loader left undecodable samples out: find them to keep rows and samples aligned
        corrupt = {i: "corrupt image: it does not decode" for i in kept
                   if try_decode(split, int(i), codecs.decode) is None}
        kept = np.array([i for i in kept if i not in corrupt], dtype=np.int64)
    got = torch.cat(labels).numpy() if labels else np.zeros(0, np.int64)
    if len(got) != len(kept) or not np.array_equal(got, split.labels[kept]):
        raise DataError(f"{split.dir}: the evaluation loader returned {len(got)} samples where "
                        f"{len(kept)} were expected; run `iccl verify {split.root}`.")
    rows = {int(i): Row(str(split.dir), int(i), split.classes[split.labels[i]], *top)
            for i, top in zip(kept, tops)}
    rows.update({i: Row(str(split.dir), i, split.classes[split.labels[i]], error=e) for i, e in corrupt.items()})
    return [rows[i] for i in range(len(split))]


# --- output -------------------------------------------------------------------------------------
def csv_header(top_k: int) -> list[str]:
    return (["path", "sample", "label"] + [c for j in range(1, top_k + 1) for c in (f"class_{j}", f"prob_{j}")]
            + ["error"])


def write_rows(rows: list[Row], top_k: int, out: Path | None) -> str | None:
    """CSV (header of `csv_header`) or JSON (a list of objects) by the suffix of `out`, written
    atomically; without `out`, the CSV text is returned (for stdout)."""
    if out is not None and out.suffix.lower() not in OUTPUT_FORMATS:
        raise DataError(f"--out {out}: name a .csv or .json file")
    if out is not None and out.suffix.lower() == ".json":
        records = [{"path": r.path, "sample": r.sample, "label": r.label,
                    "top": [{"class": c, "prob": p} for c, p in zip(r.classes, r.probs)], "error": r.error}
                   for r in rows]
        with atomic_open(out, "w") as f:
            json.dump(records, f, indent=1)
            f.write("\n")
        return None
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(csv_header(top_k))
    for r in rows:
        cells = [x for c, p in zip(r.classes, r.probs) for x in (c, f"{p:.6g}")]
        cells += [""] * (2 * top_k - len(cells))
        writer.writerow([r.path, "" if r.sample is None else r.sample, r.label or ""] + cells + [r.error or ""])
    if out is None:
        return buf.getvalue()
    with atomic_open(out, "wb") as f:  # names from non-UTF-8 folder names keep their original bytes
        f.write(buf.getvalue().encode("utf-8", "surrogateescape"))
    return None


def iter_summary(rows: list[Row]) -> Iterator[str]:
    """Lines for the terminal: how many images, how many failed, top-1 accuracy where labels exist."""
    failed = [r for r in rows if r.error]
    yield f"{len(rows)} images, {len(rows) - len(failed)} classified" + (
        f", {len(failed)} unreadable (see the error column)" if failed else "")
    labelled = [r for r in rows if r.label is not None and not r.error]
    if labelled:
        hits = sum(r.classes[0] == r.label for r in labelled)
        yield f"top-1 on the {len(labelled)} labelled samples: {100.0 * hits / len(labelled):.2f}%"
