"""Pictures of a run, drawn after its final evaluation (and again by `iccl eval`):

    per_class.png     per-class top-1 accuracy against the class's training count (log x), the
                      many (> 100) / medium (20-100) / few (< 20) bands shaded
    weight_norms.png  per-class L2 norm of the classifier weights after stage 1 and after stage 2,
                      classes ordered by training count (the paper's Figure 3), and the centroids
    curves.png        losses, learning rate and evaluations over the epochs of both stages

The centroids are L2-normalised EMA buffers (Eq. 1): their norm is 1 for every class seen in stage 1
(0 for a class never seen) and the pre-normalisation norm is not kept, so the norm says nothing. The
centroid panel shows what does: each centroid's cosine similarity to the nearest centroid of another
class (high: the class is crowded against another one in the embedding space).

Each picture has a data function (pure, tested against hand-computed values) and a drawing function.
Drawing uses matplotlib's object API on Agg canvases: no display, no pyplot global state.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from pipeline.atomic import atomic_open
from pipeline.format import FEW_BELOW, MANY_ABOVE, shot_groups
from train import checkpoint, metrics
from train.inference import stage1_path

GROUP_COLOURS = {"many": "#4C72B0", "medium": "#DD8452", "few": "#C44E52"}
STAGE_COLOURS = {"stage1": "#4C72B0", "stage2": "#55A868"}
_EVAL_KEYS = ("top1", "many", "medium", "few")


# --- data --------------------------------------------------------------------------------------
def count_bands(counts: Sequence[int]) -> list[tuple[str, float, float]]:
    """(group, low, high) training-count intervals of many / medium / few that contain a class, for
    shading a log-count axis (half-integer edges, so that a class on a threshold is inside its band)."""
    counts = np.asarray(counts)
    hi = max(float(counts.max()), MANY_ABOVE + 1.0) * 1.5
    bands = [("few", 0.5, FEW_BELOW - 0.5), ("medium", FEW_BELOW - 0.5, MANY_ABOVE + 0.5),
             ("many", MANY_ABOVE + 0.5, hi)]
    return [b for b in bands if ((counts > b[1]) & (counts < b[2])).any()]


def per_class_data(per_class: Sequence[float | None], train_counts: Sequence[int]) -> dict:
    """Per-class accuracy (%) against training count, for the classes the evaluation split has.

    `per_class` is the evaluation's "per_class" list (None for a class without evaluation images),
    `train_counts` the training images per class. Returns class ids, counts, accuracies (float64),
    the bands of `count_bands` and each group's mean per-class accuracy ("group_means")."""
    counts = np.asarray(train_counts, dtype=np.int64)
    if len(per_class) != len(counts):
        raise ValueError(f"{len(per_class)} per-class accuracies for {len(counts)} classes")
    ids = np.array([k for k, a in enumerate(per_class) if a is not None], dtype=np.int64)
    acc = np.array([per_class[k] for k in ids], dtype=np.float64)
    present = set(ids.tolist())
    group_means = {}
    for name, members in shot_groups(counts).items():  # Decoupling's shot_acc, as `evaluate` reports
        values = [per_class[k] for k in members if k in present]
        if values:
            group_means[name] = float(np.mean(values))
    return {"classes": ids, "counts": counts[ids], "accuracy": acc, "bands": count_bands(counts),
            "group_means": group_means}


def weight_norm_data(train_counts: Sequence[int], stage1: dict | None, final: dict | None) -> dict:
    """Per-class norms with the classes ordered by training count, largest first.

    `stage1` / `final` are the saved model files (stage1.pt / final.pt contents) or None when
    absent. Returns "order" (class ids), "counts", "stage1" and "stage2" (‖w_k‖₂ of the classifier
    rows, or None), "centroid_norm" and "centroid_nearest_cos" (or None: no centroids saved, or a
    CE run whose centroids were never updated)."""
    counts = np.asarray(train_counts, dtype=np.int64)
    order = np.argsort(-counts, kind="stable")
    out = {"order": order, "counts": counts[order], "stage1": None, "stage2": None,
           "centroid_norm": None, "centroid_nearest_cos": None}
    for key, saved in (("stage1", stage1), ("stage2", final)):
        if saved is not None:
            w = saved["net"]["classifier.weight"].to(torch.float64)
            out[key] = w.norm(dim=1).numpy()[order]
    centroids = stage1.get("centroids") if stage1 is not None else None
    if centroids is not None and bool(centroids.abs().sum() > 0):
        c = centroids.to(torch.float64)
        norm = c.norm(dim=1)
        unit = c / norm.clamp(min=1e-12)[:, None]
        cos = unit @ unit.T
        seen = norm > 0
        cos[:, ~seen] = float("-inf")  # an unseen class has no direction to be near
        cos.fill_diagonal_(float("-inf"))
        nearest = cos.max(dim=1).values
        nearest[~seen | torch.isinf(nearest)] = float("nan")
        out["centroid_norm"] = norm.numpy()[order]
        out["centroid_nearest_cos"] = nearest.numpy()[order]
    return out


