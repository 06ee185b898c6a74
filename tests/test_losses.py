"""ICCL losses against independent float64 numpy references, hand-worked cases and gradients."""
import math

import numpy as np
import pytest
import torch

from model import (
    centroid_contrastive,
    centroid_logits,
    distillation_loss,
    interpolative_centroid_contrastive,
    interpolative_ce,
    uniform_ce,
)

N, K, D = 6, 5, 4


# --- numpy float64 references -----------------------------------------------------------

def np_log_softmax(x):
    m = x.max(axis=1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))


def np_softmax(x):
    return np.exp(np_log_softmax(x))


def np_onehot(y, k):
    out = np.zeros((len(y), k))
    out[np.arange(len(y)), y] = 1.0
    return out


def np_ce(logits, y):
    return -np_log_softmax(logits)[np.arange(len(y)), y].mean()


def np_interp_ce(logits, ya, yc, lam):
    lp = np_log_softmax(logits)
    rows = np.arange(len(ya))
    return -(lam * lp[rows, ya] + (1 - lam) * lp[rows, yc]).mean()


def np_distill(s, t, y, beta, T):
    pt = np_softmax(t / T)
    kl = (pt * (np.log(pt) - np_log_softmax(s / T))).sum(axis=1).mean()
    return (1 - beta) * np_ce(s, y) + beta * T * T * kl


# --- data -------------------------------------------------------------------------------

@pytest.fixture
def case():
    rng = np.random.default_rng(0)
    c = rng.normal(size=(K, D))
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    z = rng.normal(size=(N, D))
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    return {
        "logits": rng.normal(scale=2.0, size=(N, K)),
        "teacher": rng.normal(scale=2.0, size=(N, K)),
        "z": z,
        "c": c,
        "ya": np.array([0, 1, 1, 4, 2, 0]),
        "yc": np.array([3, 3, 1, 0, 4, 2]),
        "lam": rng.uniform(size=N),
    }


def t64(a, grad=False):
    return torch.tensor(a, dtype=torch.float64, requires_grad=grad)


def tl(a):
    return torch.tensor(a, dtype=torch.long)


TAU = 0.1


# --- values -----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_values_match_numpy(case, dtype, tol):
    lg = torch.tensor(case["logits"], dtype=dtype)
    z, c = torch.tensor(case["z"], dtype=dtype), torch.tensor(case["c"], dtype=dtype)
    ya, yc, lam = tl(case["ya"]), tl(case["yc"]), torch.tensor(case["lam"], dtype=dtype)
    cl = case["z"] @ case["c"].T / TAU
    checks = [
        (uniform_ce(lg, ya), np_ce(case["logits"], case["ya"])),
        (interpolative_ce(lg, ya, yc, lam),
         np_interp_ce(case["logits"], case["ya"], case["yc"], case["lam"])),
        (centroid_contrastive(z, c, ya, TAU), np_ce(cl, case["ya"])),
        (interpolative_centroid_contrastive(z, c, ya, yc, lam, TAU),
         np_interp_ce(cl, case["ya"], case["yc"], case["lam"])),
        (distillation_loss(lg, torch.tensor(case["teacher"], dtype=dtype), ya, 0.5, 4.0),
         np_distill(case["logits"], case["teacher"], case["ya"], 0.5, 4.0)),
    ]
    for got, want in checks:
        assert got.shape == () and got.dtype == dtype
        assert abs(got.item() - want) <= tol * max(1.0, abs(want))
    np.testing.assert_allclose(centroid_logits(z, c, TAU).numpy(), cl, rtol=tol, atol=tol)


def test_hand_computed_cross_entropies():
    # Row 0: logits [0, ln 3] -> p = [1/4, 3/4]; label 1 -> -ln(3/4) = ln(4/3).
    # Row 1: logits [0, 0]    -> p = [1/2, 1/2]; label 0 -> ln 2.
    # Mean: (ln(4/3) + ln 2) / 2 = ln(8/3) / 2 = 0.490414...
    logits = torch.tensor([[0.0, math.log(3)], [0.0, 0.0]], dtype=torch.float64)
    assert uniform_ce(logits, tl([1, 0])).item() == pytest.approx(math.log(8 / 3) / 2, abs=1e-12)
    # Interpolative, row 0 only, y_a = 0, y_c = 1, lam = 0.5:
    #   -(0.5 ln(1/4) + 0.5 ln(3/4)) = 0.5 ln(16/3) = 0.836988...
    got = interpolative_ce(logits[:1], tl([0]), tl([1]), torch.tensor([0.5]))
    assert got.item() == pytest.approx(0.5 * math.log(16 / 3), abs=1e-12)


