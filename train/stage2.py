"""Stage 2, the choices that train (docs/METHOD.md, "The stage-2 family"): the class-aware stream
retrains the classifier with
- distill (the paper's stage 2): CE + distillation from the frozen stage-1 classifier, gamma' = 1;
  the encoder frozen or fine-tuned per preset. With beta = 0 and gamma' = 0 this is cRT;
- crt: CE on a re-initialised classifier, class-balanced, representation frozen (Decoupling);
- lws: only one scale per class is learnt, classifier and representation frozen (Decoupling);
- mislas: classifier + per-class scales with label-aware smoothing (MiSLAS).
The per-class scales are folded into the classifier at the end (`finish`), so every result is a
plain linear classifier. The choices that do not train (ncm, tau_norm, logit_adjust) live in
`train.stage2_methods`."""
from __future__ import annotations

import torch
from torch import nn

from model.network import ICCLNet
from model.rebalance import LearnableWeightScaling, fold_scales, label_aware_epsilons, label_aware_smoothing
from train.schedule import cosine_lr
from train.stage1 import sgd, wrap
from train.steps import stage2_loss


class Student(nn.Module):
    """Encoder + classifier (the projection head is dropped). A frozen encoder stays in eval mode
    (batch-norm statistics fixed) and runs without building a graph."""

    def __init__(self, net: ICCLNet, finetune_encoder: bool, scales: LearnableWeightScaling | None = None):
        super().__init__()
        self.encoder, self.classifier, self.finetune = net.encoder, net.classifier, finetune_encoder
        self.scales = scales  # LWS: logits_k scaled by a learnt f_k
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
        logits = self.classifier(feats)
        return feats, logits if self.scales is None else self.scales(logits)


class Stage2:
    name = "stage2"

    def __init__(self, ctx, net: ICCLNet, teacher: ICCLNet | None, eps_head: float | None = None):
        """`net` starts from the stage-1 weights; `teacher` is the final stage-1 model (needed when
        s2_beta > 0; it is frozen here); `eps_head`: MiSLAS's epsilon_1 (stage2=mislas only)."""
        self.ctx, self.cfg, self.net = ctx, ctx.cfg, net
        cfg = self.cfg
        self.teacher = teacher.eval().requires_grad_(False) if cfg.s2_beta > 0 else None
        if cfg.s2_reinit_classifier:
            torch.manual_seed(cfg.seed + 1)  # identical on every rank
            net.classifier.reset_parameters()
        net.projector.requires_grad_(False)
        self.scales = None
        if cfg.stage2 in ("lws", "mislas"):
            self.scales = LearnableWeightScaling(ctx.num_classes).to(ctx.device)
        net.classifier.requires_grad_(cfg.stage2 != "lws")  # LWS learns the scales only
        self.eps = None
        if cfg.stage2 == "mislas":  # concave epsilon_k from the counts of the images stage 2 sees
            self.eps = label_aware_epsilons(ctx.train.class_counts, eps_head, cfg.s2_mislas_eps_tail,
                                            "concave").float().to(ctx.device)
        self.student = Student(net, cfg.s2_finetune_encoder, self.scales)
        self.model = wrap(ctx, self.student)
        params = [p for p in self.student.parameters() if p.requires_grad]
        self.optimizer = sgd(cfg, params, cfg.scaled_lr(cfg.s2_lr))
        self.epochs = cfg.s2_epochs
        self.images_per_step = cfg.batch_size // ctx.dist.world_size
        self.skipped_images = 0  # corrupt training images met (train.loop counts them)
        self.epoch_loss = None  # (loss sum, steps) of the epoch so far at a mid-epoch save (train.loop)
        self.search = None  # the search so far, when this is one candidate of a search (checkpointed)

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
            if self.eps is not None:
                loss = label_aware_smoothing(logits, batch.y_c, self.eps)
            else:
                loss = stage2_loss(logits, teacher_logits, batch.y_c, cfg.s2_beta, cfg.s2_temperature)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss

    @torch.no_grad()
    def finish(self) -> None:
        """Fold the learnt per-class scales into the classifier (exact: (f_k w_k, f_k b_k))."""
        if self.scales is not None:
            w, b = fold_scales(self.net.classifier.weight, self.net.classifier.bias, self.scales.scales)
            self.net.classifier.weight.copy_(w)
            self.net.classifier.bias.copy_(b)
            self.scales.scales.fill_(1.0)

    def state_dict(self) -> dict:
        state = {"net": self.net.state_dict(), "optimizer": self.optimizer.state_dict()}
        if self.search is not None:  # a candidate of a search (train.stage2_methods)
            state["search"] = self.search
        if self.scales is not None:
            state["scales"] = self.scales.scales.detach().clone()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scales is not None:
            with torch.no_grad():
                self.scales.scales.copy_(state["scales"])
