"""The epoch / step loop shared by both stages: schedule, logging, progress, checkpoints, NaN guard.

A stage object supplies `epochs`, `loader(epoch)`, `lr(epoch_float)`, `train_step(batch, epoch,
step) -> loss tensor`, `optimizer`, `name`; the loop never syncs with the device except at logging
points (every `log_every` steps), where it also checks that the loss is finite.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import torch

from pipeline.errors import DataError
from pipeline.progress import progress
from train.distributed import all_reduce_sum


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
        epoch_losses = []
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
                                      lr=lr, images_per_s=round(rate, 1), skipped_images=loader.skipped)
                    epoch_losses.append((value, n_since))
                    loss_sum.zero_()
                    n_since, t_log = 0, now
                    bar.advance(0, extra=f"loss {value:.3f}  {rate:,.0f} img/s")
                    if not last and now - last_save > 60 * cfg.checkpoint_minutes:
                        save(epoch, step + 1)
                        last_save = time.monotonic()
                bar.advance(1)
        start_step = 0
        mean = sum(v * n for v, n in epoch_losses) / max(sum(n for _, n in epoch_losses), 1)
        ctx.metrics.write(stage=stage.name, event="epoch", epoch=epoch, loss=mean)
        on_epoch_end(epoch)
        save(epoch + 1, 0)
        last_save = time.monotonic()
