"""Mixing (docs/METHOD.md, Eq. 3) fused with normalisation, and the Beta(a, b) draws of λ."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.mixing import IMAGENET_MEAN, IMAGENET_STD, mix_normalize, normalize, sample_lambda

MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


def images(seed: int, n: int = 6, h: int = 5, w: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, h, w), generator=g, dtype=torch.uint8)
    return x.contiguous(memory_format=torch.channels_last)


def reference(x_u8: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
    return (x_u8.double() / 255 - m) / s


def test_mix_normalize_matches_float64_reference():
    a, c = images(0), images(1)
    lam = torch.tensor([0.0, 1.0, 0.5, 0.25, 0.9, 0.01])
    x_a, x_mix = mix_normalize(a, c, lam, MEAN, STD)
    l64 = lam.double().view(-1, 1, 1, 1)
    mixed_raw = l64 * a.double() + (1 - l64) * c.double()  # Eq. 3 on the raw pixels, then normalise
    ref_mix = (mixed_raw / 255 - torch.tensor(MEAN, dtype=torch.float64).view(1, 3, 1, 1)) \
        / torch.tensor(STD, dtype=torch.float64).view(1, 3, 1, 1)
    assert x_a.dtype == x_mix.dtype == torch.float32
    torch.testing.assert_close(x_a.double(), reference(a, MEAN, STD), atol=1e-5, rtol=0)
    torch.testing.assert_close(x_mix.double(), ref_mix, atol=1e-5, rtol=0)
    # λ = 1 gives x^a, λ = 0 gives x^c.
    torch.testing.assert_close(x_mix[1], x_a[1])
    torch.testing.assert_close(x_mix[0].double(), reference(c, MEAN, STD)[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
def test_outputs_are_channels_last(layout):
    a, c = images(2).contiguous(memory_format=layout), images(3).contiguous(memory_format=layout)
    x_a, x_mix = mix_normalize(a, c, torch.rand(6))
    for t in (x_a, x_mix, normalize(a)):
        assert t.is_contiguous(memory_format=torch.channels_last)


def test_output_dtype_and_normalize():
    a, c = images(4), images(5)
    x_a, x_mix = mix_normalize(a, c, torch.rand(6), dtype=torch.bfloat16)
    assert x_a.dtype == x_mix.dtype == torch.bfloat16
    assert x_mix.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(normalize(a).double(), reference(a, IMAGENET_MEAN, IMAGENET_STD),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("alpha", [1.0, 0.2])
def test_lambda_is_beta(alpha):
    """Mean 1/2 and variance 1/(4(2α + 1)) of Beta(α, α), each within 5 standard errors of the
    100k-draw estimate (standard errors from the sample's own second / fourth central moments)."""
    n = 100_000
    lam = sample_lambda(n, alpha, torch.Generator().manual_seed(0)).double().numpy()
    assert lam.dtype == np.float64 and np.isfinite(lam).all() and lam.min() >= 0 and lam.max() <= 1
    centred = lam - lam.mean()
    var = (centred ** 2).mean()
    se_mean = np.sqrt(var / n)
    se_var = np.sqrt(((centred ** 4).mean() - var ** 2) / n)
    assert abs(lam.mean() - 0.5) < 5 * se_mean
    assert abs(var - 1 / (4 * (2 * alpha + 1))) < 5 * se_var


@pytest.mark.parametrize("a, b", [(0.2, 1.0), (2.0, 5.0), (1.0, 1.0)])
def test_lambda_is_beta_a_b(a, b):
    """Beta(a, b), two parameters (the paper's Table 5 uses Beta(0.2, 1.0)): 200k draws with seed 0;
    the mean a / (a + b) and the variance ab / ((a + b)^2 (a + b + 1)) each lie within 5 standard
    errors of their estimates (standard errors from the sample's own moments)."""
    n = 200_000
    lam = sample_lambda(n, a, torch.Generator().manual_seed(0), b=b).double().numpy()
    assert np.isfinite(lam).all() and lam.min() >= 0 and lam.max() <= 1
    centred = lam - lam.mean()
    var = (centred ** 2).mean()
    se_mean = np.sqrt(var / n)
    se_var = np.sqrt(((centred ** 4).mean() - var ** 2) / n)
    assert abs(lam.mean() - a / (a + b)) < 5 * se_mean
    assert abs(var - a * b / ((a + b) ** 2 * (a + b + 1))) < 5 * se_var
    if a != b:  # the asymmetric case is not the symmetric one by accident
        assert abs(lam.mean() - 0.5) > 50 * se_mean


def test_context_draws_beta_a_b_from_the_config():
    from types import SimpleNamespace

    from train.config import resolve
    from train.context import Context
    cfg = resolve("cifar10-lt", overrides={"alpha": "0.2", "alpha_b": "1.0"})
    ctx = Context.__new__(Context)
    ctx.cfg, ctx.device = cfg, torch.device("cpu")
    ctx.dist = SimpleNamespace(world_size=1, rank=0)
    lam = torch.cat([ctx.lambdas(0, s, 1000) for s in range(20)]).double()
    assert abs(lam.mean().item() - 0.2 / 1.2) < 5 * lam.std().item() / np.sqrt(len(lam))


def test_one_lambda_per_batch_is_beta_over_steps_and_the_same_on_every_rank():
    """lambda_per=batch: every sample of a step (on every rank) shares one lambda; over 4,000 steps
    the shared lambdas are Beta(2, 2) (mean 0.5, variance 0.05, within 5 standard errors)."""
    from types import SimpleNamespace

    from train.config import resolve
    from train.context import Context
    cfg = resolve("cifar10-lt", overrides={"alpha": "2", "alpha_b": "2", "lambda_per": "batch"})
    ranks = []
    for rank in range(2):
        ctx = Context.__new__(Context)
        ctx.cfg, ctx.device, ctx.dist = cfg, torch.device("cpu"), SimpleNamespace(world_size=2, rank=rank)
        ranks.append(torch.stack([ctx.lambdas(1, s, 8) for s in range(4000)]).double())
    assert torch.equal(ranks[0], ranks[1])
    assert (ranks[0] == ranks[0][:, :1]).all()  # one value per step
    lam = ranks[0][:, 0]
    n = len(lam)
    assert abs(lam.mean().item() - 0.5) < 5 * np.sqrt(0.05 / n)
    assert abs(lam.var().item() - 0.05) < 5 * 0.0447 / np.sqrt(n)  # sd of the variance estimate, Beta(2, 2)
    assert lam.unique().numel() > 3900  # a new draw every step
    assert ctx.lambdas(1, 0, 8).stride() == (1,)  # its own memory: pinning for a GPU copies it as is


def test_lambda_deterministic():
    def draw(seed):
        return sample_lambda(1000, 1.0, torch.Generator().manual_seed(seed))
    out = draw(1)
    assert out.dtype == torch.float32 and out.shape == (1000,)
    torch.testing.assert_close(out, draw(1), rtol=0, atol=0)
    assert not torch.equal(out, draw(2))
    with pytest.raises(ValueError):
        sample_lambda(3, 0.0, torch.Generator())


@pytest.mark.slow
def test_mix_normalize_compiles():
    """Nothing branches on data: `torch.compile` traces it in one graph and agrees with eager."""
    a, c, lam = images(6), images(7), torch.rand(6)
    compiled = torch.compile(mix_normalize, fullgraph=True)
    for got, want in zip(compiled(a, c, lam), mix_normalize(a, c, lam)):
        torch.testing.assert_close(got, want)
        assert got.is_contiguous(memory_format=torch.channels_last)
