"""Stage 2 as one of `STAGE2_CHOICES` (docs/METHOD.md, "The stage-2 family"), from the stage-1 model.

- distill, crt, lws, mislas train through `train.stage2.Stage2` and the shared epoch loop;
- ncm, tau_norm, logit_adjust do not train: they rewrite the classifier from features.
A tuned value (the tau-norm exponent, the logit-adjustment tau, MiSLAS's epsilon_1) is chosen among
its grid setting by the class-mean top-1 on the validation split (`val_split`, a converted split,
or the carve `val_fraction`), never on the test split; the result is the model as it stands after the last
epoch. A grid of one value needs no validation split.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch

from model.rebalance import class_means, logit_adjusted_bias, ncm_classifier, tau_normalized
from pipeline.errors import DataError
from train import checkpoint
from train.config import STAGE2_TUNED
from train.distributed import all_reduce_sum
from train.loop import resume_stage, run_epochs, stoppable
from train.stage2 import Stage2

TUNED = STAGE2_TUNED


def run_stage2(ctx, net, state: dict, stage1_path, make_saver: Callable, make_evaluator: Callable) -> dict:
    """Rebalance `net` (loaded from `state`) in place as `ctx.cfg.stage2` says; resumable through
    `make_saver(stage)` for the choices that train one candidate. Returns what was chosen:
    {"stage2": choice, "chosen": {name: value}, "val_top1_by_value": {value: class-mean top-1 %},
    "corrupt_training_images": count met while training (choices that train)}."""
    cfg = ctx.cfg
    net.load_state_dict(state["net"])
    info = {"stage2": cfg.stage2}
    if cfg.stage2 == "ncm":
        _set_classifier(net, *ncm_classifier(*_class_sums(ctx, net)))
        return info
    grid = tuple(getattr(cfg, TUNED[cfg.stage2][0])) if cfg.stage2 in TUNED else (None,)
    if cfg.stage2 in ("tau_norm", "logit_adjust"):
        return {**info, **_post_hoc(ctx, net, grid)}
    teacher = None
    if cfg.s2_beta > 0:
        from train.runner import new_network, prepare
        teacher = prepare(new_network(cfg, ctx.num_classes), ctx)
        teacher.load_state_dict(checkpoint.load(stage1_path)["net"])
    if len(grid) == 1:
        stage = Stage2(ctx, net, teacher, eps_head=grid[0])
        if "optimizer" in state:
            resume_stage(stage, state)
        run_epochs(ctx, stage, state["epoch"], state["step"], make_saver(stage), make_evaluator(stage))
        stage.finish()
        info["corrupt_training_images"] = stage.skipped_images
        return {**info, "chosen": {TUNED[cfg.stage2][1]: grid[0]}} if cfg.stage2 in TUNED else info
    # A search trains every candidate from the stage-1 weights, one after the other. Its checkpoints
    # hold the candidate in training and the search so far (`Stage2.search`), so an interrupted
    # search resumes inside the candidate it stopped in.
    start = checkpoint.load(stage1_path)["net"]
    search = state.get("search") or {"scores": [], "best_value": None, "best_net": None, "skipped": 0}
    scores = {value: score for value, score in search["scores"]}
    for value in grid:
        if value in scores:
            continue
        resuming = search.get("current") == value and "optimizer" in state
        net.load_state_dict(state["net"] if resuming else start)
        stage = Stage2(ctx, net, teacher, eps_head=value)
        stage.search = {**search, "current": value}
        if resuming:
            resume_stage(stage, state)
        run_epochs(ctx, stage, state["epoch"] if resuming else 0, state["step"] if resuming else 0,
                   make_saver(stage), lambda epoch: None)
        stage.finish()
        scores[value] = val_top1(ctx, _val_features(ctx, net), *_weights(net))
        _say_score(ctx, value, scores[value])
        search = {**search, "scores": list(scores.items()), "current": None,
                  "skipped": search["skipped"] + stage.skipped_images}
        if search["best_value"] is None or scores[value] > scores[search["best_value"]]:
            search.update(best_value=value, best_net=copy.deepcopy(net.state_dict()))
    net.load_state_dict(search["best_net"])
    _say_edge(ctx, grid, search["best_value"])
    return {**info, "corrupt_training_images": search["skipped"],
            "chosen": {TUNED[cfg.stage2][1]: search["best_value"]}, "val_top1_by_value": scores}


def grid_edge_note(setting: str, grid, chosen) -> str | None:
    """A note when `chosen` is the largest or smallest of three or more candidates: the best value
    may lie beyond the grid, which is then worth widening."""
    if len(grid) < 3 or chosen not in (min(grid), max(grid)):
        return None
    side = "largest" if chosen == max(grid) else "smallest"
    return (f"{chosen} is the {side} value of {setting}; the best may lie beyond it: widen the grid "
            f"(--set {setting}=...) to see.")


def _say_edge(ctx, grid, chosen) -> None:
    note = grid_edge_note(TUNED[ctx.cfg.stage2][0], grid, chosen)
    if note:
        ctx.say(f"stage 2 {ctx.cfg.stage2}: {note}")


def _say_score(ctx, value, score: float) -> None:
    ctx.say(f"stage 2 {ctx.cfg.stage2}: {TUNED[ctx.cfg.stage2][1]} = {value}: validation top-1 {score:.2f}")


def _post_hoc(ctx, net, grid) -> dict:
    cfg = ctx.cfg
    weight, bias = _weights(net)
    if cfg.stage2 == "tau_norm":
        candidates = {p: tau_normalized(weight.double(), p) for p in grid}
    else:
        counts = ctx.train.class_counts
        candidates = {t: (weight.double(), logit_adjusted_bias(bias.double(), counts, t)) for t in grid}
    name = TUNED[cfg.stage2][1]
    if len(grid) == 1:
        _set_classifier(net, *candidates[grid[0]])
        return {"chosen": {name: grid[0]}}
    val = _val_features(ctx, net)  # one encoder pass, shared by every candidate
    scores = {v: val_top1(ctx, val, *wb) for v, wb in candidates.items()}
    for value, score in scores.items():
        _say_score(ctx, value, score)
    chosen = max(grid, key=lambda v: scores[v])  # ties: the first in the grid
    _say_edge(ctx, grid, chosen)
    _set_classifier(net, *candidates[chosen])
    return {"chosen": {name: chosen}, "val_top1_by_value": scores}


def _weights(net) -> tuple[torch.Tensor, torch.Tensor]:
    return net.classifier.weight.detach(), net.classifier.bias.detach()


@torch.no_grad()
def _set_classifier(net, weight: torch.Tensor, bias: torch.Tensor) -> None:
    net.classifier.weight.copy_(weight.to(net.classifier.weight.dtype))
    net.classifier.bias.copy_(bias.to(net.classifier.bias.dtype))


@torch.no_grad()
def _features(ctx, net, which: str):
    """(features float32 (n, d), labels int64 (n,)) of this process's share of `which`, un-augmented."""
    net.eval()
    feats, labels = [], []
    for x, y, *_ in stoppable(ctx, ctx.plain_batches(which), f"the features of the {which} split"):
        with ctx.autocast():
            feats.append(net.encoder(ctx.normalize(x)).float())
        labels.append(y.to(ctx.device))
    d = net.classifier.in_features
    return (torch.cat(feats) if feats else torch.zeros(0, d, device=ctx.device),
            torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64, device=ctx.device))


