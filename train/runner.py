"""A training run from start to report, resumable at any checkpoint.

Run directory:
    config.json     the resolved config (a resumed run must not change what it trains)
    checkpoint.pt   the latest state (stage, epoch, step, weights, centroids, optimiser)
    stage1.pt       the stage-1 model (the distillation teacher, and `iccl eval --stage 1`) and centroids
    stage1_source.json  instead of stage1.pt in a run made by `iccl stage2 --from`: where it came from
    final.pt        the model after classifier rebalancing
    metrics.jsonl   training metrics and evaluations, one JSON object per line
    report.json     the evaluations at the end of each stage
    *.png           per_class, weight_norms, curves (train/plots.py), after the final evaluation
"""
from __future__ import annotations

import json
import os
import time
from functools import partial
from pathlib import Path

import torch

from model.centroids import CentroidBank
from model.network import ICCLNet, build_network
from model.pretrained import load_pretrained
from pipeline.atomic import write_json
from pipeline.errors import DataError
from train import checkpoint
from train.bn_stats import recompute_bn_stats
from train.config import STAGE2_TUNED, Config, load_config_json
from train.context import Context, build_context
from train.distributed import barrier
from train.evaluate import evaluate
from train.inference import (STAGE1_SOURCE, classify, place, read_stage1_source, saved_model_path,
                             stage1_path)
from train.loop import resume_stage, run_epochs, stoppable
from train.plots import draw_run
from train.stage1 import Stage1
from train.stage2_methods import run_stage2


# Settings that may differ when a run is resumed: they change how fast it runs, not what it learns.
RESUMABLE_CHANGES = {"data", "loader", "workers", "device", "compile", "eval_every", "eval_batch_size",
                     "checkpoint_minutes", "log_every", "tensorboard"}


def tuned_on_val(cfg: Config) -> bool:
    """Whether the run's stage 2 chose a value on its validation split (a grid of more than one)."""
    return cfg.stage2 in STAGE2_TUNED and len(getattr(cfg, STAGE2_TUNED[cfg.stage2][0])) > 1


# What a run has made once it has trained or evaluated anything: its settings are then fixed.
_RESULTS = ("checkpoint.pt", "stage1.pt", "final.pt", "report.json")


def check_resume_config(run_dir: Path, cfg: Config, stage1_source: dict | None = None) -> None:
    """Refuse an --out that holds something else: files of no run (dot-files, such as an atomic
    write's temporary, aside), or a run with other settings, or from another stage 1
    (`stage1_source`'s SHA-256), that has results (`_RESULTS`). A run that stopped before any result
    trained nothing: a corrected command may start it again with other settings, and rank 0 removes
    what the earlier attempt logged."""
    path = run_dir / "config.json"
    if run_dir.is_dir() and not path.is_file():
        foreign = sorted(p.name for p in run_dir.iterdir()
                         if p.name not in ("metrics.jsonl", "tensorboard") and not p.name.startswith("."))
        if foreign:
            raise DataError(f"--out {run_dir}: holds {', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}"
                            f", not a run; choose a new or empty folder.")
    if not path.is_file():
        return
    old = load_config_json(path)
    diff = {k: (v, getattr(cfg, k)) for k, v in old.to_dict().items()
            if k not in RESUMABLE_CHANGES and getattr(cfg, k) != v}
    before = read_stage1_source(run_dir) if stage1_source else None
    if before and before.get("stage1_sha256") != stage1_source["stage1_sha256"]:
        diff["stage 1"] = (before["stage1"], stage1_source["stage1"] + " (another file)")
    if diff and not any((run_dir / name).is_file() for name in _RESULTS):
        if int(os.environ.get("RANK", "0")) == 0:
            for name in ("metrics.jsonl", STAGE1_SOURCE):
                (run_dir / name).unlink(missing_ok=True)
        return
    if diff:
        shown = ", ".join(f"{k}: {a!r} in the run, {b!r} now" for k, (a, b) in sorted(diff.items()))
        raise DataError(f"{run_dir} holds a run with other settings ({shown}). Resume it with the command "
                        f"that made it, or `iccl train --out {run_dir}` alone; or choose another --out.")


