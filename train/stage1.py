"""Stage 1, representation learning (docs/METHOD.md): warm-up on the uniform branch, then the
interpolative branch; the centroids follow the clean uniform-branch embeddings (Eq. 1)."""
from __future__ import annotations

import torch

from model.centroids import CentroidBank
from model.network import ICCLNet
from pipeline.errors import DataError
from train.schedule import cosine_lr, step_lr
from train.steps import LossWeights, stage1_loss, stage1_phase


def wrap(ctx, module: torch.nn.Module) -> torch.nn.Module:
    """DistributedDataParallel across processes and optional compilation: the one place it happens."""
    if ctx.dist.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP
        if ctx.cfg.sync_bn:
            if ctx.device.type != "cuda":
                raise DataError("sync_bn needs CUDA devices (torch's SyncBatchNorm has no CPU "
                                "implementation); drop --set sync_bn=true on CPU")
            module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        module = DDP(module, device_ids=ids)
    if ctx.cfg.compile:
        # Static shapes: when the warm-up ends the batch doubles (fused: one stream -> two) or the
        # clean forward loses its graph (unfused, w^u = 0); with dynamic=None torch would then
        # recompile for a symbolic batch size (slower kernels, and a third graph if a shape changes
        # again). A second static graph is compiled instead.
        module = torch.compile(module, dynamic=False)
    return module


def sgd(cfg, params, lr: float) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           nesterov=cfg.nesterov)


class Stage1:
    name = "stage1"

    def __init__(self, ctx, net: ICCLNet, bank: CentroidBank):
        self.ctx, self.cfg, self.net, self.bank = ctx, ctx.cfg, net, bank
        cfg = self.cfg
        if cfg.method == "ce":  # no projection loss: keep DDP from waiting on unused gradients
            net.projector.requires_grad_(False)
        self.model = wrap(ctx, net)
        self.optimizer = sgd(cfg, [p for p in net.parameters() if p.requires_grad], cfg.scaled_lr(cfg.lr))
        self.epochs = cfg.epochs
        self.images_per_step = cfg.batch_size // ctx.dist.world_size
        self.skipped_images = 0  # corrupt training images met (train.loop counts them)
        self.epoch_loss = None  # (loss sum, steps) of the epoch so far at a mid-epoch save (train.loop)

    def phase(self, epoch: int) -> str:
        return stage1_phase(self.cfg.method, epoch, self.cfg.warmup_epochs)

    def loader(self, epoch: int):
        two_streams = self.phase(epoch) == "iccl"
        self.images_per_step = (2 if two_streams else 1) * self.cfg.batch_size // self.ctx.dist.world_size
        return self.ctx.train_loader(uniform=True, class_aware_gamma=self.cfg.gamma if two_streams else None,
                                     batch_size=self.cfg.batch_size)

    def lr(self, epoch: float) -> float:
        cfg = self.cfg
        base = cfg.scaled_lr(cfg.lr)
        if cfg.schedule == "step":
            return step_lr(base, epoch, cfg.lr_warmup_epochs, cfg.lr_steps, cfg.lr_step_factor)
        return cosine_lr(base, epoch, cfg.epochs, cfg.lr_warmup_epochs)

    def weights(self, phase: str) -> LossWeights:
        cfg = self.cfg
        return LossWeights(w_u=cfg.w_u if phase != "iccl" else cfg.w_u_after_warmup,
                           w_il=cfg.w_il, tau=cfg.tau)

    def _inputs(self, batch, epoch: int, step: int, phase: str):
        """(x_a, x_mix, lam): normalised clean images, and in the interpolative phase the mixed
        images and their lambdas (None otherwise)."""
        if phase != "iccl":
            return self.ctx.normalize(batch.x_a), None, None
        lam = self.ctx.lambdas(epoch, step, batch.x_a.shape[0])
        return (*self.ctx.mix(batch.x_a, batch.x_c, lam), lam)

    def forward_inputs(self, batch, epoch: int, step: int) -> list[torch.Tensor]:
        """The inputs of the network's forwards at this step: [x_a] in the warm-up, [[x_a; x_mix]]
        fused, or [x_a, x_mix] with fused_forward=false (one forward each, as training ran them)."""
        x_a, x_mix, _ = self._inputs(batch, epoch, step, self.phase(epoch))
        if x_mix is None:
            return [x_a]
        return [torch.cat([x_a, x_mix])] if self.cfg.fused_forward else [x_a, x_mix]

    def train_step(self, batch, epoch: int, step: int) -> torch.Tensor:
        ctx, phase = self.ctx, self.phase(epoch)
        self.model.train()
        x_a, x_mix, lam = self._inputs(batch, epoch, step, phase)
        with ctx.autocast():
            loss, z_a = stage1_loss(self.model, self.bank.centroids, phase, x_a, batch.y_a,
                                    x_mix, batch.y_c, lam, self.weights(phase), fused=self.cfg.fused_forward)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if z_a is not None:
            self.bank.update(z_a.detach(), batch.y_a)
        return loss

    def state_dict(self) -> dict:
        return {"net": self.net.state_dict(), "bank": self.bank.state_dict(),
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.bank.load_state_dict(state["bank"])
        self.optimizer.load_state_dict(state["optimizer"])
