"""natlib.curvature against per-example autograd loops and closed forms, in float64."""

import math

import pytest
import torch
from cases import SHAPES, shape_case
from helpers import assert_close
from torch import nn

from natlib import curvature, problems, reference
from natlib.losses import likelihood

N = 5


pytestmark = pytest.mark.usefixtures("float64")


CASES = [(name, reduction) for name in SHAPES for reduction in ("mean", "sum")]


@pytest.fixture(params=CASES, ids=["-".join(c) for c in CASES])
def case(request):
    return shape_case(*request.param)


# References: plain autograd, one example (or one output coordinate) at a time.


# Dense matrices against the references.


def test_gradient_matches_autograd(case):
    model, loss_fn, X, y = case
    expected = torch.autograd.grad(loss_fn(model(X), y), list(model.parameters()))
    assert_close(curvature.flat_gradient(model, loss_fn, X, y), reference.flat(expected))


def test_hessian_matches_autograd(case):
    assert_close(curvature.hessian(*case), reference.naive_hessian(*case))


def test_ggn_matches_autograd(case):
    assert_close(curvature.ggn(*case), reference.naive_ggn(*case))


def test_exact_fisher_equals_the_ggn(case):
    """The Fisher of the closed-form likelihood equals the autograd GGN (Martens 2020, §9.2)."""
    model, loss_fn, X, y = case
    assert_close(curvature.fisher(model, loss_fn, X), reference.naive_ggn(*case))


def test_empirical_fisher_matches_per_example_gradients(case):
    model, loss_fn, X, y = case
    F = curvature.fisher(model, loss_fn, X, y, kind="empirical")
    assert_close(F, reference.naive_empirical_fisher(*case))


def test_mc_fisher_is_the_empirical_fisher_of_the_sampled_labels(case):
    model, loss_fn, X, y = case
    F = curvature.fisher(model, loss_fn, X, kind="mc", generator=torch.Generator().manual_seed(5))
    out = model(X).detach()
    lik = likelihood(loss_fn)
    sampled = lik.sample(lik.output_matrix(out), 1, torch.Generator().manual_seed(5))[0]
    sampled = sampled.reshape(y.shape)
    assert_close(F, reference.naive_empirical_fisher(model, loss_fn, X, sampled))


def test_fisher_and_ggn_are_symmetric_positive_semidefinite(case):
    for matrix in (curvature.fisher(case.model, case.loss_fn, case.X), curvature.ggn(*case)):
        assert_close(matrix.T, matrix, rtol=1e-14)
        eigenvalues = torch.linalg.eigvalsh(matrix)
        assert eigenvalues.min() >= -1e-12 * eigenvalues.max()


def test_hessian_is_indefinite_away_from_the_optimum():
    model, loss_fn, X, y = shape_case("ce")
    eigenvalues = torch.linalg.eigvalsh(curvature.hessian(model, loss_fn, X, y))
    assert eigenvalues.min() < -0.05 * eigenvalues.max()


def test_empirical_fisher_rank_is_at_most_n():
    model = problems.mlp([3, 6, 3], seed=0)  # P = 45 parameters, N = 5 examples
    _, loss_fn, X, y = shape_case("ce")
    F = curvature.fisher(model, loss_fn, X, y, kind="empirical")
    assert torch.linalg.matrix_rank(F) <= N
    assert torch.linalg.matrix_rank(curvature.fisher(model, loss_fn, X)) > N


def test_linear_regression_closed_form():
    """H = GGN = F = 2 X^T X / N for mean squared error on a linear model."""
    p = problems.kunstner_linear_regression(n=50, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(2, 1, bias=False), nn.Flatten(0))
    X, y = p.X_train, p.y_train
    expected = 2.0 * X.T @ X / len(X)
    for matrix in (
        curvature.hessian(model, p.loss_fn, X, y),
        curvature.ggn(model, p.loss_fn, X, y),
        curvature.fisher(model, p.loss_fn, X),
    ):
        assert_close(matrix, expected)


def test_logistic_regression_closed_form():
    """F = X^T diag(p(1-p)) X / N for the mean binary cross-entropy (here also = H)."""
    p = problems.logistic_toy(n=60, dtype=torch.float64)
    model = nn.Linear(2, 1, bias=False)
    X, y = p.X_train, p.y_train[:, None]
    prob = torch.sigmoid(model(X)).detach()[:, 0]
    expected = X.T @ ((prob * (1 - prob))[:, None] * X) / len(X)
    assert_close(curvature.fisher(model, p.loss_fn, X), expected)
    assert_close(curvature.hessian(model, p.loss_fn, X, y), expected)


def test_mc_fisher_error_falls_like_one_over_sqrt_samples():
    model, loss_fn, X, _ = shape_case("ce")
    exact = curvature.fisher(model, loss_fn, X)
    samples = torch.tensor([1, 4, 16, 64, 256])
    repeats = 24
    generator = torch.Generator().manual_seed(0)
    rms = []
    for s in samples.tolist():
        errors = [
            (
                curvature.fisher(model, loss_fn, X, kind="mc", mc_samples=s, generator=generator)
                - exact
            ).norm()
            ** 2
            for _ in range(repeats)
        ]
        rms.append(math.sqrt(sum(errors) / repeats) / exact.norm())
    slope = torch.linalg.lstsq(
        torch.stack([samples.double().log(), torch.ones(5, dtype=torch.float64)], 1),
        torch.tensor(rms).log()[:, None],
    ).solution[0, 0]
    assert abs(slope + 0.5) < 0.08, f"fitted slope {slope:.3f}, expected -0.5"