def new_network(cfg: Config, num_classes: int) -> ICCLNet:
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    try:
        return build_network(cfg.arch, num_classes, cfg.proj_dim, cfg.proj_hidden)
    except ValueError as e:
        raise DataError(f"--set arch={cfg.arch}: {e}") from None


def start_from_pretrained(ctx: Context, net: ICCLNet) -> dict:
    """Load `cfg.pretrained` into the encoder of a new run; say and log what fitted.

    Returns the record of `model.pretrained.load_pretrained` (also in report.json and metrics.jsonl).
    """
    try:
        record = load_pretrained(net.encoder, ctx.cfg.pretrained)
    except ValueError as e:
        raise DataError(str(e)) from None
    ctx.say(f"pretrained: {record['loaded']} encoder tensors loaded from {record['path']}; "
            f"missing {len(record['missing'])}{_first(record['missing'])}, "
            f"unexpected {len(record['unexpected'])}{_first(record['unexpected'])} (not loaded: the "
            f"classifier always starts fresh)")
    ctx.metrics.write(stage="stage1", event="pretrained", **record)
    return record


def _first(keys: list[str], n: int = 4) -> str:
    return f" ({', '.join(keys[:n])}{', ...' if len(keys) > n else ''})" if keys else ""


def prepare(net: ICCLNet, ctx: Context) -> ICCLNet:
    return place(net, ctx.device, ctx.cfg.channels_last)


def predictor(ctx: Context, net: ICCLNet):
    return partial(classify, net, mean=ctx.cfg.mean, std=ctx.cfg.std, autocast=ctx.autocast)


def run_eval(ctx: Context, net: ICCLNet, split: str = "eval", stoppable_pass: bool = True) -> dict:
    """Top-1 overall and by many / medium / few (train.evaluate) on the evaluation split, or with
    split="val" on the validation split (val_split, or the carve of val_fraction > 0). A carve keeps
    the training imbalance, so the result adds "class_mean": the mean of the per-class accuracies
    (%), the number to compare choices by, as the balanced test split would. `stoppable_pass` False:
    a stop signal waits for its end (the evaluations every `eval_every` epochs, which come before
    the epoch's checkpoint)."""
    was_training = net.training
    net.eval()
    batches = ctx.eval_batches() if split == "eval" else ctx.plain_batches("val")
    if stoppable_pass:
        batches = stoppable(ctx, batches, "the evaluation")
    result = evaluate(predictor(ctx, net), batches, ctx.num_classes, ctx.groups, ctx.device)
    net.train(was_training)
    if split == "val":
        present = [a for a in result["per_class"] if a is not None]
        result["class_mean"] = sum(present) / len(present)
    return result


def _check_data(ctx: Context, state: dict) -> None:
    if state.get("num_classes") != ctx.num_classes:
        raise DataError(f"{ctx.cfg.data} has {ctx.num_classes} classes but the run in {ctx.run_dir} was "
                        f"trained with {state.get('num_classes')}. Pass the dataset the run was made with.")


def train(cfg: Config, run_dir: Path, stage1_source: dict | None = None) -> dict:
    """Train (or resume) both stages; returns the report. `stage1_source` (from
    `train.stage2_from.stage2_run_config`) starts a new run at stage 2 from another run's stage 1."""
    run_dir = Path(run_dir)
    check_resume_config(run_dir, cfg, stage1_source)
    new_folder = not run_dir.exists()
    try:
        ctx = build_context(cfg, run_dir)
        try:
            with checkpoint.stop_signals():
                return _train(ctx, stage1_source)
        finally:
            ctx.close()
    except DataError:
        # A run refused before it wrote anything leaves nothing behind, not even its empty folder
        # (removed by the process that owns the run directory, rank 0, never by the others).
        if new_folder and int(os.environ.get("RANK", "0")) == 0 and run_dir.is_dir() \
                and not any(run_dir.iterdir()):
            run_dir.rmdir()
        raise


