"""The step losses compose the method's equations correctly (Eq. 8 and its warm-up form)."""
import numpy as np
import torch
from torch import nn

from model.losses import interpolative_ce, interpolative_centroid_contrastive
from model.network import ICCLNet
from train.steps import LossWeights, stage1_loss, stage1_phase, stage2_loss


class _Flat(nn.Module):
    """A batch-norm-free encoder, so that one fused forward equals two separate ones exactly."""
    out_dim = 6

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 6)

    def forward(self, x):
        return torch.tanh(self.fc(x.flatten(1)))


def _log_softmax(a):
    a = a - a.max(axis=1, keepdims=True)
    return a - np.log(np.exp(a).sum(axis=1, keepdims=True))


def _setup(seed=0, n=5, k=4):
    torch.manual_seed(seed)
    net = ICCLNet(_Flat(), num_classes=k, proj_dim=3).double()
    x_a, x_m = torch.randn(n, 3, 2, 2, dtype=torch.float64), torch.randn(n, 3, 2, 2, dtype=torch.float64)
    y_a, y_c = torch.randint(0, k, (n,)), torch.randint(0, k, (n,))
    lam = torch.rand(n, dtype=torch.float64)
    cents = nn.functional.normalize(torch.randn(k, 3, dtype=torch.float64), dim=1)
    return net, x_a, x_m, y_a, y_c, lam, cents


def _eq8_reference(net, x_a, x_m, y_a, y_c, lam, cents, w_u, w_il, tau=0.1):
    """Eq. 8 in float64 numpy from two separate forwards; also the clean embeddings z_a."""
    with torch.no_grad():
        _, la, za = net(x_a)
        _, lm, zm = net(x_m)
    la, lm, zm, c, l = la.numpy(), lm.numpy(), zm.numpy(), cents.numpy(), lam.numpy()
    r = np.arange(len(l))
    ce_u = -_log_softmax(la)[r, y_a].mean()
    lp, lc = _log_softmax(lm), _log_softmax(zm @ c.T / tau)
    ce_il = -(l * lp[r, y_a] + (1 - l) * lp[r, y_c]).mean()
    cc_il = -(l * lc[r, y_a] + (1 - l) * lc[r, y_c]).mean()
    return w_u * ce_u + w_il * (ce_il + cc_il), za


def test_iccl_phase_is_eq8():
    net, x_a, x_m, y_a, y_c, lam, cents = _setup()
    w = LossWeights(w_u=0.3, w_il=0.7, tau=0.1)
    loss, z_a = stage1_loss(net, cents, "iccl", x_a, y_a, x_m, y_c, lam, w)
    expected, za = _eq8_reference(net, x_a, x_m, y_a, y_c, lam, cents, w_u=0.3, w_il=0.7)
    # 1e-6: the projection is L2-normalised in float32 by design, the rest is float64.
    assert abs(loss.item() - expected) < 1e-6
    assert torch.allclose(z_a, za)


def _bn_net():
    """A tiny ICCLNet whose encoder has batch norm (train mode), for the unfused-forward tests."""
    enc = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.BatchNorm1d(6), nn.Tanh())
    enc.out_dim = 6
    return ICCLNet(enc, num_classes=4, proj_dim=3).train()


def _il_loss(logits_m, z_m, cents, y_a, y_c, lam, tau=0.1):
    """Eq. 8 with w^u = 0: the interpolative CE plus the interpolative centroid contrastive loss."""
    return interpolative_ce(logits_m, y_a, y_c, lam) + interpolative_centroid_contrastive(
        z_m, cents, y_a, y_c, lam, tau)


def test_unfused_forward_normalises_each_branch_by_its_own_batch_statistics():
    """fused=False: one forward per branch. With batch norm in training mode the loss is Eq. 8 on
    the logits of x_a and x_mix each normalised alone (computed here by two separate calls), and it
    differs from the fused forward, whose statistics span both branches."""
    torch.manual_seed(3)
    net = _bn_net().double()
    _, x_a, x_m, y_a, y_c, lam, cents = _setup(4, n=8)
    x_m = 3 * x_m + 1  # other statistics than x_a
    w = LossWeights(w_u=0.5)
    unfused, z_a = stage1_loss(net, cents, "iccl", x_a, y_a, x_m, y_c, lam, w, fused=False)
    fused, _ = stage1_loss(net, cents, "iccl", x_a, y_a, x_m, y_c, lam, w)
    expected, za = _eq8_reference(net, x_a, x_m, y_a, y_c, lam, cents, w_u=0.5, w_il=1.0)
    assert abs(unfused.item() - expected) < 1e-6
    assert torch.allclose(z_a, za) and abs(fused.item() - unfused.item()) > 1e-3