def _class_sums(ctx, net):
    sums, counts = class_means(*_features(ctx, net, "train"), ctx.num_classes)
    all_reduce_sum(sums)
    all_reduce_sum(counts)
    if (counts == 0).any():
        missing = torch.nonzero(counts == 0).flatten().tolist()
        raise DataError(f"{ctx.cfg.data}: classes {missing} have no training image readable for NCM")
    return sums, counts


def _val_features(ctx, net):
    if ctx.val is None:
        raise DataError(f"stage2={ctx.cfg.stage2}: no validation split to tune on; --set val_split=val "
                        f"where the dataset has a split named val (`iccl info DATA` lists them), or train "
                        f"stage 1 with --set val_fraction=0.1")
    return _features(ctx, net, "val")


def val_top1(ctx, val, weight: torch.Tensor, bias: torch.Tensor) -> float:
    """Class-mean top-1 % of the linear classifier (weight, bias) on `val` = (features, labels) of
    the validation split: the mean of the per-class accuracies, as the balanced test set measures."""
    feats, labels = val
    pred = (feats.double() @ weight.double().T.to(feats.device) + bias.double().to(feats.device)).argmax(1)
    k = ctx.num_classes
    correct = torch.zeros(k, dtype=torch.float64, device=feats.device).index_add_(
        0, labels, (pred == labels).double())
    total = torch.bincount(labels, minlength=k).double()
    all_reduce_sum(correct)
    all_reduce_sum(total)
    present = total > 0
    return 100.0 * float((correct[present] / total[present]).mean())
