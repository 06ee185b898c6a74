"""Stage 2, classifier rebalancing: the class-aware stream (gamma' = 1 by default) retrains the
classifier, distilling from the frozen stage-1 classifier; the encoder is frozen or fine-tuned per
preset. With beta = 0 and a class-balanced sampler this is cRT."""
from __future__ import annotations

import torch
from torch import nn

from model.network import ICCLNet
from train.schedule import cosine_lr
from train.stage1 import sgd, wrap
from train.steps import stage2_loss


class Student(nn.Module):
    """Encoder + classifier (the projection head is dropped). A frozen encoder stays in eval mode
    (batch-norm statistics fixed) and runs without building a graph."""

    def __init__(self, net: ICCLNet, finetune_encoder: bool):
        super().__init__()
        self.encoder, self.classifier, self.finetune = net.encoder, net.classifier, finetune_encoder
        if not finetune_encoder:
            self.encoder.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.finetune:
            self.encoder.eval()
        return self

    def forward(self, x):
        if self.finetune:
            feats = self.encoder(x)
        else:
            with torch.no_grad():
                feats = self.encoder(x)
        return feats, self.classifier(feats)


class Stage2:
    name = "stage2"

    def __init__(self, ctx, net: ICCLNet, teacher: ICCLNet | None):
        """`net` starts from the stage-1 weights; `teacher` is the final stage-1 model (needed when
        s2_beta > 0; it is frozen here)."""
        self.ctx, self.cfg, self.net = ctx, ctx.cfg, net
        cfg = self.cfg
        self.teacher = teacher.eval().requires_grad_(False) if cfg.s2_beta > 0 else None
        if cfg.s2_reinit_classifier:
            torch.manual_seed(cfg.seed + 1)  # identical on every rank
            net.classifier.reset_parameters()
        net.projector.requires_grad_(False)
        self.student = Student(net, cfg.s2_finetune_encoder)
        self.model = wrap(ctx, self.student)
        params = [p for p in self.student.parameters() if p.requires_grad]
        self.optimizer = sgd(cfg, params, cfg.scaled_lr(cfg.s2_lr))
        self.epochs = cfg.s2_epochs
        self.images_per_step = cfg.batch_size // ctx.dist.world_size
        self.skipped_images = 0  # corrupt training images met (train.loop counts them)

    def loader(self, epoch: int):
        return self.ctx.train_loader(uniform=False, class_aware_gamma=self.cfg.s2_gamma,
                                     batch_size=self.cfg.batch_size)

    def lr(self, epoch: float) -> float:
        return cosine_lr(self.cfg.scaled_lr(self.cfg.s2_lr), epoch, self.cfg.s2_epochs)

    def train_step(self, batch, epoch: int, step: int) -> torch.Tensor:
        ctx, cfg = self.ctx, self.cfg
        self.model.train()
        x = ctx.normalize(batch.x_c)
        with ctx.autocast():
            feats, logits = self.model(x)
            teacher_logits = None
            if self.teacher is not None:
                with torch.no_grad():
                    if cfg.s2_finetune_encoder:
                        teacher_logits = self.teacher.classifier(self.teacher.encoder(x))
                    else:  # same frozen encoder: reuse its features
                        teacher_logits = self.teacher.classifier(feats)
            loss = stage2_loss(logits, teacher_logits, batch.y_c, cfg.s2_beta, cfg.s2_temperature)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss

    def state_dict(self) -> dict:
        return {"net": self.net.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
