"""Hessian-free optimisation (natlib.hessianfree) against dense damped Gauss-Newton solves, and
its Levenberg-Marquardt damping rule, in float64."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from cases import mlp_case
from helpers import assert_close, flat, one_step
from torch import nn

from natlib import curvature, problems
from natlib.hessianfree import HessianFree, levenberg_marquardt, reduction_ratio
from natlib.optim import train

pytestmark = pytest.mark.usefixtures("float64")


def gauss_newton_step(case, damping: float, m: int | None = None) -> torch.Tensor:
    r""":math:`(G + \lambda I)^{-1} \nabla L`, the GGN :math:`G` of the first ``m`` examples."""
    m = m or case.X.shape[0]
    G = curvature.ggn(case.model, case.loss_fn, case.X[:m], case.y[:m])
    g = curvature.flat_gradient(case.model, case.loss_fn, case.X, case.y)
    return torch.linalg.solve(G + damping * torch.eye(len(g)), g)


def hessian_free(case, **options) -> HessianFree:
    defaults = dict(lr=1.0, damping=0.1, cg_tol=1e-12, cg_max_iter=1000)
    return HessianFree(case.model, case.loss_fn, **(defaults | options))


def convex_case(loss: str = "ce"):
    """A linear model: the loss is convex in the parameters and the GGN is the Hessian."""
    return mlp_case(loss, sizes=(4, 3))


def test_hessian_free_reaches_the_damped_gauss_newton_step_on_a_convex_problem() -> None:
    case, reference = convex_case(), convex_case()
    args = (reference.model, reference.loss_fn, reference.X, reference.y)
    assert_close(curvature.ggn(*args), curvature.hessian(*args), rtol=1e-12)
    optimizer = hessian_free(case, warm_start=0.95)
    damping = 0.1
    for _ in range(2):  # the second conjugate-gradient run starts from the first direction
        before = flat(reference.model)
        expected = before - gauss_newton_step(reference, damping)
        torch.nn.utils.vector_to_parameters(expected, reference.model.parameters())
        one_step(optimizer, case)
        assert optimizer.last.residual <= 1e-12
        assert_close(flat(case.model), expected, rtol=1e-9)
        damping = levenberg_marquardt(damping, optimizer.last.rho)
        assert optimizer.param_groups[0]["damping"] == damping


def test_hessian_free_ratio_is_actual_over_predicted_reduction() -> None:
    case = convex_case("mse")
    args = (case.model, case.loss_fn, case.X, case.y)
    theta, G = flat(case.model), curvature.ggn(*args)
    g, before = curvature.flat_gradient(*args), case.loss_fn(case.model(case.X), case.y).item()
    optimizer = hessian_free(case, lr=0.7)
    one_step(optimizer, case)
    p = flat(case.model) - theta
    predicted = (g @ p + 0.5 * p @ G @ p).item()
    actual = case.loss_fn(case.model(case.X), case.y).item() - before
    assert math.isclose(optimizer.last.predicted, predicted, rel_tol=1e-9)
    assert math.isclose(optimizer.last.rho, actual / predicted, rel_tol=1e-9)


@pytest.mark.parametrize(
    ("rho", "factor"),
    [
        (-math.inf, 3 / 2),
        (-1.0, 3 / 2),
        (0.0, 3 / 2),
        (0.2499, 3 / 2),
        (0.25, 1.0),
        (0.5, 1.0),
        (0.75, 1.0),
        (0.7501, 2 / 3),
        (1.0, 2 / 3),
        (7.0, 2 / 3),
    ],
)
def test_levenberg_marquardt_follows_the_reduction_ratio(rho: float, factor: float) -> None:
    assert levenberg_marquardt(0.3, rho) == 0.3 * factor


def test_reduction_ratio() -> None:
    assert reduction_ratio(-0.5, -1.0) == 0.5
    assert reduction_ratio(0.1, -1.0) == -0.1
    assert reduction_ratio(-0.5, 0.0) == -math.inf  # no predicted decrease
    with pytest.raises(ValueError, match="must be finite"):
        reduction_ratio(math.nan, -1.0)


def test_hessian_free_damping_follows_the_rule_over_a_run() -> None:
    case = mlp_case("ce")
    optimizer = hessian_free(case, lr=1.0, damping=1e-3, cg_max_iter=3, cg_tol=1e-6)
    seen = set()
    for k in range(6):
        optimizer.param_groups[0]["lr"] = 3.0 if k % 2 else 1.0  # overshoots: the ratio falls
        one_step(optimizer, case)
        last = optimizer.last
        assert last.iterations <= 3
        actual = last.loss_after - last.loss_before
        assert last.rho == (actual / last.predicted if last.predicted < 0 else -math.inf)
        assert last.damping_after == levenberg_marquardt(last.damping_before, last.rho)
        seen.add(last.damping_after / last.damping_before)
    assert len(seen) >= 2  # the run moved the damping in more than one way


def test_hessian_free_curvature_uses_the_first_examples() -> None:
    case, reference = convex_case(), convex_case()
    expected = flat(reference.model) - gauss_newton_step(reference, 0.1, m=3)
    one_step(hessian_free(case, curvature_batch_size=3), case)
    assert_close(flat(case.model), expected, rtol=1e-9)


def test_hessian_free_trains_with_the_usual_loop_and_a_closure() -> None:
    data = problems.digits()
    X, y = data.X_train[:200], data.y_train[:200]
    model = problems.mlp([64, 8, 10], seed=0)
    optimizer = HessianFree(model, data.loss_fn, cg_max_iter=10, curvature_batch_size=50)
    trace = train(model, optimizer, data.loss_fn, X, y, steps=5, batch_size=100, eval_every=5)
    assert trace.losses[-1] < 0.7 * trace.losses[0]

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = data.loss_fn(model(X), y)
        loss.backward()
        return loss

    loss = optimizer.step(closure)
    assert loss.item() == optimizer.last.loss_before


def test_hessian_free_state_dict_resumes_bit_identically() -> None:
    case = mlp_case("ce")
    optimizer = hessian_free(case, cg_max_iter=4, cg_tol=1e-8)
    for _ in range(2):
        one_step(optimizer, case)
    saved_model = copy.deepcopy(case.model.state_dict())
    saved = copy.deepcopy(optimizer.state_dict())
    for _ in range(2):
        one_step(optimizer, case)
    resumed = mlp_case("ce")
    resumed.model.load_state_dict(saved_model)
    other = hessian_free(resumed, cg_max_iter=4, cg_tol=1e-8)
    other.load_state_dict(saved)
    for _ in range(2):
        one_step(other, resumed)
    assert torch.equal(flat(resumed.model), flat(case.model))
    assert other.param_groups[0]["damping"] == optimizer.param_groups[0]["damping"]


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("damping", [0.0, -1.0, math.nan, math.inf])
def test_bad_damping_is_rejected(damping: float) -> None:
    case = mlp_case()
    with pytest.raises(ValueError, match="damping must be a positive finite number"):
        HessianFree(case.model, case.loss_fn, damping=damping)


def test_step_without_the_watched_loss_call_is_an_error() -> None:
    case = mlp_case()
    optimizer = HessianFree(case.model, case.loss_fn)
    nn.CrossEntropyLoss()(case.model(case.X), case.y).backward()  # another loss module
    with pytest.raises(RuntimeError, match="no labelled pass was recorded"):
        optimizer.step()


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("cg_max_iter", 0, "cg_max_iter must be a positive integer"),
        ("cg_max_iter", 2.5, "cg_max_iter must be a positive integer"),
        ("cg_tol", 0.0, "cg_tol must be a positive finite number"),
        ("warm_start", 1.0, r"warm_start must lie in \[0, 1\)"),
        ("curvature_batch_size", 0, "curvature_batch_size must be a positive integer"),
    ],
)
def test_bad_hessian_free_options_are_rejected(option: str, value, message: str) -> None:
    case = mlp_case()
    with pytest.raises(ValueError, match=message):
        HessianFree(case.model, case.loss_fn, **{option: value})


def test_non_finite_loss_after_a_hessian_free_step_restores_the_parameters() -> None:
    case = mlp_case("mse")
    before = flat(case.model)
    optimizer = hessian_free(case, lr=1e300)
    with pytest.raises(FloatingPointError, match="Raise the damping"):
        one_step(optimizer, case)
    assert torch.equal(flat(case.model), before)


def test_bad_ratio_and_damping_in_the_rule_are_rejected() -> None:
    with pytest.raises(ValueError, match="rho must be a number"):
        levenberg_marquardt(1.0, math.nan)
    with pytest.raises(ValueError, match="damping must be a positive finite number"):
        levenberg_marquardt(0.0, 0.5)