def _train(ctx: Context, stage1_source: dict | None = None) -> dict:
    cfg, run_dir = ctx.cfg, ctx.run_dir
    ckpt_path = run_dir / "checkpoint.pt"
    source = stage1_source or read_stage1_source(run_dir)
    if ckpt_path.is_file():
        state = checkpoint.load(ckpt_path)
    elif source:  # stage 2 from another run's stage1.pt: nothing copied, its path recorded
        saved = checkpoint.load(Path(source["stage1"]))
        state = {"stage": 2, "epoch": 0, "step": 0, "num_classes": saved["num_classes"], "net": saved["net"]}
    else:
        state = {"stage": 1, "epoch": 0, "step": 0}
    net = new_network(cfg, ctx.num_classes)
    # A new run's weights file is loaded before anything is written, so that a refused file can be
    # replaced and the run started again into the same --out; a resumed run has its own weights.
    pretrained = start_from_pretrained(ctx, net) if cfg.pretrained and "net" not in state else None
    if ctx.dist.is_main:
        write_json(run_dir / "config.json", cfg.to_dict())
        if stage1_source:
            write_json(run_dir / STAGE1_SOURCE, stage1_source)
    if "net" in state:
        _check_data(ctx, state)
        stage_no, epoch, step = state["stage"], state["epoch"], state["step"]
        total = cfg.epochs if stage_no == 1 else cfg.s2_epochs
        where = ("already finished (both stages)" if stage_no == "done" else
                 f"stage {stage_no}, after epoch {epoch} of {total}" if step == 0 else
                 f"stage {stage_no}, epoch {epoch + 1} of {total}, step {step}")
        ctx.say(f"resuming {run_dir}: {where}" if ckpt_path.is_file() else
                f"{run_dir}: stage 2 from {source['stage1']}")
    report_path = run_dir / "report.json"
    report = read_report(report_path)
    if source and "stage1" not in report and source.get("stage1_eval"):
        report["stage1"] = source["stage1_eval"]
        if source.get("stage1_val") and source.get("val_split", "") == cfg.val_split:
            report["stage1_val"] = source["stage1_val"]  # the same validation split
    t0 = time.monotonic()

    def saver(stage_no, stage):
        def save(epoch, step):
            if ctx.dist.is_main:
                checkpoint.save(ckpt_path, {"stage": stage_no, "epoch": epoch, "step": step,
                                            "num_classes": ctx.num_classes, "config": cfg.to_dict(),
                                            "skipped_images": stage.skipped_images,
                                            "epoch_loss": stage.epoch_loss, **stage.state_dict()})
            barrier()
        return save

    def evaluator(stage, every):
        def on_epoch_end(epoch):
            if every and (epoch + 1) % every == 0 and epoch + 1 < stage.epochs:
                result = run_eval(ctx, stage.net, stoppable_pass=False)
                ctx.metrics.write(stage=stage.name, event="eval", epoch=epoch, **_short(result))
        return on_epoch_end

    if pretrained:
        report["pretrained"] = pretrained
    net = prepare(net, ctx)
    if state["stage"] == 1:
        bank = CentroidBank(ctx.num_classes, cfg.proj_dim, cfg.centroid_momentum).to(ctx.device)
        stage = Stage1(ctx, net, bank)
        if "net" in state:
            resume_stage(stage, state)
        run_epochs(ctx, stage, state["epoch"], state["step"], saver(1, stage), evaluator(stage, cfg.eval_every))
        recompute_bn_stats(ctx, stage)  # before anything uses evaluation mode (see train.bn_stats)
        if ctx.dist.enabled:
            ctx.metrics.write(stage="stage1", event="centroid_check",
                              max_rank_difference=centroid_spread(bank.centroids))
        report["stage1"] = run_eval(ctx, net)
        if ctx.val is not None:  # what choices are made on (the test split never is)
            report["stage1_val"] = run_eval(ctx, net, "val")
        report["corrupt_training_images"] = {"stage1": stage.skipped_images}
        ctx.metrics.write(stage="stage1", event="eval", epoch=cfg.epochs - 1, **_short(report["stage1"]))
        if ctx.dist.is_main:
            checkpoint.save(run_dir / "stage1.pt",  # the centroids feed weight_norms.png
                            {**_model_file(cfg, ctx, net), "centroids": bank.centroids.cpu()})
            write_json(report_path, report)
            checkpoint.save(ckpt_path, {"stage": 2, "epoch": 0, "step": 0, "num_classes": ctx.num_classes,
                                        "config": cfg.to_dict(), "net": net.state_dict()})
        barrier()
        state = {"stage": 2, "epoch": 0, "step": 0, "net": net.state_dict()}
    if state["stage"] == 2:
        if ctx.val is not None and "stage1_val" not in report and not (state["epoch"] or state["step"]):
            # a stage 2 from another run, on another validation split than that run's
            net.load_state_dict(state["net"])  # the stage-1 model: this run has not trained yet
            report["stage1_val"] = run_eval(ctx, net, "val")
            if ctx.dist.is_main:
                write_json(report_path, report)
        choice = run_stage2(ctx, net, state,
                            stage1_path(run_dir) if not stage1_source else Path(source["stage1"]),
                            lambda stage: saver(2, stage), lambda stage: evaluator(stage, cfg.eval_every))
        report.setdefault("corrupt_training_images", {})["stage2"] = choice.pop("corrupt_training_images", 0)
        report["stage2_choice"] = choice
        report["stage2"] = run_eval(ctx, net)
        if ctx.val is not None:
            report["stage2_val"] = run_eval(ctx, net, "val")
        ctx.metrics.write(stage="stage2", event="eval", epoch=cfg.s2_epochs - 1, **_short(report["stage2"]))
        report["train_seconds_this_session"] = round(time.monotonic() - t0, 1)
        if ctx.dist.is_main:
            checkpoint.save(run_dir / "final.pt", _model_file(cfg, ctx, net))
            write_json(report_path, report)
            checkpoint.save(ckpt_path, {"stage": "done", "epoch": 0, "step": 0,
                                        "num_classes": ctx.num_classes, "config": cfg.to_dict(),
                                        "net": net.state_dict()})
            draw_run(run_dir, report["stage2"], ctx.train.class_counts, "stage 2 (rebalanced)")
        barrier()
    return report