def curve_data(records: list[dict]) -> dict:
    """Series of metrics.jsonl records for curves.png, on one epoch axis: stage-1 epochs first,
    stage-2 epoch e at (number of stage-1 epochs) + e. A step logged at step s of S in epoch e sits
    at e + s/S; an epoch-end loss or an evaluation after epoch e at e + 1. A resumed run logs some
    steps twice: the last record of each (stage, epoch, step) counts.

    Returns {"steps": {stage: {"x", "loss", "lr"}}, "epochs": {stage: {"x", "loss"}},
    "evals": {stage: {"x", "top1", "many", "medium", "few"}}, "stage2_start": float | None}."""
    steps, epochs, evals = {}, {}, {}
    for r in records:
        stage, epoch = r.get("stage"), r.get("epoch")
        if stage is None or epoch is None:
            continue
        if r.get("event") is None and "step" in r:
            steps[(stage, epoch, r["step"])] = r
        elif r.get("event") == "epoch":
            epochs[(stage, epoch)] = r
        elif r.get("event") == "eval":
            evals[(stage, epoch)] = r
    keys = [k[:2] for k in steps] + list(epochs) + list(evals)
    stage1_epochs = [e for s, e in keys if s == "stage1"]
    offset = {"stage1": 0.0, "stage2": float(max(stage1_epochs) + 1) if stage1_epochs else 0.0}
    last_step = {}
    for stage, epoch, step in steps:  # runs logged before "steps" was recorded: the epoch's last step
        last_step[(stage, epoch)] = max(step, last_step.get((stage, epoch), 0))

    out = {"steps": {}, "epochs": {}, "evals": {},
           "stage2_start": offset["stage2"] if any(s == "stage2" for s, _ in keys) else None}
    step_points = sorted(((offset.get(stage, 0.0) + epoch + step / (r.get("steps") or last_step[(stage, epoch)]),
                           stage, r) for (stage, epoch, step), r in steps.items()), key=lambda t: t[0])
    for x, stage, r in step_points:
        s = out["steps"].setdefault(stage, {"x": [], "loss": [], "lr": []})
        s["x"].append(x)
        s["loss"].append(_num(r.get("loss")))
        s["lr"].append(_num(r.get("lr")))
    for source, target, names in ((epochs, out["epochs"], ("loss",)), (evals, out["evals"], _EVAL_KEYS)):
        for (stage, epoch), r in sorted(source.items(), key=lambda kv: offset.get(kv[0][0], 0.0) + kv[0][1]):
            s = target.setdefault(stage, {"x": [], **{k: [] for k in names}})
            s["x"].append(offset.get(stage, 0.0) + epoch + 1.0)
            for k in names:
                s[k].append(_num(r.get(k)))
    return out


