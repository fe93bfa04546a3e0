"""EK-FAC and Shampoo on the layers of issue 14: nn.Conv2d and weight-shared nn.Linear.

EK-FAC's scalings are the diagonal of the exact layer block in K-FAC's basis (K-FAC-expand's or
K-FAC-reduce's), so it equals the exact block where K-FAC is exact, and its error never exceeds
K-FAC's; all in float64 against the dense GGN of natlib.curvature.
"""

from __future__ import annotations

import copy

import pytest
import torch
from cases import loss_function, targets
from helpers import assert_close
from test_kfac_conv import SINGLE_LOCATION, conv_net, inputs
from test_kfac_shared import N, T, expand_net, reduce_net, sequences
from torch import nn
from torch.nn.utils import parameters_to_vector

from natlib import curvature
from natlib.ekfac import EKFACApproximation, scalings
from natlib.kfac import KFACApproximation
from natlib.layout import ParamLayout
from natlib.optim import EKFAC, Shampoo
from natlib.shampoo import ShampooPreconditioner

pytestmark = pytest.mark.usefixtures("float64")


def exact_blocks(model, loss_fn, X, y) -> list[torch.Tensor]:
    return ParamLayout.of(model).block_diagonal_blocks(curvature.ggn(model, loss_fn, X, y))


def assert_scalings_are_the_exact_diagonal(E: EKFACApproximation, blocks) -> None:
    for layer, block in zip(E.layers, blocks):
        QA, QG = E.basis[layer.name]
        order = layer.permutation().argsort()
        Q = torch.kron(QG, QA)
        rotated = Q.T @ block[order][:, order] @ Q
        assert_close(torch.diagonal(rotated), E.scalings[layer.name].flatten())


def conv_case(loss: str, n: int = 4, seed: int = 0):
    """Tanh CNN on 5 x 5 inputs, stride 2, padding 1: 9 overlapping locations."""
    model = conv_net(5, seed=seed, kernel_size=3, stride=2, padding=1)
    return model, loss_function(loss), inputs(n, 5, seed), targets(loss, n, 4, seed)


@pytest.mark.parametrize("approximation", ["expand", "reduce"])
@pytest.mark.parametrize("loss", ["ce", "mse", "bce"])
def test_conv_scalings_are_the_exact_blocks_diagonal(loss: str, approximation: str) -> None:
    model, loss_fn, X, y = conv_case(loss)
    E = EKFACApproximation.from_batch(model, loss_fn, X, y, approximation=approximation)
    assert E.kfac.positions == {"0": 9, "3": 1}
    blocks = exact_blocks(model, loss_fn, X, y)
    assert_scalings_are_the_exact_diagonal(E, blocks)
    K = KFACApproximation.from_batch(model, loss_fn, X, y, approximation=approximation)
    exact = torch.block_diag(*blocks)
    assert (E.to_dense() - exact).norm() <= (K.to_dense() - exact).norm() * (1 + 1e-12)


@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("geometry", SINGLE_LOCATION)
def test_conv_equals_kfac_and_the_exact_block_for_one_example_at_one_location(
    geometry: str, loss: str
) -> None:
    size, conv = SINGLE_LOCATION[geometry]
    model = conv_net(size, **conv)
    X, y = inputs(1, size), targets(loss, 1, 4)
    loss_fn = loss_function(loss)
    E = EKFACApproximation.from_batch(model, loss_fn, X, y)
    exact = torch.block_diag(*exact_blocks(model, loss_fn, X, y))
    assert_close(E.to_dense(), exact)
    assert_close(E.to_dense(), KFACApproximation.from_batch(model, loss_fn, X, y).to_dense())


@pytest.mark.parametrize("approximation", ["expand", "reduce"])
def test_shared_linear_scalings_are_the_exact_blocks_diagonal(approximation: str) -> None:
    """A pooled classifier (reduce setting, output (N, C)) and position-wise MSE on (N, T, 2)
    outputs (expand setting, one output row of 2T per example)."""
    for model, loss, y in [
        (reduce_net(nn.Tanh), "ce", targets("ce", N, 2)),
        (expand_net(nn.Tanh), "mse", torch.randn(N, T, 2)),
    ]:
        loss_fn, X = loss_function(loss), sequences()
        E = EKFACApproximation.from_batch(model, loss_fn, X, y, approximation=approximation)
        assert_scalings_are_the_exact_diagonal(E, exact_blocks(model, loss_fn, X, y))


def test_expand_setting_deep_linear_is_exact() -> None:
    """Where K-FAC-expand is exact (Eschenhagen et al., Prop. 1), so is EK-FAC."""
    model, loss_fn = expand_net(), loss_function("mse")
    X, y = sequences(), torch.randn(N, T, 2, generator=torch.Generator().manual_seed(2))
    E = EKFACApproximation.from_batch(model, loss_fn, X, y)
    assert_close(E.to_dense(), torch.block_diag(*exact_blocks(model, loss_fn, X, y)))


