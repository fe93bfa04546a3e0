"""Damped Newton, saddle-free Newton and Gauss-Newton (natlib.newton, natlib.optim) against
dense solves, in float64."""

from __future__ import annotations

import math

import pytest
import torch
from cases import LOSSES, mlp_case, vector
from helpers import assert_close, flat, one_step
from torch import nn

from natlib import curvature
from natlib.newton import SaddleFreeHessian, absolute_value
from natlib.optim import NGD, GaussNewton, Newton, SaddleFreeNewton

pytestmark = pytest.mark.usefixtures("float64")


def eigen_absolute(H: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(H)
    return vectors @ torch.diag(values.abs()) @ vectors.T


MATRICES = {
    Newton: curvature.hessian,
    GaussNewton: curvature.ggn,
    SaddleFreeNewton: lambda *args: eigen_absolute(curvature.hessian(*args)),
}


def dense_step(method, case, damping: float) -> torch.Tensor:
    r""":math:`(C + \lambda I)^{-1} \nabla L` with the method's dense matrix :math:`C`."""
    args = (case.model, case.loss_fn, case.X, case.y)
    C = MATRICES[method](*args)
    g = curvature.flat_gradient(*args)
    return torch.linalg.solve(C + damping * torch.eye(len(g)), g)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("method", MATRICES, ids=lambda m: m.__name__)
def test_two_steps_are_damped_dense_solves(method, loss: str) -> None:
    case, reference = mlp_case(loss), mlp_case(loss)
    optimizer = method(case.model, case.loss_fn, lr=0.5, damping=1.0)
    for _ in range(2):  # the second step replaces the first batch's matrix
        expected = flat(reference.model) - 0.5 * dense_step(method, reference, 1.0)
        torch.nn.utils.vector_to_parameters(expected, reference.model.parameters())
        one_step(optimizer, case)
        assert_close(flat(case.model), expected)


def test_gauss_newton_takes_the_exact_natural_gradient_step() -> None:
    case, other = mlp_case("ce"), mlp_case("ce")
    one_step(GaussNewton(case.model, case.loss_fn, lr=0.5, damping=0.1), case)
    one_step(NGD(other.model, other.loss_fn, lr=0.5, damping=0.1), other)
    assert_close(flat(case.model), flat(other.model), rtol=1e-9)


@pytest.mark.parametrize("method", [Newton, GaussNewton], ids=lambda m: m.__name__)
def test_large_models_solve_matrix_free(method, monkeypatch: pytest.MonkeyPatch) -> None:
    import natlib.exact

    monkeypatch.setattr(natlib.exact, "DENSE_LIMIT", 10)
    case, reference = mlp_case("mse"), mlp_case("mse")
    optimizer = method(case.model, case.loss_fn, lr=0.5, damping=5.0)
    for _ in range(2):
        expected = flat(reference.model) - 0.5 * dense_step(method, reference, 5.0)
        torch.nn.utils.vector_to_parameters(expected, reference.model.parameters())
        one_step(optimizer, case)
        assert optimizer.curvature._dense is None  # never formed
        assert optimizer.curvature.memory_bytes == 0
        assert_close(flat(case.model), expected, rtol=1e-8)


def known_quadratic() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An indefinite :math:`Q = V \\mathrm{diag}(2, -1, 1/2) V^\\top` and its V, eigenvalues."""
    V, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(0)))
    values = torch.tensor([2.0, -1.0, 0.5])
    return V @ torch.diag(values) @ V.T, V, values


def test_saddle_free_matrix_of_a_known_indefinite_spectrum() -> None:
    Q, V, values = known_quadratic()
    model = nn.Linear(3, 1, bias=False)  # three parameters; only the layout is used
    C = SaddleFreeHessian.of_hessian(model, Q)
    assert_close(C.to_dense(), V @ torch.diag(values.abs()) @ V.T, rtol=1e-14)
    v = vector(3)
    assert_close(C.solve(v, 0.1), V @ ((V.T @ v) / (values.abs() + 0.1)), rtol=1e-14)


def test_saddle_free_step_leaves_the_saddle_where_newton_goes_to_it() -> None:
    r"""On :math:`L = \tfrac12\theta^\top Q\theta`, with a saddle at 0: the undamped Newton step
    lands on it, uphill here; the saddle-free step zeroes the positive directions and doubles
    the negative one, so the loss falls."""
    Q, V, _ = known_quadratic()
    theta = V @ torch.tensor([0.1, 1.0, 0.1])
    g = Q @ theta

    def loss(t: torch.Tensor) -> float:
        return (0.5 * t @ Q @ t).item()

    newton = theta - torch.linalg.solve(Q, g)
    saddle_free = theta - SaddleFreeHessian.of_hessian(nn.Linear(3, 1, bias=False), Q).solve(
        g, 1e-12
    )
    assert newton.norm() < 1e-12  # at the saddle
    assert loss(newton) > loss(theta)
    assert_close(saddle_free, V @ torch.tensor([0.0, 2.0, 0.0]), rtol=1e-10)
    assert loss(saddle_free) < loss(theta)


def test_saddle_free_hessian_of_a_batch_is_the_absolute_hessian() -> None:
    case = mlp_case("bce")
    args = (case.model, case.loss_fn, case.X, case.y)
    H = curvature.hessian(*args)
    assert torch.linalg.eigvalsh(H).min() < 0  # the case is indefinite
    assert_close(SaddleFreeHessian.from_batch(*args).to_dense(), eigen_absolute(H), rtol=1e-12)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("method", MATRICES, ids=lambda m: m.__name__)
@pytest.mark.parametrize("damping", [0.0, -1.0, math.nan, math.inf])
def test_bad_damping_is_rejected(method, damping: float) -> None:
    case = mlp_case()
    with pytest.raises(ValueError, match="damping must be a positive finite number"):
        method(case.model, case.loss_fn, damping=damping)


@pytest.mark.parametrize("method", MATRICES, ids=lambda m: m.__name__)
def test_step_without_the_watched_loss_call_is_an_error(method) -> None:
    case = mlp_case()
    optimizer = method(case.model, case.loss_fn)
    nn.CrossEntropyLoss()(case.model(case.X), case.y).backward()  # another loss module
    with pytest.raises(RuntimeError, match="no labelled pass was recorded"):
        optimizer.step()


def test_non_finite_or_misshapen_hessians_are_rejected() -> None:
    model = nn.Linear(3, 1, bias=False)
    with pytest.raises(ValueError, match="the Hessian contains NaN or Inf"):
        SaddleFreeHessian.of_hessian(model, torch.full((3, 3), math.inf))
    with pytest.raises(ValueError, match=r"must have shape \(3, 3\)"):
        SaddleFreeHessian.of_hessian(model, torch.eye(4))
    with pytest.raises(ValueError, match="must be a square matrix"):
        absolute_value(torch.ones(2, 3))
    C = SaddleFreeHessian.of_hessian(model, torch.eye(3))
    C.to_dense()[0, 0] = math.nan  # a running estimate gone bad
    with pytest.raises(ValueError, match="the saddle-free Hessian contains NaN or Inf"):
        C.refresh(1.0)


def test_hessian_and_saddle_free_have_no_fisher_kind() -> None:
    case = mlp_case()
    with pytest.raises(ValueError, match="has no Fisher kind.*accepted: 'exact'"):
        SaddleFreeHessian.from_batch(case.model, case.loss_fn, case.X, case.y, kind="mc")


def test_saddle_free_refresh_reuses_the_eigendecomposition_and_matches_a_fresh_one(float64):
    Q = torch.tensor([[2.0, 1.0, 0.0], [1.0, -3.0, 0.5], [0.0, 0.5, 0.1]])
    model = nn.Linear(3, 1, bias=False)
    C = SaddleFreeHessian.of_hessian(model, Q)
    v = torch.tensor([1.0, -2.0, 0.5])
    fast = C.solve(v, 0.1)
    expected = torch.linalg.solve(eigen_absolute(Q) + 0.1 * torch.eye(3), v)
    assert_close(fast, expected)
    C._dense = C.to_dense().clone()  # a changed matrix is decomposed afresh
    assert_close(C.solve(v, 0.2), torch.linalg.solve(eigen_absolute(Q) + 0.2 * torch.eye(3), v))
