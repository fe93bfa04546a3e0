"""natlib.approximations: the Fisher's diagonal and layer blocks against the dense Fisher, and
their optimisers against dense steps."""

import copy

import pytest
import torch
from cases import LOSSES, mlp_case
from helpers import assert_close
from torch import nn
from torch.nn.utils import parameters_to_vector

from natlib import curvature, problems, reference
from natlib.approximations import BlockDiagonalFisher, DiagonalFisher
from natlib.exact import Fisher
from natlib.optim import BlockDiagonalNGD, DiagonalNGD

pytestmark = pytest.mark.usefixtures("float64")
KINDS = ("exact", "mc", "empirical")


def fisher_pair(cls, case, kind: str):
    """``cls`` and the dense Fisher of the same kind on ``case`` (the same Monte-Carlo draws)."""
    args = (case.model, case.loss_fn, case.X, case.y)
    options = {"kind": kind}
    if kind == "mc":
        options |= {"mc_samples": 2}
        approx = cls.from_batch(*args, generator=torch.Generator().manual_seed(5), **options)
        dense = Fisher.from_batch(*args, generator=torch.Generator().manual_seed(5), **options)
        return approx, dense.to_dense()
    return cls.from_batch(*args, **options), Fisher.from_batch(*args, **options).to_dense()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("loss", LOSSES)
def test_diagonal_is_the_diagonal_of_the_dense_fisher(loss: str, kind: str) -> None:
    D, F = fisher_pair(DiagonalFisher, mlp_case(loss, n=6), kind)
    assert_close(D.diagonal, torch.diagonal(F))
    assert_close(D.to_dense(), torch.diag(torch.diagonal(F)))


@pytest.mark.parametrize("loss", LOSSES)
def test_empirical_diagonal_is_the_mean_squared_per_example_gradient(loss: str) -> None:
    case = mlp_case(loss, n=5)
    args = (case.model, case.loss_fn, case.X, case.y)
    D = DiagonalFisher.from_batch(*args, kind="empirical")
    assert_close(D.diagonal, torch.diagonal(reference.naive_empirical_fisher(*args)))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("loss", LOSSES)
def test_blocks_are_the_layer_blocks_of_the_dense_fisher(loss: str, kind: str) -> None:
    B, F = fisher_pair(BlockDiagonalFisher, mlp_case(loss, sizes=(4, 5, 3, 3), n=6), kind)
    assert_close(B.to_dense(), B.layout.block_diagonal(F))
    assert_close(torch.diagonal(B.to_dense()), torch.diagonal(F))


def test_any_module_with_parameters_is_a_block() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 2))
    X, y = (
        torch.randn(5, 3, generator=torch.Generator().manual_seed(0)),
        torch.tensor([0, 1] * 2 + [0]),
    )
    loss_fn = nn.CrossEntropyLoss()
    F = curvature.fisher(model, loss_fn, X)
    B = BlockDiagonalFisher.from_batch(model, loss_fn, X, y)
    assert len(B.blocks) == 3
    assert_close(B.to_dense(), B.layout.block_diagonal(F))
    assert_close(DiagonalFisher.from_batch(model, loss_fn, X, y).diagonal, torch.diagonal(F))


def test_chunks_of_examples_add_up(monkeypatch: pytest.MonkeyPatch) -> None:
    import natlib.curvature

    case = mlp_case(n=9)
    whole = DiagonalFisher.from_batch(case.model, case.loss_fn, case.X, case.y).diagonal
    monkeypatch.setattr(natlib.curvature, "_ROW_BUDGET", 200)  # a few examples per chunk
    chunked = DiagonalFisher.from_batch(case.model, case.loss_fn, case.X, case.y).diagonal
    assert_close(chunked, whole, rtol=1e-14)


def test_clear_errors() -> None:
    case = mlp_case()
    with pytest.raises(ValueError, match="Fisher kind 'type-2' is not supported"):
        DiagonalFisher.from_batch(case.model, case.loss_fn, case.X, case.y, kind="type-2")
    with pytest.raises(ValueError, match="loss L1Loss is not supported"):
        DiagonalFisher.from_batch(case.model, nn.L1Loss(), case.X, case.y)
    with pytest.raises(ValueError, match="empirical Fisher uses the data labels"):
        BlockDiagonalFisher.from_batch(case.model, case.loss_fn, case.X, kind="empirical")
    D = DiagonalFisher.from_batch(case.model, case.loss_fn, case.X, case.y)
    with pytest.raises(ValueError, match="update needs a diagonal Fisher"):
        D.update(BlockDiagonalFisher.from_batch(case.model, case.loss_fn, case.X, case.y), 0.5)
    with pytest.raises(ValueError, match="ema_decay must lie in"):
        D.update(D, 1.0)


def flat(model: nn.Module) -> torch.Tensor:
    return parameters_to_vector(model.parameters()).detach().clone()


@pytest.mark.parametrize("kind", ["exact", "empirical"])
@pytest.mark.parametrize("optimizer, blocks", [(DiagonalNGD, False), (BlockDiagonalNGD, True)])
def test_steps_are_damped_restricted_natural_gradient(optimizer, blocks: bool, kind: str) -> None:
    case = mlp_case("ce", n=6)
    model, loss_fn, X, y = case.model, case.loss_fn, case.X, case.y
    opt = optimizer(model, loss_fn, lr=0.3, damping=0.1, ema_decay=0.0, kind=kind)
    for _ in range(2):
        F = curvature.fisher(model, loss_fn, X, y, kind=kind)
        F = opt.layout.block_diagonal(F) if blocks else torch.diag(torch.diagonal(F))
        g = curvature.flat_gradient(model, loss_fn, X, y)
        expected = flat(model) - 0.3 * torch.linalg.solve(F + 0.1 * torch.eye(len(g)), g)
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        opt.step()
        assert_close(flat(model), expected, rtol=1e-12)


def test_diagonal_ngd_trains_on_digits() -> None:
    data = problems.digits()
    model = problems.mlp([64, 16, 10], seed=0)
    start = data.loss_fn(model(data.X_train), data.y_train).item()
    opt = DiagonalNGD(copy.deepcopy(model), data.loss_fn)
    for k in range(20):
        index = slice(64 * k, 64 * (k + 1))
        opt.zero_grad()
        data.loss_fn(opt.model(data.X_train[index]), data.y_train[index]).backward()
        opt.step()
    assert data.loss_fn(opt.model(data.X_train), data.y_train).item() < 0.8 * start
