"""The epoch / step loop shared by both stages: schedule, logging, progress, checkpoints, NaN guard,
stop signals, corrupt-image reporting.

A stage object supplies `epochs`, `loader(epoch)`, `lr(epoch_float)`, `train_step(batch, epoch,
step) -> loss tensor`, `optimizer`, `name`, and carries `skipped_images` (corrupt training images
met so far, saved in checkpoints) and `epoch_loss` ((loss sum, steps) of the epoch so far when a
checkpoint is saved mid-epoch, else None; saved in checkpoints, so that the epoch's mean loss after
a resume covers the whole epoch). The loop never syncs with the device except at logging points
(every `log_every` steps), where it also checks that the loss is finite. After every step it looks
at the clock (a checkpoint every `checkpoint_minutes`, whatever `log_every` is) and at the stop
signals (`train.checkpoint.stop_signals`): both are host-side, agreed by all processes.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import torch

from pipeline.errors import DataError
from pipeline.progress import progress
from train.checkpoint import TrainingInterrupted, stop_requested
from train.distributed import all_reduce_sum, host_reduce
from train.inference import resume_target


class TrainingDiverged(DataError):
    pass


def run_epochs(ctx, stage, start_epoch: int, start_step: int,
               save: Callable[[int, int], None], on_epoch_end: Callable[[int], None]) -> None:
    cfg = ctx.cfg
    last_save = time.monotonic()
    for epoch in range(start_epoch, stage.epochs):
        loader = stage.loader(epoch)
        loader.load_state_dict({"epoch": epoch, "step": start_step, "skipped": loader.skipped})
        steps = len(loader)
        loss_sum = torch.zeros((), device=ctx.device)
        n_since = 0
        t_log = time.monotonic()
        carried = stage.epoch_loss if start_step else None  # the steps before a mid-epoch resume
        epoch_losses = [(carried[0] / carried[1], carried[1])] if carried and carried[1] else []
        stage.epoch_loss = None
        desc = f"{stage.name} epoch {epoch + 1}/{stage.epochs}"
        with progress(steps - start_step, desc, unit="steps", every_s=30.0) as bar:
            for step, batch in enumerate(loader, start=start_step):
                lr = stage.lr(epoch + step / steps)
                for group in stage.optimizer.param_groups:
                    group["lr"] = lr
                loss = stage.train_step(batch, epoch, step)
                loss_sum += loss.detach().float()
                n_since += 1
                last = step == steps - 1
                if (step + 1) % cfg.log_every == 0 or last:
                    all_reduce_sum(loss_sum)  # log the mean over processes, not rank 0's share
                    value = loss_sum.item() / (n_since * ctx.dist.world_size)  # the one host sync
                    if not math.isfinite(value):
                        raise TrainingDiverged(
                            f"{stage.name}: the loss became {value} in epoch {epoch + 1}, before step "
                            f"{step + 1}. The run stopped; {ctx.run_dir / 'checkpoint.pt'} still holds "
                            f"the last good state. Start a new run with a lower learning rate "
                            f"(--set lr=...) or rerun this command to retry from that checkpoint.")
                    now = time.monotonic()
                    rate = n_since * stage.images_per_step * ctx.dist.world_size / max(now - t_log, 1e-9)
                    ctx.metrics.write(stage=stage.name, epoch=epoch, step=step + 1, steps=steps, loss=value,
                                      lr=lr, images_per_s=round(rate, 1),
                                      skipped_images=stage.skipped_images + loader.skipped)
                    epoch_losses.append((value, n_since))
                    loss_sum.zero_()
                    n_since, t_log = 0, now
                    bar.advance(0, extra=f"loss {value:.3f}  {rate:,.0f} img/s")
                bar.advance(1)
                if last:
                    break
                # Every step: two host-side checks, agreed by all processes (tens of microseconds).
                due = time.monotonic() - last_save > 60 * cfg.checkpoint_minutes
                due, stop = host_reduce([due, stop_requested() is not None])
                if due or stop:
                    _count_skipped(ctx, stage, loader)
                    pending = loss_sum.clone()  # the steps since the last log line
                    all_reduce_sum(pending)
                    parts = epoch_losses + ([(pending.item() / (n_since * ctx.dist.world_size), n_since)]
                                            if n_since else [])
                    stage.epoch_loss = (sum(v * n for v, n in parts), sum(n for _, n in parts))
                    save(epoch, step + 1)
                    last_save = time.monotonic()
                if stop:
                    _interrupted(ctx, stage, epoch, step + 1)
        start_step = 0
        mean = sum(v * n for v, n in epoch_losses) / max(sum(n for _, n in epoch_losses), 1)
        ctx.metrics.write(stage=stage.name, event="epoch", epoch=epoch, loss=mean)
        _count_skipped(ctx, stage, loader)
        on_epoch_end(epoch)
        stage.epoch_loss = None
        save(epoch + 1, 0)
        last_save = time.monotonic()
        if host_reduce([stop_requested() is not None])[0] and epoch + 1 < stage.epochs:
            _interrupted(ctx, stage, epoch + 1, 0)


def _count_skipped(ctx, stage, loader) -> None:
    """Move the loader's count of corrupt images into `stage.skipped_images` (summed over
    processes); the first time in the run that any is met, say so on the console."""
    met = host_reduce([loader.skipped], op="sum")[0]
    loader.skipped = 0
    stage.skipped_images += met
    if met and not ctx.corrupt_images_said:
        ctx.corrupt_images_said = True
        ctx.say(f"{stage.name}: {stage.skipped_images} corrupt training image(s) met so far, replaced "
                f"by readable images of the same class; report.json counts them per stage, and "
                f"`iccl verify {ctx.cfg.data}` names them.")


def _interrupted(ctx, stage, epoch: int, step: int):
    where = f"{stage.name}, epoch {epoch + 1}, step {step}"
    ctx.say(f"{stop_requested()}: saved {ctx.run_dir / 'checkpoint.pt'} at {where}; "
            f"`iccl train --out {resume_target(ctx.run_dir)}` resumes from there.")
    raise TrainingInterrupted(f"stopped by {stop_requested()} at {where}")


def stoppable(ctx, batches, what: str):
    """`batches`, ending at a stop signal (train.checkpoint.stop_signals) between two of them: for
    the passes that keep no checkpoint (a stage's final evaluation; the feature passes of ncm,
    tau_norm, logit_adjust and of a search's scoring), which a rerun simply does again. One process
    only: under torchrun these passes may differ by a batch between processes, so a stop could not
    be agreed on at every batch as the training loop's are, and one process stopping alone would
    leave the others waiting in a collective; there the pass runs to its end, and the next
    training step (or the end of the command) stops."""
    for batch in batches:
        if ctx.dist.world_size == 1 and stop_requested():
            ctx.say(f"{stop_requested()}: stopped during {what}, which keeps no checkpoint; rerunning "
                    f"the same command does it again.")
            raise TrainingInterrupted(f"stopped by {stop_requested()} during {what}")
        yield batch


def resume_stage(stage, state: dict) -> None:
    """Load a checkpoint's `state` into `stage`: its weights and optimiser (`stage.load_state_dict`)
    and the two counts this loop keeps across a save (corrupt images met, the epoch's loss so far)."""
    stage.load_state_dict(state)
    stage.skipped_images = state.get("skipped_images", 0)
    stage.epoch_loss = state.get("epoch_loss")
