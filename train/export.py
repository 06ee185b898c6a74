"""`iccl export`: a run's final model as files that run without this project.

    OUT/model.pt2          torch.export program (`torch.export.load(path).module()`): float32
                           (N, 3, crop, crop) RGB pixel values in 0..255, any N >= 1 -> float32
                           (N, K) logits; it normalises with the run's mean / std itself
    OUT/model.safetensors  the network's state dict (encoder.*, classifier.*, projector.*: the
                           names of the project's ICCLNet; inference needs encoder + classifier)
    OUT/classes.json       class names, logit k is classes[k]
    OUT/transform.json     the evaluation transform: resize, crop, mean, std, and what the program takes
    OUT/predict.py         a standalone example (torch, numpy, pillow)
    OUT/README.md          the above, for whoever receives the folder

The program computes in float32 on the CPU whatever the run's `amp` setting; it reproduces
`iccl predict --amp fp32` (tested to 1e-5 in probability). The folder is written atomically
(`pipeline.atomic.atomic_dir`).
"""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes

from pipeline.atomic import atomic_dir
from pipeline.errors import DataError
from train.config import Config
from train.inference import load_model

_STANDALONE = Path(__file__).with_name("standalone_predict.py")
MAX_BATCH = 1 << 16  # the exported batch dimension's upper bound (torch.export needs one)


class ExportedClassifier(torch.nn.Module):
    """Pixel values 0..255 -> logits: the affine normalisation of `pipeline.mixing.normalize`
    (x·scale + shift with scale = 1/(255·std), shift = −mean/std), encoder, classifier."""

    def __init__(self, net: torch.nn.Module, mean, std):
        super().__init__()
        self.encoder, self.classifier = net.encoder, net.classifier
        m = torch.tensor(mean, dtype=torch.float64).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=torch.float64).view(1, -1, 1, 1)
        self.register_buffer("scale", (1.0 / (255.0 * s)).float())
        self.register_buffer("shift", (-m / s).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.encoder(torch.addcmul(self.shift, x, self.scale)))


def transform_record(cfg: Config) -> dict:
    return {
        "resize": cfg.eval_resize, "crop": cfg.image_size, "mean": list(cfg.mean), "std": list(cfg.std),
        "interpolation": "bilinear (Pillow), shorter side to resize, long side int(resize * long / short)",
        "exif_orientation": "applied before resizing",
        "program_input": "float32 (N, 3, crop, crop) RGB pixel values in 0..255, NOT normalised: "
                         "the program applies (x / 255 - mean) / std itself",
        "program_output": "float32 (N, num_classes) logits; softmax gives probabilities",
        "arch": cfg.arch,
    }


def export_run(run_dir: Path, out: Path, force: bool = False) -> Path:
    """Write the export folder `out` for the final model of `run_dir`; returns `out`.

    Raises DataError when the run has no final.pt, `out` is the current folder, the run or a folder
    above them, or `out` exists, is not empty and `force` is not set (or is a file)."""
    out = Path(out)
    here, run = Path.cwd().resolve(), Path(run_dir).resolve()
    if out.resolve() in (here, *here.parents, run, *run.parents):
        raise DataError(f"--out {out}: is the current folder, the run or a folder holding them, which an "
                        f"export never replaces. Choose a new folder, e.g. --out exported/{run.name}.")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not force)):
        raise DataError(f"--out {out}: exists and is not an empty folder. Choose a new folder, or pass "
                        f"--force to replace it.")
    cfg, classes, net = load_model(run_dir)
    module = ExportedClassifier(net.float().cpu().eval(), cfg.mean, cfg.std).eval()
    example = torch.zeros(2, 3, cfg.image_size, cfg.image_size)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with torch.no_grad():
        program = torch.export.export(module, (example,), dynamic_shapes={"x": {0: batch}})
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    meta = {"arch": cfg.arch, "num_classes": str(len(classes)), "proj_dim": str(cfg.proj_dim)}
    with atomic_dir(out, replace=force) as tmp:
        buf = io.BytesIO()
        torch.export.save(program, buf)
        (tmp / "model.pt2").write_bytes(buf.getvalue())
        (tmp / "model.safetensors").write_bytes(safetensors_bytes(state, metadata=meta))
        (tmp / "classes.json").write_text(json.dumps(classes, indent=1) + "\n")
        (tmp / "transform.json").write_text(json.dumps(transform_record(cfg), indent=1) + "\n")
        shutil.copyfile(_STANDALONE, tmp / "predict.py")
        (tmp / "README.md").write_text(_readme(cfg, classes))
    return out


def _readme(cfg: Config, classes: list[str]) -> str:
    return f"""# Exported ICCL classifier ({cfg.arch}, {len(classes)} classes)

- `model.pt2`: a `torch.export` program. Input: float32 `(N, 3, {cfg.image_size}, {cfg.image_size})` RGB
  pixel values in 0..255, not normalised (the program normalises with the mean / std below).
  Output: float32 `(N, {len(classes)})` logits; `classes.json[k]` names logit k.
- `transform.json`: how to make the input from an image: apply the EXIF orientation, resize the
  shorter side to {cfg.eval_resize} (bilinear), centre crop {cfg.image_size};
  mean {list(cfg.mean)}, std {list(cfg.std)} (0..1 units).
- `model.safetensors`: the weights (`encoder.*`, `classifier.*`, and the training-time `projector.*`).
- `predict.py`: an example that needs only torch, numpy and pillow:

```bash
python predict.py photo.jpg other.png --top-k 3
```

```python
import torch
program = torch.export.load("model.pt2").module()
logits = program(pixels)          # pixels: float32 (N, 3, {cfg.image_size}, {cfg.image_size}), 0..255
```
"""