def test_hand_computed_centroid_loss():
    # z = [1, 0], c_0 = [1, 0], c_1 = [0, 1], tau = 1 / ln 3: logits = [ln 3, 0],
    # p = [3/4, 1/4]; label 0 -> ln(4/3); label 1 -> ln 4.
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    c = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    tau = 1 / math.log(3)
    got = centroid_contrastive(z, c, tl([0, 1]), tau)
    assert got.item() == pytest.approx((math.log(4 / 3) + math.log(4)) / 2, abs=1e-12)
    # Interpolative with lam = 0.25 on row 0 (y_a = 0, y_c = 1):
    #   -(0.25 ln(3/4) + 0.75 ln(1/4)) = 0.25 ln(4/3) + 0.75 ln 4.
    got = interpolative_centroid_contrastive(z[:1], c, tl([0]), tl([1]), torch.tensor([0.25]), tau)
    assert got.item() == pytest.approx(0.25 * math.log(4 / 3) + 0.75 * math.log(4), abs=1e-12)


def test_hand_computed_distillation():
    # Student [0, ln 9], teacher [0, 0], label 1, T = 2, beta = 0.5.
    #   CE: p = [1/10, 9/10] -> ln(10/9).
    #   Softened student [0, ln 3] -> q = [1/4, 3/4]; teacher -> [1/2, 1/2].
    #   KL = 1/2 ln((1/2)/(1/4)) + 1/2 ln((1/2)/(3/4)) = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3).
    #   Loss = 0.5 ln(10/9) + 0.5 * 4 * 1/2 ln(4/3) = 0.5 ln(10/9) + ln(4/3).
    s = torch.tensor([[0.0, math.log(9)]], dtype=torch.float64)
    t = torch.zeros(1, 2, dtype=torch.float64)
    got = distillation_loss(s, t, tl([1]), beta=0.5, T=2.0)
    assert got.item() == pytest.approx(0.5 * math.log(10 / 9) + math.log(4 / 3), abs=1e-12)


# --- gradients --------------------------------------------------------------------------

def test_ce_gradients_match_analytic(case):
    lg, ya, yc = case["logits"], case["ya"], case["yc"]
    lam = case["lam"]
    p = np_softmax(lg)

    x = t64(lg, grad=True)
    uniform_ce(x, tl(ya)).backward()
    np.testing.assert_allclose(x.grad.numpy(), (p - np_onehot(ya, K)) / N, atol=1e-12)

    x = t64(lg, grad=True)
    interpolative_ce(x, tl(ya), tl(yc), t64(lam)).backward()
    target = lam[:, None] * np_onehot(ya, K) + (1 - lam[:, None]) * np_onehot(yc, K)
    np.testing.assert_allclose(x.grad.numpy(), (p - target) / N, atol=1e-12)


def test_centroid_loss_gradients_match_analytic_and_spare_centroids(case):
    z_np, c_np, ya, yc, lam = case["z"], case["c"], case["ya"], case["yc"], case["lam"]
    p = np_softmax(z_np @ c_np.T / TAU)
    target = lam[:, None] * np_onehot(ya, K) + (1 - lam[:, None]) * np_onehot(yc, K)

    z, c = t64(z_np, grad=True), t64(c_np, grad=True)
    interpolative_centroid_contrastive(z, c, tl(ya), tl(yc), t64(lam), TAU).backward()
    # dL/dz = (1/tau) (dL/dlogits) C with dL/dlogits = (softmax - soft target) / N.
    np.testing.assert_allclose(z.grad.numpy(), (p - target) @ c_np / (TAU * N), atol=1e-11)
    assert c.grad is None

    z, c = t64(z_np, grad=True), t64(c_np, grad=True)
    centroid_contrastive(z, c, tl(ya), TAU).backward()
    np.testing.assert_allclose(z.grad.numpy(), (p - np_onehot(ya, K)) @ c_np / (TAU * N),
                               atol=1e-11)
    assert c.grad is None


def test_distillation_gradient_matches_analytic_and_spares_teacher(case):
    s_np, t_np, y = case["logits"], case["teacher"], case["ya"]
    beta, T = 0.3, 2.5
    s, t = t64(s_np, grad=True), t64(t_np, grad=True)
    distillation_loss(s, t, tl(y), beta, T).backward()
    # d/ds: (1-beta)/N (softmax(s) - onehot) + beta T^2 / N * (1/T)(softmax(s/T) - softmax(t/T)).
    want = ((1 - beta) * (np_softmax(s_np) - np_onehot(y, K))
            + beta * T * (np_softmax(s_np / T) - np_softmax(t_np / T))) / N
    np.testing.assert_allclose(s.grad.numpy(), want, atol=1e-12)
    assert t.grad is None


