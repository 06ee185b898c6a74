"""Batch-norm statistics recomputed at the end of stage 1 ("precise BN").

In training mode batch norm normalises with each batch's own statistics and keeps an exponential
moving average (momentum 0.1, starting from mean 0 / variance 1) for evaluation mode. After a few
hundred steps the average has converged; after a short run it has not, and evaluation mode, which
stage 2's frozen encoder and its teacher use, scales the features wrongly: a 2-epoch run gave
stage-1 logits 5x too large in evaluation mode and stage-2 losses from 70 to 560,000. Replacing
the moving average by the exact average over the last epoch's batches, at the final weights (Wu &
Johnson, "Rethinking 'Batch' in BatchNorm", 2021, Sec. 3: precise BN), removes that dependence on
the run's length; for a long run it changes the statistics little.

The batches are those the last stage-1 epoch trained on (same samples, augmentation and lambdas,
so in the interpolative phase the fused [x_a; x_mix] batches, or x_a and x_mix apart as an
unfused run trains them), passed through the network in
training mode without gradients by `torch.optim.swa_utils.update_bn` (cumulative average). With
several processes each one averages its own batches, then the statistics are averaged over
processes so every rank holds the same model.
"""
from __future__ import annotations

import torch
from torch.optim.swa_utils import update_bn

from train.distributed import all_reduce_sum


def recompute_bn_stats(ctx, stage) -> None:
    """Replace the running statistics of every batch-norm layer of `stage.net` by their average
    over the forwards of the stage's last epoch (`stage.forward_inputs` gives each step's inputs:
    one fused batch, or one per branch as an unfused run trained)."""
    epoch = stage.epochs - 1
    loader = stage.loader(epoch)
    loader.load_state_dict({"epoch": epoch, "step": 0, "skipped": loader.skipped})

    def inputs():
        for step, batch in enumerate(loader):
            yield from stage.forward_inputs(batch, epoch, step)

    with torch.no_grad(), ctx.autocast():
        update_bn(inputs(), stage.net)
    if ctx.dist.enabled:
        for module in stage.net.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                for buf in (module.running_mean, module.running_var):
                    all_reduce_sum(buf)
                    buf /= ctx.dist.world_size