def test_one_position_is_the_plain_formula() -> None:
    generator = torch.Generator().manual_seed(0)
    a, g = torch.randn(5, 1, 3, generator=generator), torch.randn(2, 5, 1, 4, generator=generator)
    basis = (torch.linalg.qr(torch.randn(3, 3))[0], torch.linalg.qr(torch.randn(4, 4))[0])
    plain = scalings(basis, a[:, 0], g[:, :, 0])
    assert torch.equal(scalings(basis, a, g), plain)
    general = torch.einsum("knrd,nra->knda", g @ basis[1], a @ basis[0]).square().sum((0, 1))
    assert_close(general, plain)


class FlatLogits(nn.Module):
    """A Linear on ``(N, T, d)`` whose ``(N, T, C)`` logits are returned as ``(N T, C)``,
    like natlib.language's transformer."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).flatten(0, 1)


def test_flattened_positions_are_a_clear_error() -> None:
    model, loss_fn = FlatLogits(), nn.CrossEntropyLoss()
    X, y = sequences(), targets("ce", N * T, 4)
    message = r"layer 'body' shares its weight over 5 positions of 3 examples.*15 output rows"
    with pytest.raises(ValueError, match=message):
        EKFACApproximation.from_batch(model, loss_fn, X, y)
    opt = EKFAC(model, loss_fn, kind="exact")
    opt.zero_grad()
    loss_fn(model(X), y).backward()
    before = parameters_to_vector(model.parameters()).detach().clone()
    with pytest.raises(ValueError, match=message):
        opt.step()
    assert torch.equal(parameters_to_vector(model.parameters()), before)
    KFACApproximation.from_batch(model, loss_fn, X, y)  # K-FAC's factors need no examples


def test_unsupported_layers_have_no_gradient_fallback() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    X, y = torch.randn(2, 3), torch.randn(2, 2)
    K = KFACApproximation.from_batch(model, nn.MSELoss(), X, y, unsupported="gradient")
    with pytest.raises(ValueError, match=r"EK-FAC supports only Kronecker layers.*\['1'\]"):
        EKFACApproximation(K, {})
    with pytest.raises(TypeError):
        EKFAC(model, nn.MSELoss(), unsupported="gradient")


@pytest.mark.parametrize("kind", ["exact", "empirical"])
def test_conv_optimizer_step_is_the_batch_ekfac_step(kind: str) -> None:
    model, loss_fn, X, y = conv_case("ce", n=6)
    opt = EKFAC(
        model, loss_fn, lr=0.5, damping=0.1, T_inv=1, ema_decay=0.0, kind=kind,
        approximation="reduce",
    )  # fmt: skip
    for _ in range(2):
        args = (model, loss_fn, X, y)
        E = EKFACApproximation.from_batch(*args, kind=kind, approximation="reduce")
        g = curvature.flat_gradient(*args)
        expected = parameters_to_vector(model.parameters()).detach() - 0.5 * E.solve(g, 0.1)
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        opt.step()
        assert_close(parameters_to_vector(model.parameters()).detach(), expected, rtol=1e-12)


def test_shampoo_moments_of_conv_and_shared_layers() -> None:
    """L = G G^T, R = G^T G of [dW | db], a Conv2d's weight flattened to (C_out, C_in k k)."""
    for model, loss_fn, X, y in [
        conv_case("ce"),
        (reduce_net(nn.Tanh), loss_function("ce"), sequences(), targets("ce", N, 2)),
    ]:
        S = ShampooPreconditioner.from_batch(model, loss_fn, X, y)
        grads = torch.autograd.grad(loss_fn(model(X), y), list(model.parameters()))
        grads = dict(zip([n for n, _ in model.named_parameters()], grads))
        for name, module in model.named_children():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                W = grads[f"{name}.weight"].flatten(1)
                G = torch.cat([W, grads[f"{name}.bias"].unsqueeze(1)], 1)
                L, R = S.moments[name]
                assert_close(L, G @ G.T)
                assert_close(R, G.T @ G)


def test_shampoo_trains_a_cnn() -> None:
    model, loss_fn, X, y = conv_case("ce", n=16)
    net = copy.deepcopy(model)
    opt = Shampoo(net, loss_fn, lr=0.05, T_inv=1)
    start = loss_fn(net(X), y).item()
    for _ in range(20):
        opt.zero_grad()
        loss_fn(net(X), y).backward()
        opt.step()
    assert loss_fn(net(X), y).item() < start
