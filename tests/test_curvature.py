"""natlib.curvature against per-example autograd loops and closed forms, in float64."""

import math

import pytest
import torch
from helpers import assert_close
from torch import nn

from natlib import curvature, problems
from natlib.losses import likelihood

N = 5


pytestmark = pytest.mark.usefixtures("float64")


class Reparametrised(nn.Module):
    """A linear model whose weights are exp(phi): a single vector parameter, nonlinear map."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.phi = nn.Parameter(0.3 * torch.randn(d_in * d_out))
        self.shape = (d_out, d_in)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return X @ torch.exp(self.phi).view(self.shape).T


def _case(name: str, reduction: str = "mean"):
    """(model, loss_fn, X, y): a small tanh network on random data for each loss."""
    generator = torch.Generator().manual_seed(0)
    X = torch.randn(N, 3, generator=generator, dtype=torch.float64)
    model: nn.Module = problems.mlp([3, 4, 3], seed=1)
    if name == "ce":
        return model, nn.CrossEntropyLoss(reduction=reduction), X, torch.tensor([0, 2, 1, 2, 0])
    if name == "bce":
        y = torch.rand(N, 3, generator=generator, dtype=torch.float64).round()
        return model, nn.BCEWithLogitsLoss(reduction=reduction), X, y
    y = torch.randn(N, 3, generator=generator, dtype=torch.float64)
    if name == "mse":
        return model, nn.MSELoss(reduction=reduction), X, y
    if name == "mse-vector":  # the model's output is (N,), not (N, 1)
        model = nn.Sequential(problems.mlp([3, 4, 1], seed=1), nn.Flatten(0))
        return model, nn.MSELoss(reduction=reduction), X, y[:, 0]
    if name == "reparam":
        torch.manual_seed(2)
        return Reparametrised(3, 2), nn.MSELoss(reduction=reduction), X, y[:, :2]
    raise ValueError(name)


CASES = [
    (name, reduction)
    for name in ("ce", "mse", "bce", "mse-vector", "reparam")
    for reduction in ("mean", "sum")
]


@pytest.fixture(params=CASES, ids=["-".join(c) for c in CASES])
def case(request):
    return _case(*request.param)


# References: plain autograd, one example (or one output coordinate) at a time.


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _jacobian(model: nn.Module, X: torch.Tensor) -> torch.Tensor:
    """(N*C, P): the Jacobian of every output coordinate, example by example."""
    params = list(model.parameters())
    rows = []
    for n in range(len(X)):
        out = model(X[n : n + 1]).reshape(-1)
        for c in range(out.numel()):
            rows.append(_flat(torch.autograd.grad(out[c], params, retain_graph=True)))
    return torch.stack(rows)


def _reference_ggn(model, loss_fn, X, y) -> torch.Tensor:
    """J^T (d2L/df2) J with the full (N C x N C) output Hessian of the loss."""
    out = model(X).detach()
    h = torch.autograd.functional.hessian(lambda f: loss_fn(f, y), out)
    J = _jacobian(model, X)
    return J.T @ h.reshape(J.shape[0], J.shape[0]) @ J


def _reference_hessian(model, loss_fn, X, y) -> torch.Tensor:
    params = list(model.parameters())
    g = _flat(torch.autograd.grad(loss_fn(model(X), y), params, create_graph=True))
    return torch.stack([_flat(torch.autograd.grad(gi, params, retain_graph=True)) for gi in g])


def _reference_empirical_fisher(model, loss_fn, X, y) -> torch.Tensor:
    """r * sum_n g_n g_n^T, g_n the gradient of example n's loss summed over its entries."""
    params = list(model.parameters())
    per_example = type(loss_fn)(reduction="sum")
    out = model(X)
    scale = 1.0 if loss_fn.reduction == "sum" else 1.0 / out[0].numel() / len(X)
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        scale = 1.0 if loss_fn.reduction == "sum" else 1.0 / len(X)
    grads = [
        _flat(torch.autograd.grad(per_example(model(X[n : n + 1]), y[n : n + 1]), params))
        for n in range(len(X))
    ]
    G = torch.stack(grads)
    return scale * G.T @ G


# Dense matrices against the references.


def test_gradient_matches_autograd(case):
    model, loss_fn, X, y = case
    expected = _flat(torch.autograd.grad(loss_fn(model(X), y), list(model.parameters())))
    assert_close(curvature.flat_gradient(model, loss_fn, X, y), expected)