def test_digits_network_parameter_order_and_scale():
    """A real network: every parameter block of F matches the autograd reference."""
    d = problems.digits(dtype=torch.float64)
    model = problems.mlp([64, 5, 10], seed=0)
    X, y = d.X_train[:20], d.y_train[:20]
    assert_close(curvature.fisher(model, d.loss_fn, X), reference.naive_ggn(model, d.loss_fn, X, y))


# Matrix-free products against the dense matrices.


def test_products_match_dense_matrices(case):
    model, loss_fn, X, y = case
    p = sum(t.numel() for t in model.parameters())
    V = torch.randn(p, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    pairs = [
        (curvature.hessian_product(*case), curvature.hessian(*case)),
        (curvature.ggn_product(*case), curvature.ggn(*case)),
        (curvature.fisher_product(model, loss_fn, X), curvature.fisher(model, loss_fn, X)),
        (
            curvature.fisher_product(model, loss_fn, X, y, kind="empirical"),
            curvature.fisher(model, loss_fn, X, y, kind="empirical"),
        ),
        (
            curvature.fisher_product(
                model,
                loss_fn,
                X,
                kind="mc",
                mc_samples=3,
                generator=torch.Generator().manual_seed(7),
            ),
            curvature.fisher(
                model,
                loss_fn,
                X,
                kind="mc",
                mc_samples=3,
                generator=torch.Generator().manual_seed(7),
            ),
        ),
    ]
    for product, dense in pairs:
        assert_close(torch.stack([product(v) for v in V.T], 1), dense @ V)


def test_natural_gradient_solves_the_damped_system(case):
    model, loss_fn, X, y = case
    damping = 1e-3
    F = curvature.fisher(model, loss_fn, X)
    g = curvature.flat_gradient(model, loss_fn, X, y)
    expected = torch.linalg.solve(F + damping * torch.eye(len(g)), g)
    direction = curvature.natural_gradient(model, loss_fn, X, y, damping, tol=1e-13)
    assert_close(direction, expected, rtol=1e-9)


# Clear errors for bad input.


@pytest.mark.parametrize("damping", [0.0, -1.0])
def test_natural_gradient_rejects_non_positive_damping(damping):
    with pytest.raises(ValueError, match="damping must be a positive finite number"):
        curvature.natural_gradient(*shape_case("ce"), damping=damping)


def test_natural_gradient_reports_unconverged_solves():
    with pytest.raises(RuntimeError, match="raise max_iter"):
        curvature.natural_gradient(*shape_case("ce"), damping=1e-6, max_iter=1)


@pytest.mark.parametrize("function", ["hessian", "ggn", "fisher", "fisher_product"])
def test_unsupported_losses_are_rejected(function):
    model, _, X, y = shape_case("mse")
    with pytest.raises(ValueError, match="supported: CrossEntropyLoss, MSELoss, BCEWithLogits"):
        getattr(curvature, function)(model, nn.L1Loss(), X, y)


def test_empirical_fisher_needs_labels():
    model, loss_fn, X, _ = shape_case("ce")
    with pytest.raises(ValueError, match="pass y"):
        curvature.fisher(model, loss_fn, X, kind="empirical")


def test_parameters_must_require_grad():
    model, loss_fn, X, y = shape_case("ce")
    model[0].bias.requires_grad_(False)
    with pytest.raises(ValueError, match="parameter '0.bias' does not require grad"):
        curvature.fisher(model, loss_fn, X, y)


def test_mismatched_batch_sizes_are_rejected():
    model, loss_fn, X, y = shape_case("ce")
    with pytest.raises(ValueError, match="different numbers of examples: 5 and 4"):
        curvature.ggn(model, loss_fn, X, y[:4])


def test_mismatched_target_shapes_are_rejected():
    model, loss_fn, X, y = shape_case("mse")
    with pytest.raises(ValueError, match="shaped like the output"):
        curvature.fisher(model, loss_fn, X, y[:, :2], kind="empirical")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "diagonal"}, "kind 'diagonal' is not supported"),
        ({"kind": "mc", "mc_samples": 0}, "positive"),
    ],
)
def test_bad_fisher_options_are_rejected(kwargs, match):
    model, loss_fn, X, y = shape_case("ce")
    with pytest.raises(ValueError, match=match):
        curvature.fisher(model, loss_fn, X, y, **kwargs)


def test_products_check_the_vector_shape():
    product = curvature.fisher_product(*shape_case("ce"))
    with pytest.raises(ValueError, match=r"shape \(31,\)"):
        product(torch.ones(26, dtype=torch.float64))


def test_non_finite_outputs_are_rejected():
    model, loss_fn, X, y = shape_case("ce")
    X = X.clone()
    X[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        curvature.fisher(model, loss_fn, X, y)