def _num(v) -> float:
    """A logged number; None, and non-finite values logged as strings, become NaN (a gap)."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


# --- drawing ------------------------------------------------------------------------------------
def _figure(rows: int, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(8, height * rows), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(rows, 1, i + 1) for i in range(rows)]


def _save(fig, path: Path) -> Path:
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    return path


def draw_per_class(data: dict, path: Path, title: str) -> Path:
    fig, (ax,) = _figure(1, 4.5)
    for name, lo, hi in data["bands"]:
        ax.axvspan(lo, hi, color=GROUP_COLOURS[name], alpha=0.12, lw=0)
    for name, lo, hi in data["bands"]:
        if name in data["group_means"]:
            ax.hlines(data["group_means"][name], lo, hi, color=GROUP_COLOURS[name], lw=2,
                      label=f"{name}: mean of its classes {data['group_means'][name]:.1f}%")
    ax.scatter(data["counts"], data["accuracy"], s=14, color="black", zorder=3, label="one class")
    ax.set_xscale("log")
    ax.set_xlim(max(0.5, data["counts"].min() / 1.5) if len(data["counts"]) else 0.5,
                data["bands"][-1][2] if data["bands"] else None)
    # below the axes, so that it never hides a class
    ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=2, frameon=False)
    ax.set_ylim(-3, 103)
    ax.set_xlabel("training images of the class (log scale)")
    ax.set_ylabel("top-1 accuracy of the class (%)")
    lo = ax.get_xlim()[0]
    for name, b_lo, b_hi in data["bands"]:  # band names at the middle of their visible part
        ax.text((max(b_lo, lo) * b_hi) ** 0.5, 1.02, name, transform=ax.get_xaxis_transform(),
                ha="center", color=GROUP_COLOURS[name])
    ax.set_title(f"per-class accuracy, {title}", pad=18)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def draw_weight_norms(data: dict, path: Path) -> Path:
    has_centroids = data["centroid_nearest_cos"] is not None
    fig, axes = _figure(2 if has_centroids else 1, 3.6)
    x = np.arange(len(data["order"]))
    ax = axes[0]
    for key, label in (("stage1", "after stage 1"), ("stage2", "after stage 2 (rebalanced)")):
        if data[key] is not None:
            ax.plot(x, data[key], marker=".", color=STAGE_COLOURS[key], label=label)
    ax.set_ylabel("‖w_k‖₂ of the classifier")
    ax.set_title("classifier weight norms, classes by training count (largest first)")
    ax.legend()
    if has_centroids:
        axes[1].plot(x, data["centroid_nearest_cos"], marker=".", color="#8172B2")
        axes[1].set_ylabel("cosine to nearest\nother centroid")
        axes[1].set_title("stage-1 centroids (unit norm by construction): crowding in the embedding space")
    counts = data["counts"]
    for ax in axes:
        ax.grid(alpha=0.3)
        for name, ids in (("many", counts > MANY_ABOVE), ("few", counts < FEW_BELOW)):
            if ids.any():
                idx = np.flatnonzero(ids)
                ax.axvspan(idx.min() - 0.5, idx.max() + 0.5, color=GROUP_COLOURS[name], alpha=0.1, lw=0)
    from matplotlib.ticker import MaxNLocator
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1].set_xlabel("class rank by training count (shaded: many, left; few, right)")
    return _save(fig, path)


def draw_curves(data: dict, path: Path) -> Path:
    fig, (loss_ax, lr_ax, eval_ax) = _figure(3, 3.0)
    for stage, s in data["steps"].items():
        colour = STAGE_COLOURS.get(stage, "grey")
        # markers too, so that a short run with one logged step per stage still shows its points
        loss_ax.plot(s["x"], s["loss"], ".-", ms=3, color=colour, alpha=0.5, lw=1, label=f"{stage} (logged steps)")
        lr = np.asarray(s["lr"])
        lr_ax.plot(np.asarray(s["x"])[lr > 0], lr[lr > 0], ".-", ms=3, color=colour, label=stage)
    for stage, s in data["epochs"].items():
        loss_ax.plot(s["x"], s["loss"], "o-", ms=3, color=STAGE_COLOURS.get(stage, "grey"),
                     label=f"{stage} (epoch mean)")
    for stage, s in data["evals"].items():
        for k, style in zip(_EVAL_KEYS, ("k", GROUP_COLOURS["many"], GROUP_COLOURS["medium"],
                                         GROUP_COLOURS["few"])):
            if np.isfinite(s[k]).any():
                eval_ax.plot(s["x"], s[k], "o-" if stage == "stage1" else "s--", ms=4, color=style,
                             label=f"{k} ({stage})")
    loss_ax.set_ylabel("loss")
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_yscale("log")
    eval_ax.set_ylabel("top-1 (%)")
    eval_ax.set_xlabel("epoch (stage 2 follows stage 1)")
    for ax in (loss_ax, lr_ax, eval_ax):
        ax.grid(alpha=0.3)
        if data["stage2_start"] is not None:
            ax.axvline(data["stage2_start"], color="grey", ls=":", lw=1)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small", ncols=2)
    loss_ax.set_title("training curves (metrics.jsonl)")
    return _save(fig, path)


def draw_run(run_dir: Path, evaluation: dict, train_counts: Sequence[int], title: str) -> list[Path]:
    """Draw the three pictures of a run into `run_dir` (each written atomically); returns their paths.

    `evaluation` is the result of `train.evaluate.evaluate` (its "per_class"), `train_counts` the
    training images per class; the weights come from the stage-1 model (`stage1_path`) / final.pt and the curves from
    metrics.jsonl in `run_dir`, whichever of them exist."""
    run_dir = Path(run_dir)
    paths = {"stage1.pt": stage1_path(run_dir), "final.pt": run_dir / "final.pt"}
    saved = {name: checkpoint.load(path) if path.is_file() else None for name, path in paths.items()}
    return [
        draw_per_class(per_class_data(evaluation["per_class"], train_counts), run_dir / "per_class.png", title),
        draw_weight_norms(weight_norm_data(train_counts, saved["stage1.pt"], saved["final.pt"]),
                          run_dir / "weight_norms.png"),
        draw_curves(curve_data(metrics.read(run_dir / "metrics.jsonl")), run_dir / "curves.png"),
    ]