def test_hessian_matches_autograd(case):
    assert_close(curvature.hessian(*case), _reference_hessian(*case))


def test_ggn_matches_autograd(case):
    assert_close(curvature.ggn(*case), _reference_ggn(*case))


def test_exact_fisher_equals_the_ggn(case):
    """The Fisher of the closed-form likelihood equals the autograd GGN (Martens 2020, §9.2)."""
    model, loss_fn, X, y = case
    assert_close(curvature.fisher(model, loss_fn, X), _reference_ggn(*case))


def test_empirical_fisher_matches_per_example_gradients(case):
    model, loss_fn, X, y = case
    F = curvature.fisher(model, loss_fn, X, y, kind="empirical")
    assert_close(F, _reference_empirical_fisher(*case))


def test_mc_fisher_is_the_empirical_fisher_of_the_sampled_labels(case):
    model, loss_fn, X, y = case
    F = curvature.fisher(model, loss_fn, X, kind="mc", generator=torch.Generator().manual_seed(5))
    out = model(X).detach()
    lik = likelihood(loss_fn)
    sampled = lik.sample(lik.output_matrix(out), 1, torch.Generator().manual_seed(5))[0]
    sampled = sampled.reshape(y.shape)
    assert_close(F, _reference_empirical_fisher(model, loss_fn, X, sampled))


def test_fisher_and_ggn_are_symmetric_positive_semidefinite(case):
    for matrix in (curvature.fisher(*case[:3]), curvature.ggn(*case)):
        assert_close(matrix.T, matrix, rtol=1e-14)
        eigenvalues = torch.linalg.eigvalsh(matrix)
        assert eigenvalues.min() >= -1e-12 * eigenvalues.max()


def test_hessian_is_indefinite_away_from_the_optimum():
    model, loss_fn, X, y = _case("ce")
    eigenvalues = torch.linalg.eigvalsh(curvature.hessian(model, loss_fn, X, y))
    assert eigenvalues.min() < -0.05 * eigenvalues.max()


def test_empirical_fisher_rank_is_at_most_n():
    model = problems.mlp([3, 6, 3], seed=0)  # P = 45 parameters, N = 5 examples
    _, loss_fn, X, y = _case("ce")
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
    model, loss_fn, X, _ = _case("ce")
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
    assert_close(curvature.fisher(model, d.loss_fn, X), _reference_ggn(model, d.loss_fn, X, y))


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
        curvature.natural_gradient(*_case("ce"), damping=damping)


def test_natural_gradient_reports_unconverged_solves():
    with pytest.raises(RuntimeError, match="raise max_iter"):
        curvature.natural_gradient(*_case("ce"), damping=1e-6, max_iter=1)


@pytest.mark.parametrize("function", ["hessian", "ggn", "fisher", "fisher_product"])
def test_unsupported_losses_are_rejected(function):
    model, _, X, y = _case("mse")
    with pytest.raises(ValueError, match="supported: CrossEntropyLoss, MSELoss, BCEWithLogits"):
        getattr(curvature, function)(model, nn.L1Loss(), X, y)


def test_empirical_fisher_needs_labels():
    model, loss_fn, X, _ = _case("ce")
    with pytest.raises(ValueError, match="pass y"):
        curvature.fisher(model, loss_fn, X, kind="empirical")


def test_parameters_must_require_grad():
    model, loss_fn, X, y = _case("ce")
    model[0].bias.requires_grad_(False)
    with pytest.raises(ValueError, match="parameter '0.bias' does not require grad"):
        curvature.fisher(model, loss_fn, X, y)


def test_mismatched_batch_sizes_are_rejected():
    model, loss_fn, X, y = _case("ce")
    with pytest.raises(ValueError, match="different numbers of examples: 5 and 4"):
        curvature.ggn(model, loss_fn, X, y[:4])


def test_mismatched_target_shapes_are_rejected():
    model, loss_fn, X, y = _case("mse")
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
    model, loss_fn, X, y = _case("ce")
    with pytest.raises(ValueError, match=match):
        curvature.fisher(model, loss_fn, X, y, **kwargs)


def test_products_check_the_vector_shape():
    product = curvature.fisher_product(*_case("ce"))
    with pytest.raises(ValueError, match=r"shape \(31,\)"):
        product(torch.ones(26, dtype=torch.float64))


def test_non_finite_outputs_are_rejected():
    model, loss_fn, X, y = _case("ce")
    X = X.clone()
    X[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        curvature.fisher(model, loss_fn, X, y)
