"""natlib.shampoo: Shampoo's preconditioner against its definition by matrix powers."""

import copy

import pytest
import torch
from cases import LOSSES, mlp_case, vector
from helpers import assert_close
from torch import nn

from natlib import curvature, problems
from natlib.optim import Shampoo
from natlib.shampoo import ShampooPreconditioner

pytestmark = pytest.mark.usefixtures("float64")


def moments(case) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """L = G G^T and R = G^T G of each layer's gradient matrix G = [dW | db], by hand."""
    g = dict(
        zip(
            [n for n, _ in case.model.named_parameters()],
            torch.autograd.grad(
                case.loss_fn(case.model(case.X), case.y), list(case.model.parameters())
            ),
        )
    )
    out = {}
    for name, module in case.model.named_children():
        if isinstance(module, nn.Linear):
            G = torch.cat([g[f"{name}.weight"], g[f"{name}.bias"].unsqueeze(1)], 1)
            out[name] = (G @ G.T, G.T @ G)
    return out


@pytest.mark.parametrize("loss", LOSSES)
def test_moments_and_fourth_roots(loss: str) -> None:
    """The moments are those of the gradient matrices, and four products with C give
    V -> L V R: C is L^{1/4} (x) R^{1/4}."""
    case = mlp_case(loss, sizes=(4, 5, 3, 3), n=6)
    C = ShampooPreconditioner.from_batch(case.model, case.loss_fn, case.X, case.y)
    expected = moments(case)
    for layer in C.layers:
        for mine, theirs in zip(C.moments[layer.name], expected[layer.name]):
            assert_close(mine, theirs)
    v = vector(C.layout.numel)
    fourth = v
    for _ in range(4):
        fourth = C.matvec(fourth)
    for layer in C.layers:
        L, R = expected[layer.name]
        assert_close(layer.matrix(fourth), L @ layer.matrix(v) @ R, rtol=1e-8)


def test_root_damping_is_guptas_epsilon() -> None:
    """``"root"``: four solves give (L + eps I)^{-1} V (R + eps I)^{-1}."""
    case = mlp_case("ce", n=6)
    C = ShampooPreconditioner.from_batch(
        case.model, case.loss_fn, case.X, case.y, damping_mode="root"
    )
    eps = 0.1
    v = vector(C.layout.numel)
    fourth = v
    for _ in range(4):
        fourth = C.solve(fourth, eps)
    for layer in C.layers:
        L, R = C.moments[layer.name]
        eye = lambda M: torch.eye(len(M))  # noqa: E731
        expected = torch.linalg.solve(L + eps * eye(L), layer.matrix(v)) @ torch.linalg.inv(
            R + eps * eye(R)
        )
        assert_close(layer.matrix(fourth), expected, rtol=1e-10)


def test_solve_stays_stale_until_refresh() -> None:
    case, other = mlp_case(n=6, seed=0), mlp_case(n=6, seed=1)
    C = ShampooPreconditioner.from_batch(other.model, other.loss_fn, other.X, other.y)
    D = ShampooPreconditioner.from_batch(case.model, case.loss_fn, case.X, case.y)
    v = vector(C.layout.numel)
    before = C.solve(v, 0.1)
    C.update(D, 0.0)
    assert torch.equal(C.solve(v, 0.1), before)
    C.refresh(0.1)
    assert_close(C.solve(v, 0.1), D.solve(v, 0.1))


def test_shampoo_optimizer_step_and_training() -> None:
    case = mlp_case("ce", n=8)
    model = copy.deepcopy(case.model)
    opt = Shampoo(model, case.loss_fn, lr=0.1, damping=1e-3, T_inv=1, ema_decay=0.0)
    C = ShampooPreconditioner.from_batch(case.model, case.loss_fn, case.X, case.y)
    g = curvature.flat_gradient(case.model, case.loss_fn, case.X, case.y)
    expected = torch.nn.utils.parameters_to_vector(case.model.parameters()) - 0.1 * C.solve(g, 1e-3)
    opt.zero_grad()
    case.loss_fn(model(case.X), case.y).backward()
    opt.step()
    assert_close(
        torch.nn.utils.parameters_to_vector(model.parameters()).detach(), expected.detach()
    )

    data = problems.digits()
    net = problems.mlp([64, 16, 10], seed=0)
    start = data.loss_fn(net(data.X_train), data.y_train).item()
    opt = Shampoo(net, data.loss_fn, lr=0.02, T_inv=5)
    for k in range(20):
        index = slice(64 * k, 64 * (k + 1))
        opt.zero_grad()
        data.loss_fn(net(data.X_train[index]), data.y_train[index]).backward()
        opt.step()
    assert data.loss_fn(net(data.X_train), data.y_train).item() < 0.8 * start


def test_clear_errors() -> None:
    case = mlp_case()
    args = (case.model, case.loss_fn, case.X, case.y)
    with pytest.raises(ValueError, match="kind 'exact' is not supported"):
        ShampooPreconditioner.from_batch(*args, kind="exact")
    with pytest.raises(ValueError, match="Shampoo damping mode 'pi' is not supported"):
        ShampooPreconditioner.from_batch(*args, damping_mode="pi")
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"'1' \(LayerNorm\).*Shampoo\) support only nn.Linear"):
        ShampooPreconditioner.from_batch(model, nn.MSELoss(), torch.randn(2, 3), torch.randn(2, 2))
    with pytest.raises(ValueError, match="Shampoo trains on the gradient of the loop's own loss"):
        Shampoo(case.model, case.loss_fn, kind="mc")
    with pytest.raises(ValueError, match="damping must be a positive"):
        Shampoo(case.model, case.loss_fn, damping=0.0)