def test_gradients_agree_with_finite_differences(case):
    ya, yc, lam = tl(case["ya"]), tl(case["yc"]), t64(case["lam"])
    c = t64(case["c"])
    t = t64(case["teacher"])
    assert torch.autograd.gradcheck(
        lambda z: interpolative_centroid_contrastive(z, c, ya, yc, lam, TAU), (t64(case["z"], True),))
    assert torch.autograd.gradcheck(
        lambda s: distillation_loss(s, t, ya, 0.5, 4.0), (t64(case["logits"], True),))


# --- reductions and special cases -------------------------------------------------------

def test_lam_one_reduces_to_single_label_losses_and_lam_zero_to_the_other(case):
    lg, z, c = t64(case["logits"]), t64(case["z"]), t64(case["c"])
    ya, yc = tl(case["ya"]), tl(case["yc"])
    ones, zeros = torch.ones(N, dtype=torch.float64), torch.zeros(N, dtype=torch.float64)
    torch.testing.assert_close(interpolative_ce(lg, ya, yc, ones), uniform_ce(lg, ya))
    torch.testing.assert_close(interpolative_ce(lg, ya, yc, zeros), uniform_ce(lg, yc))
    torch.testing.assert_close(interpolative_centroid_contrastive(z, c, ya, yc, ones, TAU),
                               centroid_contrastive(z, c, ya, TAU))


def test_lam_accepts_the_image_mixing_shape_and_rejects_wrong_sizes(case):
    lg, ya, yc = t64(case["logits"]), tl(case["ya"]), tl(case["yc"])
    lam = t64(case["lam"])
    torch.testing.assert_close(interpolative_ce(lg, ya, yc, lam.view(N, 1, 1, 1)),
                               interpolative_ce(lg, ya, yc, lam))
    with pytest.raises(ValueError, match="one weight per sample"):
        interpolative_ce(lg, ya, yc, lam[:3])


def test_beta_zero_is_exactly_cross_entropy(case):
    s, y = torch.tensor(case["logits"], dtype=torch.float32), tl(case["ya"])
    t = torch.tensor(case["teacher"], dtype=torch.float32)
    assert torch.equal(distillation_loss(s, t, y, beta=0.0, T=4.0), uniform_ce(s, y))
    assert not torch.equal(distillation_loss(s, t, y, beta=0.5, T=4.0), uniform_ce(s, y))


def test_beta_one_is_pure_distillation(case):
    s, t, y = t64(case["logits"]), t64(case["teacher"]), tl(case["ya"])
    got = distillation_loss(s, t, y, beta=1.0, T=3.0).item()
    assert got == pytest.approx(np_distill(case["logits"], case["teacher"], case["ya"], 1.0, 3.0),
                                abs=1e-12)
    # Teacher equal to student: nothing left to distil.
    assert distillation_loss(s, s, y, beta=1.0, T=3.0).item() == pytest.approx(0.0, abs=1e-12)


def test_distillation_rejects_bad_hyperparameters(case):
    s, y = t64(case["logits"]), tl(case["ya"])
    with pytest.raises(ValueError, match="beta"):
        distillation_loss(s, s, y, beta=1.5, T=4.0)
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(s, s, y, beta=0.5, T=0.0)


# --- reduced precision ------------------------------------------------------------------

def test_bf16_inputs_give_float32_results_close_to_float32(case):
    f32 = {k: torch.tensor(case[k], dtype=torch.float32)
           for k in ("logits", "teacher", "z", "c", "lam")}
    bf = {k: v.bfloat16() for k, v in f32.items()}
    ya, yc = tl(case["ya"]), tl(case["yc"])

    def all_losses(d):
        return [
            uniform_ce(d["logits"], ya),
            interpolative_ce(d["logits"], ya, yc, d["lam"]),
            centroid_contrastive(d["z"], f32["c"], ya, TAU),
            interpolative_centroid_contrastive(d["z"], f32["c"], ya, yc, d["lam"], TAU),
            distillation_loss(d["logits"], d["teacher"], ya, 0.5, 4.0),
        ]

    for got, want in zip(all_losses(bf), all_losses(f32)):
        assert got.dtype == torch.float32
        assert abs(got.item() - want.item()) <= 2e-2 * abs(want.item())


def test_centroid_logits_stay_float32_under_autocast(case):
    z = torch.tensor(case["z"], dtype=torch.float32)
    c = torch.tensor(case["c"], dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = centroid_logits(z, c, TAU)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, z @ c.T / TAU)
