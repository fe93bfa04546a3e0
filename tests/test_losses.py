"""natlib.losses against autograd and the definitions of each likelihood, in float64."""

import math

import pytest
import torch
from torch import nn

from natlib.losses import Bernoulli, Categorical, Gaussian, likelihood

N, C = 6, 4


def _data(name: str, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    f = 2.0 * torch.randn(N, C, generator=generator, dtype=torch.float64)
    if name == "ce":
        return f, torch.randint(0, C, (N,), generator=generator)
    if name == "bce":
        return f, torch.rand(N, C, generator=generator, dtype=torch.float64)
    return f, torch.randn(N, C, generator=generator, dtype=torch.float64)


LOSSES = {"ce": nn.CrossEntropyLoss, "mse": nn.MSELoss, "bce": nn.BCEWithLogitsLoss}


@pytest.fixture(params=sorted(LOSSES))
def case(request):
    f, y = _data(request.param, torch.Generator().manual_seed(0))
    loss = LOSSES[request.param](reduction="sum")
    return loss, likelihood(loss), f, y


def test_likelihood_maps_each_supported_loss():
    assert likelihood(nn.CrossEntropyLoss()) == Categorical("mean")
    assert likelihood(nn.MSELoss(reduction="sum")) == Gaussian("sum")
    assert likelihood(nn.BCEWithLogitsLoss()) == Bernoulli("mean")


@pytest.mark.parametrize(
    "loss",
    [
        nn.L1Loss(),
        nn.NLLLoss(),
        nn.MSELoss(reduction="none"),
        nn.CrossEntropyLoss(weight=torch.ones(3)),
        nn.CrossEntropyLoss(label_smoothing=0.1),
        nn.BCEWithLogitsLoss(pos_weight=torch.ones(3)),
    ],
)
def test_unsupported_losses_name_the_supported_ones(loss):
    with pytest.raises(ValueError, match="CrossEntropyLoss, MSELoss, BCEWithLogitsLoss"):
        likelihood(loss)


def test_reduction_factors():
    f = torch.zeros(5, 3)
    assert Categorical("mean").scale(f) == 1 / 5
    assert Gaussian("mean").scale(f) == 1 / 15
    assert Bernoulli("mean").scale(f) == 1 / 15
    assert Categorical("sum").scale(f) == Gaussian("sum").scale(f) == 1.0


def _per_example_loss(loss, f, y, n):
    return loss(f[n : n + 1], y[n : n + 1])


def test_gradient_matches_autograd(case):
    loss, lik, f, y = case
    f = f.clone().requires_grad_()
    (expected,) = torch.autograd.grad(loss(f, y), f)  # sum reduction: row n is example n's
    torch.testing.assert_close(lik.gradient(f.detach(), y), expected, rtol=1e-12, atol=1e-14)


def test_hessian_matches_autograd(case):
    loss, lik, f, y = case
    expected = torch.stack(
        [
            torch.autograd.functional.hessian(lambda g, n=n: loss(g[None], y[n : n + 1]), f[n])
            for n in range(N)
        ]
    )
    torch.testing.assert_close(lik.hessian(f), expected, rtol=1e-12, atol=1e-14)


def test_hessian_factor_is_a_square_root(case):
    _, lik, f, _ = case
    b = lik.hessian_factor(f)
    torch.testing.assert_close(b @ b.transpose(1, 2), lik.hessian(f), rtol=1e-12, atol=1e-14)


def test_cross_entropy_factor_has_rank_c_minus_one_columns():
    f, _ = _data("ce", torch.Generator().manual_seed(1))
    b = Categorical("mean").hessian_factor(f)
    assert b.shape == (N, C, C - 1)
    assert torch.linalg.matrix_rank(b).eq(C - 1).all()


def _enumerated_fisher(lik, f):
    """E_y[g g^T] by summing over every outcome (one class; or each Bernoulli entry)."""
    if isinstance(lik, Categorical):
        p = f.softmax(-1)
        classes = torch.arange(C).expand(N, C).T  # (C, N): outcome c for every example
        g = lik.gradient(f, classes)  # (C, N, C)
        return torch.einsum("kn,kni,knj->nij", p.T, g, g)
    p = torch.sigmoid(f)  # entries are independent: E[g_i g_j] = 0 for i != j
    g1, g0 = lik.gradient(f, torch.ones_like(f)), lik.gradient(f, torch.zeros_like(f))
    return torch.diag_embed(p * g1**2 + (1 - p) * g0**2)


@pytest.mark.parametrize("lik", [Categorical("sum"), Bernoulli("sum")])
def test_hessian_is_the_expected_outer_product_of_the_score(lik):
    f, _ = _data("ce", torch.Generator().manual_seed(2))
    torch.testing.assert_close(_enumerated_fisher(lik, f), lik.hessian(f), rtol=1e-12, atol=1e-14)


def test_sampling_matches_each_distribution():
    generator = torch.Generator().manual_seed(3)
    f = torch.randn(N, C, generator=generator, dtype=torch.float64)
    s = 200_000
    tol = 5 / math.sqrt(s)  # five standard errors of a frequency
    classes = Categorical("mean").sample(f, s, generator)
    assert classes.shape == (s, N) and classes.dtype == torch.int64
    frequencies = nn.functional.one_hot(classes, C).double().mean(0)
    torch.testing.assert_close(frequencies, f.softmax(-1), rtol=0, atol=tol)
    bits = Bernoulli("mean").sample(f, s, generator)
    assert set(bits.unique().tolist()) == {0.0, 1.0}
    torch.testing.assert_close(bits.mean(0), torch.sigmoid(f), rtol=0, atol=tol)
    y = Gaussian("mean").sample(f, s, generator)
    torch.testing.assert_close(y.mean(0), f, rtol=0, atol=5 * math.sqrt(0.5 / s))
    torch.testing.assert_close(y.var(0), torch.full_like(f, 0.5), rtol=0, atol=tol)


def test_gaussian_score_covariance_is_the_hessian():
    generator = torch.Generator().manual_seed(4)
    f = torch.randn(2, 3, generator=generator, dtype=torch.float64)
    lik = Gaussian("sum")
    g = lik.gradient(f, lik.sample(f, 400_000, generator))
    covariance = torch.einsum("sni,snj->nij", g, g) / g.shape[0]
    torch.testing.assert_close(covariance, lik.hessian(f), rtol=0, atol=0.03)


@pytest.mark.parametrize(
    ("lik", "output", "target", "match"),
    [
        (Categorical("mean"), torch.zeros(3, 2), torch.zeros(3), "integer class indices"),
        (Categorical("mean"), torch.zeros(3, 2), torch.zeros(4, dtype=torch.long), "shape"),
        (Categorical("mean"), torch.zeros(3, 2), torch.full((3,), 2), r"\[0, 2\)"),
        (Categorical("mean"), torch.zeros(3), torch.zeros(3, dtype=torch.long), r"\(N, C\)"),
        (Gaussian("mean"), torch.zeros(3, 2), torch.zeros(3), "shaped like the output"),
        (Bernoulli("mean"), torch.zeros(3, 2), torch.zeros(3, 2, dtype=torch.long), "floating"),
    ],
)
def test_bad_targets_are_rejected(lik, output, target, match):
    with pytest.raises(ValueError, match=match):
        lik.target_matrix(output, target)


def test_kl_divergence_vanishes_to_second_order_with_hessian_lambda(case):
    _, lik, f, _ = case
    assert lik.kl_divergence(f, f).abs().max() < 1e-14
    other = f + 0.3 * torch.randn(N, C, generator=torch.Generator().manual_seed(5))
    assert (lik.kl_divergence(f, other) > 0).all()
    expected = torch.stack(
        [
            torch.autograd.functional.hessian(
                lambda g, n=n: lik.kl_divergence(f[n : n + 1], g[None]).sum(), f[n]
            )
            for n in range(N)
        ]
    )
    torch.testing.assert_close(expected, lik.hessian(f), rtol=1e-12, atol=1e-14)


def test_kl_divergence_matches_torch_distributions():
    from torch.distributions import Bernoulli as TorchBernoulli
    from torch.distributions import Categorical as TorchCategorical
    from torch.distributions import Normal, kl_divergence

    generator = torch.Generator().manual_seed(6)
    f, g = torch.randn(2, N, C, generator=generator, dtype=torch.float64)
    pairs = [
        (
            Categorical("mean"),
            kl_divergence(TorchCategorical(logits=f), TorchCategorical(logits=g)),
        ),
        (
            Bernoulli("mean"),
            kl_divergence(TorchBernoulli(logits=f), TorchBernoulli(logits=g)).sum(-1),
        ),
        (
            Gaussian("mean"),
            kl_divergence(Normal(f, math.sqrt(0.5)), Normal(g, math.sqrt(0.5))).sum(-1),
        ),
    ]
    for lik, expected in pairs:
        torch.testing.assert_close(lik.kl_divergence(f, g), expected, rtol=1e-12, atol=1e-14)


def test_predictive_mean_is_the_mean_of_the_samples(case):
    """E[y | f] by Monte Carlo (class indices one-hot) against the closed form."""
    _, lik, f, _ = case
    samples = lik.sample(f, 20_000, torch.Generator().manual_seed(7))
    if isinstance(lik, Categorical):
        samples = nn.functional.one_hot(samples, C).to(f.dtype)
    torch.testing.assert_close(samples.mean(0), lik.predictive_mean(f), rtol=0, atol=0.03)
    assert lik.predictive_mean(f).shape == f.shape