def test_unfused_clean_forward_records_no_graph_when_w_u_is_zero():
    """With w^u = 0 (the CIFAR rule after the warm-up) the unfused clean forward runs without a
    graph: the loss, its gradients and the batch-norm running statistics are those of the same two
    forwards with a graph (float64, to 1e-12), and z_a carries no grad_fn. With w^u > 0 it keeps its
    graph, since L_ce^u needs it."""
    torch.manual_seed(4)
    net = _bn_net().double()
    _, x_a, x_m, y_a, y_c, lam, cents = _setup(4, n=8)
    start = {k: v.clone() for k, v in net.state_dict().items()}

    def run(grad_on_clean: bool):
        net.load_state_dict(start)
        net.zero_grad()
        if grad_on_clean:  # the reference: both forwards record a graph, the loss is Eq. 8 with w^u = 0
            (_, _, z_a), (_, logits_m, z_m) = net(x_a), net(x_m)
            loss = _il_loss(logits_m, z_m, cents, y_a, y_c, lam)
        else:
            loss, z_a = stage1_loss(net, cents, "iccl", x_a, y_a, x_m, y_c, lam, LossWeights(w_u=0.0), fused=False)
        loss.backward()
        grads = [p.grad.clone() for p in net.parameters() if p.grad is not None]
        return loss.item(), grads, z_a, {k: v.clone() for k, v in net.state_dict().items()}

    loss, grads, z_a, state = run(False)
    ref_loss, ref_grads, ref_z_a, ref_state = run(True)
    assert z_a.grad_fn is None and ref_z_a.grad_fn is not None
    assert abs(loss - ref_loss) < 1e-12 and len(grads) == len(ref_grads) > 0
    assert all(torch.allclose(g, r, rtol=0, atol=1e-12) for g, r in zip(grads, ref_grads))
    assert all(torch.equal(state[k], ref_state[k]) for k in state)  # running stats updated by both forwards
    assert state["encoder.2.num_batches_tracked"].item() == 2
    _, z_a = stage1_loss(net, cents, "iccl", x_a, y_a, x_m, y_c, lam, LossWeights(w_u=0.5), fused=False)
    assert z_a.grad_fn is not None


def test_unfused_no_grad_clean_forward_keeps_gradients_under_bf16_autocast():
    """Autocast caches its bf16 weight copies; a no-grad forward before a graph forward once left
    the second without weight gradients (pytorch#112583). Under CPU bf16 autocast the gradients of
    the w^u = 0 step equal those of the same two forwards with a graph (float32 net)."""
    torch.manual_seed(5)
    net = _bn_net()
    _, x_a, x_m, y_a, y_c, lam, cents = _setup(6, n=8)
    x_a, x_m, lam, cents = x_a.float(), x_m.float(), lam.float(), cents.float()
    start = {k: v.clone() for k, v in net.state_dict().items()}
    grads = []
    for w_u in (0.0, None):  # None: the reference, both forwards with a graph
        net.load_state_dict(start)
        net.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if w_u is None:
                net(x_a)
                _, logits_m, z_m = net(x_m)
                loss = _il_loss(logits_m, z_m, cents, y_a, y_c, lam)
            else:
                loss, _ = stage1_loss(net, cents, "iccl", x_a, y_a, x_m, y_c, lam, LossWeights(w_u=w_u), fused=False)
        loss.backward()
        grads.append([p.grad for p in net.parameters()])
    assert all(g is not None for g in grads[0]) and all(g is not None for g in grads[1])
    assert all(torch.allclose(a, b, rtol=0, atol=1e-6) for a, b in zip(*grads))


def test_warmup_phase_is_ce_plus_clean_centroid_loss():
    net, x_a, _, y_a, _, _, cents = _setup(1)
    loss, z_a = stage1_loss(net, cents, "warmup", x_a, y_a, weights=LossWeights(tau=0.5))
    with torch.no_grad():
        _, la, za = net(x_a)
    r = np.arange(len(y_a))
    expect = -_log_softmax(la.numpy())[r, y_a].mean() - _log_softmax(za.numpy() @ cents.numpy().T / 0.5)[r, y_a].mean()
    assert abs(loss.item() - expect) < 1e-6


def test_warmup_loss_scales_uniform_ce_by_w_u():
    """w^u is Eq. 8's weight in the warm-up too: the losses at w^u = 1 and 0.5 differ by exactly
    0.5 * CE^u (computed here in float64 from the logits)."""
    net, x_a, _, y_a, _, _, cents = _setup(3)
    full, _ = stage1_loss(net, cents, "warmup", x_a, y_a, weights=LossWeights(w_u=1.0))
    half, _ = stage1_loss(net, cents, "warmup", x_a, y_a, weights=LossWeights(w_u=0.5))
    with torch.no_grad():
        _, la, _ = net(x_a)
    ce_u = -_log_softmax(la.numpy())[np.arange(len(y_a)), y_a].mean()
    assert ce_u > 0.1
    assert abs((full.item() - half.item()) - 0.5 * ce_u) < 1e-12


def test_w_u_setting_reaches_both_phases():
    """imagenet-lt (no CIFAR rule): --set w_u=0.5 weighs the warm-up and the interpolative phase;
    cifar10-lt keeps its rule: w_u in the warm-up, 0 afterwards."""
    from train.config import resolve
    from train.stage1 import Stage1
    for preset, after in (("imagenet-lt", 0.5), ("cifar10-lt", 0.0)):
        cfg = resolve(preset, overrides={"w_u": "0.5"})
        stage = Stage1.__new__(Stage1)
        stage.cfg = cfg
        assert stage.weights("warmup").w_u == 0.5 and stage.weights("iccl").w_u == after
    off = resolve("cifar10-lt", overrides={"w_u_zero_after_warmup": "false", "w_u": "0.7"})
    assert off.w_u_after_warmup == 0.7


def test_ce_phase_and_phase_schedule():
    net, x_a, _, y_a, _, _, _ = _setup(2)
    loss, z = stage1_loss(net, None, "ce", x_a, y_a)
    _, la, _ = net(x_a)
    assert z is None and abs(loss.item() - (-_log_softmax(la.detach().numpy())[np.arange(5), y_a].mean())) < 1e-10
    assert [stage1_phase("iccl", e, 2) for e in range(4)] == ["warmup", "warmup", "iccl", "iccl"]
    assert stage1_phase("ce", 0, 2) == "ce"


def test_stage2_beta_zero_ignores_teacher():
    s, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 1])
    ce = stage2_loss(s, None, y, 0.0, 4.0)
    assert abs(ce.item() - (-_log_softmax(s.numpy())[np.arange(4), y].mean())) < 1e-12
    t = torch.randn(4, 3, dtype=torch.float64)
    assert stage2_loss(s, t, y, 0.5, 4.0).item() != ce.item()
