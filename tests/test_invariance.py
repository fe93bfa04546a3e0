"""K-FAC's per-layer affine invariance (Martens & Grosse, 2015, §10), measured."""

import pytest
import torch

from natlib import invariance, problems


@pytest.fixture(scope="module")
def problem():
    generator = torch.Generator().manual_seed(0)
    X = torch.randn(200, 6, generator=generator, dtype=torch.float64)
    y = torch.randn(200, 3, generator=generator, dtype=torch.float64)
    return problems.mlp([6, 5, 3], seed=0).double(), torch.nn.MSELoss(), X, y


def test_transformed_network_computes_the_same_function(problem):
    model, _, X, _ = problem
    other, maps = invariance.transformed(model, spread=1.0, seed=1)
    assert len(maps) == 2
    torch.testing.assert_close(other(X), model(X), rtol=1e-10, atol=1e-10)
    assert sum(p.numel() for p in other.parameters()) == sum(p.numel() for p in model.parameters())


def test_undamped_kfac_is_invariant_and_damping_breaks_it(problem):
    model, loss_fn, X, y = problem
    tiny = invariance.step_discrepancy(model, loss_fn, X, y, 1e-12, "exact")
    damped = invariance.step_discrepancy(model, loss_fn, X, y, 1e-1, "exact")
    gd = invariance.step_discrepancy(model, loss_fn, X, y, None)
    assert tiny < 1e-7
    assert damped > 1e-3
    assert gd > 1e-1


def test_to_original_rejects_a_step_of_the_wrong_size(problem):
    model, *_ = problem
    _, maps = invariance.transformed(model)
    with pytest.raises(ValueError, match="entries"):
        invariance.to_original(maps, torch.zeros(3, dtype=torch.float64))


def test_transformed_needs_a_sequential_with_biases():
    with pytest.raises(ValueError, match="Sequential"):
        invariance.transformed(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="bias"):
        invariance.transformed(problems.mlp([2, 2], bias=False))
