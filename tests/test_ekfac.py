"""natlib.ekfac: EK-FAC against the exact Fisher's layer blocks and against K-FAC."""

import copy

import pytest
import torch
from cases import LOSSES, mlp_case
from helpers import assert_close
from torch import nn
from torch.nn.utils import parameters_to_vector

from natlib import curvature
from natlib.ekfac import EKFACApproximation
from natlib.exact import Fisher
from natlib.kfac import KFACApproximation
from natlib.optim import EKFAC

pytestmark = pytest.mark.usefixtures("float64")


def errors(case, kind: str = "exact") -> tuple[float, float, torch.Tensor, EKFACApproximation]:
    """Frobenius errors of EK-FAC and K-FAC to the exact Fisher's layer blocks."""
    args = (case.model, case.loss_fn, case.X, case.y)
    E = EKFACApproximation.from_batch(*args, kind=kind)
    K = KFACApproximation.from_batch(*args, kind=kind)
    F = E.layout.block_diagonal(Fisher.from_batch(*args, kind=kind).to_dense())
    return (E.to_dense() - F).norm().item(), (K.to_dense() - F).norm().item(), F, E


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("loss", LOSSES)
def test_error_never_exceeds_kfacs(loss: str, seed: int) -> None:
    """George et al. (2018, §3.2): the re-fitted eigenvalues are optimal in K-FAC's basis."""
    sizes = [(4, 5, 3), (3, 6, 4, 3), (5, 2, 4)][seed % 3]
    case = mlp_case(loss, sizes=sizes, n=3 + 4 * seed, seed=seed)
    for kind in ("exact", "empirical"):
        ekfac, kfac, _, _ = errors(case, kind)
        assert ekfac <= kfac * (1 + 1e-12)


@pytest.mark.parametrize("loss", LOSSES)
def test_scalings_are_the_exact_blocks_diagonal_in_the_basis(loss: str) -> None:
    _, _, F, E = errors(mlp_case(loss, sizes=(4, 5, 3, 3), n=6))
    for layer, block in zip(E.layers, E.layout.block_diagonal_blocks(F)):
        QA, QG = E.basis[layer.name]
        order = layer.permutation()
        Q = torch.kron(QG, QA)
        rotated = Q.T @ block[order.argsort()][:, order.argsort()] @ Q
        assert_close(torch.diagonal(rotated), E.scalings[layer.name].flatten())


@pytest.mark.parametrize("loss", LOSSES)
def test_equals_kfac_where_kfac_is_exact(loss: str) -> None:
    case = mlp_case(loss, sizes=(4, 5, 3, 3), n=1)
    ekfac, kfac, F, E = errors(case)
    assert_close(E.to_dense(), F)
    K = KFACApproximation.from_batch(case.model, case.loss_fn, case.X, case.y)
    assert_close(E.to_dense(), K.to_dense())


@pytest.mark.parametrize("kind", ["exact", "empirical"])
def test_optimizer_step_is_the_batch_ekfac_step(kind: str) -> None:
    """With T_inv = 1 and no averaging, the watcher's estimate is from_batch's."""
    case = mlp_case("ce", n=6)
    model = copy.deepcopy(case.model)
    opt = EKFAC(model, case.loss_fn, lr=0.5, damping=0.1, T_inv=1, ema_decay=0.0, kind=kind)
    for _ in range(2):
        args = (model, case.loss_fn, case.X, case.y)
        E = EKFACApproximation.from_batch(*args, kind=kind)
        g = curvature.flat_gradient(*args)
        expected = parameters_to_vector(model.parameters()).detach() - 0.5 * E.solve(g, 0.1)
        opt.zero_grad()
        case.loss_fn(model(case.X), case.y).backward()
        opt.step()
        assert_close(parameters_to_vector(model.parameters()).detach(), expected, rtol=1e-12)


def test_refresh_refits_in_the_new_basis() -> None:
    first, second = mlp_case(n=6, seed=0), mlp_case(n=6, seed=1)
    E = EKFACApproximation.from_batch(first.model, first.loss_fn, first.X, first.y)
    D = EKFACApproximation.from_batch(second.model, second.loss_fn, second.X, second.y)
    E.update(D, 0.0)
    E.refresh(0.1)
    assert_close(E.to_dense(), D.to_dense())


def test_clear_errors() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"'1' \(LayerNorm\).*EK-FAC, Shampoo\) support only"):
        EKFACApproximation.from_batch(model, nn.MSELoss(), torch.randn(2, 3), torch.randn(2, 2))
    case = mlp_case()
    E = EKFACApproximation.from_batch(case.model, case.loss_fn, case.X, case.y)
    K = KFACApproximation.from_batch(case.model, case.loss_fn, case.X, case.y)
    with pytest.raises(ValueError, match="update needs an EK-FAC estimate"):
        E.update(K, 0.5)
    with pytest.raises(ValueError, match="Fisher kind 'type-2' is not supported"):
        EKFAC(case.model, case.loss_fn, kind="type-2")
