"""natlib.layout: one parameter layout, against parameters_to_vector."""

import pytest
import torch
from cases import mlp_case, vector
from torch import nn
from torch.nn.utils import parameters_to_vector

from natlib import problems
from natlib.layout import LinearLayer, ParamLayout


def test_split_and_flatten_follow_parameters_to_vector() -> None:
    model = problems.mlp([4, 5, 3], seed=0)
    layout = ParamLayout.of(model)
    theta = parameters_to_vector(model.parameters()).detach()
    parts = layout.split(theta)
    assert [p.shape for p in parts] == [p.shape for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(parts, model.parameters()))
    assert torch.equal(layout.flatten(parts), theta)
    assert layout.names == ("0.weight", "0.bias", "2.weight", "2.bias")
    assert [(b.name, b.start, b.stop) for b in layout.blocks] == [("0", 0, 25), ("2", 25, 43)]


@pytest.mark.parametrize("bias", [True, False])
def test_linear_matrix_round_trip(bias: bool) -> None:
    case = mlp_case(sizes=(4, 5, 3), bias=bias)
    layout = ParamLayout.of(case.model, kronecker=True)
    v = vector(layout.numel)
    for layer in layout.blocks:
        assert isinstance(layer, LinearLayer)
        M = layer.matrix(v)
        assert M.shape == (layer.d_out, layer.d_a)
        assert torch.equal(layer.flat(M), v[layer.slice])
        # The permutation maps row-major vec([W | b]) to parameter order.
        assert torch.equal(M.flatten()[layer.permutation()], v[layer.slice])


def test_block_diagonal() -> None:
    layout = ParamLayout.of(problems.mlp([2, 2, 1], seed=0))
    M = torch.arange(81.0).view(9, 9)
    D = layout.block_diagonal(M)
    assert torch.equal(D[:6, :6], M[:6, :6]) and torch.equal(D[6:, 6:], M[6:, 6:])
    assert not D[:6, 6:].any() and not D[6:, :6].any()


def test_clear_errors() -> None:
    shared = nn.Linear(3, 3)
    tied = nn.Sequential(shared, nn.Tanh(), nn.Linear(3, 3))
    tied[2].weight = shared.weight
    with pytest.raises(ValueError, match="'2.weight' is the same tensor as '0.weight'"):
        ParamLayout.of(tied)
    with pytest.raises(ValueError, match=r"'1' \(LayerNorm\).*only nn.Linear"):
        ParamLayout.of(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)), kronecker=True)
    with pytest.raises(ValueError, match="no parameters"):
        ParamLayout.of(nn.Tanh())
    with pytest.raises(TypeError, match="torch.nn.Module"):
        ParamLayout.of("model")
    frozen = problems.mlp([2, 2], seed=0)
    frozen[0].bias.requires_grad_(False)
    with pytest.raises(ValueError, match="'0.bias' does not require grad"):
        ParamLayout.of(frozen)
    layout = ParamLayout.of(problems.mlp([2, 2], seed=0))
    with pytest.raises(ValueError, match=r"shape \(6,\), got \(5,\)"):
        layout.split(torch.zeros(5))