def centroid_spread(centroids: torch.Tensor) -> float:
    """Largest difference of any centroid entry between processes (0.0 when they agree, as they must)."""
    import torch.distributed as dist
    hi, lo = centroids.clone(), centroids.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    return float((hi - lo).abs().max())


def read_report(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _model_file(cfg: Config, ctx: Context, net: ICCLNet) -> dict:
    return {"config": cfg.to_dict(), "num_classes": ctx.num_classes, "classes": ctx.train.classes,
            "net": net.state_dict()}


def _short(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "per_class"}


def evaluate_run(run_dir: Path, stage: int = 2, data: str | None = None, loader: str | None = None,
                 split: str | None = None) -> dict:
    """Evaluate the saved model of a run (final.pt, or stage1.pt with stage=1) on its eval split,
    or on `split` of its dataset (e.g. "test" for a run whose choices were made on "val")."""
    run_dir = Path(run_dir)
    saved = checkpoint.load(saved_model_path(run_dir, stage))
    cfg = Config.from_dict(saved["config"])
    cfg.data = data or cfg.data
    cfg.loader = loader or cfg.loader
    if split and split == cfg.val_split and stage == 2 and tuned_on_val(cfg):
        setting, name = STAGE2_TUNED[cfg.stage2]
        raise DataError(f"--split {split}: the stage 2 of {run_dir} chose its {name} ({setting}) on this "
                        f"split, so its accuracy there flatters the choice; it is in {run_dir}/report.json "
                        f"(stage2_val). Evaluate on another split (e.g. --split test).")
    cfg.eval_split = split or cfg.eval_split
    ctx = build_context(cfg, run_dir, training=False)
    try:
        _check_data(ctx, saved)
        net = prepare(new_network(cfg, ctx.num_classes), ctx)
        net.load_state_dict(saved["net"])
        result = run_eval(ctx, net)
        if ctx.dist.is_main:
            draw_run(run_dir, result, ctx.train.class_counts, f"stage {stage}")
        return result
    finally:
        ctx.close()
