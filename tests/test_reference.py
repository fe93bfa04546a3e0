"""The per-example references agree with natlib.curvature in float64, for every loss."""

import pytest
import torch
from cases import LOSSES, mlp_case
from helpers import assert_close
from torch import nn

from natlib import curvature, reference

pytestmark = pytest.mark.usefixtures("float64")
N, SIZES = 5, (3, 4, 2)


def _problem(loss: str, reduction: str = "mean"):
    case = mlp_case(loss, SIZES, N, reduction)
    return case.model, case.loss_fn, case.X, case.y


@pytest.mark.parametrize("loss", LOSSES)
def test_fisher_and_ggn(loss):
    model, loss_fn, X, y = _problem(loss)
    fisher = reference.naive_fisher(model, loss_fn, X)
    assert_close(fisher, curvature.fisher(model, loss_fn, X))
    ggn = reference.naive_ggn(model, loss_fn, X, y)
    assert_close(ggn, curvature.ggn(model, loss_fn, X, y))
    assert_close(ggn, fisher)  # for these losses, independently of natlib.losses' Hessians


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_empirical_fisher_and_gradient(loss, reduction):
    model, loss_fn, X, y = _problem(loss, reduction)
    assert_close(
        reference.naive_empirical_fisher(model, loss_fn, X, y),
        curvature.fisher(model, loss_fn, X, y, kind="empirical"),
    )
    assert_close(
        reference.naive_gradient(model, loss_fn, X, y),
        curvature.flat_gradient(model, loss_fn, X, y),
    )
    params = list(model.parameters())
    autograd = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss_fn(model(X), y), params)])
    assert_close(reference.naive_gradient(model, loss_fn, X, y), autograd)


def test_per_example_gradients_and_jacobian_shapes():
    model, loss_fn, X, y = _problem("mse")
    P = sum(p.numel() for p in model.parameters())
    assert reference.per_example_gradients(model, loss_fn, X, y).shape == (N, P)
    assert reference.naive_jacobian(model, X[0]).shape == (2, P)
    assert loss_fn.reduction == "mean"  # the summed copy leaves the caller's loss alone


def test_unsupported_loss_is_named():
    model, _, X, y = _problem("mse")
    for fn in (reference.naive_ggn, reference.naive_empirical_fisher, reference.naive_gradient):
        with pytest.raises(ValueError, match="L1Loss is not supported"):
            fn(model, nn.L1Loss(), X, y)
