"""The FLOP and memory model: its formulas, and that K-FAC's own counts are the same model."""

from dataclasses import astuple

import pytest
import torch
from torch import nn

from natlib import costmodel, problems
from natlib.kfac import KFACApproximation
from natlib.linalg import EIGH_FLOPS_PER_CUBE

pytestmark = pytest.mark.usefixtures("float64")


def test_per_factor_counts_add_up_to_the_kronecker_counts():
    d_a, d_g, c = 7, 5, 13.0
    assert costmodel.kronecker_refresh_flops(d_a, d_g, "pi", c) == (
        costmodel.factor_refresh_flops(d_a, c) + costmodel.factor_refresh_flops(d_g, c)
    )
    assert costmodel.kronecker_refresh_flops(d_a, d_g, "exact", c) == (
        costmodel.eigh_flops(d_a, c) + costmodel.eigh_flops(d_g, c)
    )
    # G^{-1} V A^{-1} on a (d_g, d_a) gradient: G^{-1} on d_a columns, A^{-1} on d_g rows
    assert costmodel.kronecker_solve_flops(d_a, d_g, "pi") == (
        costmodel.factor_apply_flops(d_g, d_a) + costmodel.factor_apply_flops(d_a, d_g)
    )
    assert costmodel.forward_backward_flops(3, 4, 10) == 3 * costmodel.cotangent_backward_flops(
        3, 4, 10, 1
    )


def test_step_cost_counts_every_part():
    d, B, L = 512, 128, 3
    cost = costmodel.step_cost(d, B, depth=L, T_cov=2, T_inv=10, eigh_constant=9)
    assert cost.forward_backward == 6 * B * L * d**2
    assert cost.factors == 4 * B * L * d**2 / 2
    assert cost.sampled_backward == 2 * B * L * d**2 / 2
    assert cost.precondition == 4 * L * d**3
    assert cost.refresh == 2 * 11 * L * d**3 / 10
    assert cost.total == pytest.approx(sum(cost.parts().values()))
    assert cost.parts()["factors"] == cost.factors + cost.sampled_backward
    assert tuple(cost.parts()) == costmodel.PARTS
    empirical = costmodel.step_cost(d, B, depth=L, T_cov=2, T_inv=10, kind="empirical")
    assert empirical.sampled_backward == 0 and empirical.factors == cost.factors
    exact = costmodel.step_cost(d, B, depth=L, kind="exact", damping_mode="exact")
    assert exact.sampled_backward == 2 * B * L * d**3  # one cotangent per output
    assert exact.precondition == 8 * L * d**3 and exact.refresh == 2 * 9 * L * d**3


@pytest.mark.parametrize(
    ("d", "B", "T_cov", "T_inv", "c"), [(256, 64, 1, 1, 9), (1024, 512, 5, 20, 40)]
)
def test_overhead_follows_the_closed_form(d, B, T_cov, T_inv, c):
    cost = costmodel.step_cost(d, B, depth=4, T_cov=T_cov, T_inv=T_inv, eigh_constant=c)
    expected = 1 + 1 / T_cov + 2 * d / (3 * B) + (c + 2) * d / (3 * B * T_inv)
    assert cost.overhead == pytest.approx(expected, rel=1e-12)


def test_dominant_part_moves_from_batch_work_to_cubic_work():
    assert costmodel.step_cost(64, 4096, T_inv=100).dominant() == "per-example work"
    assert costmodel.step_cost(8192, 64, T_inv=1000).dominant() == "preconditioning"
    assert costmodel.step_cost(8192, 64, T_inv=1, eigh_constant=50).dominant() == "refresh"
    # preconditioning (4 d^3) overtakes forward, backward and factors (12 B d^2) at d = 3B
    assert costmodel.step_cost(290, 100, T_inv=10**6).dominant() == "per-example work"
    assert costmodel.step_cost(310, 100, T_inv=10**6).dominant() == "preconditioning"
    assert set(costmodel.GROUPS) == {"per-example work", "preconditioning", "refresh"}
    assert sorted(p for parts in costmodel.GROUPS.values() for p in parts) == sorted(
        costmodel.PARTS
    )


def test_step_cost_rejects_bad_input():
    with pytest.raises(ValueError, match="Fisher kind"):
        costmodel.step_cost(64, 64, kind="type-2")
    with pytest.raises(ValueError, match="damping mode"):
        costmodel.step_cost(64, 64, damping_mode="tikhonov")
    with pytest.raises(ValueError, match="batch must be a positive"):
        costmodel.step_cost(64, 0)
    with pytest.raises(ValueError, match="T_inv must be a positive integer"):
        costmodel.step_cost(64, 64, T_inv=0)


def test_layer_memory_and_the_vocabulary_layer():
    memory = costmodel.layer_memory(3, 5, element_size=8, bias=True)
    assert memory.weights == 5 * 4 * 8
    assert memory.factors == memory.inverses == (16 + 25) * 8
    exact = costmodel.layer_memory(3, 5, element_size=8, damping_mode="exact")
    assert exact.inverses == memory.inverses + 5 * 4 * 8  # the eigenvalue scale
    vocabulary = costmodel.layer_memory(1024, 50_000, bias=False)
    assert vocabulary.factors - 1024**2 * 4 == 10_000_000_000  # G alone: 10 GB in float32


def test_factor_cost_forms():
    d, m = 2500, 10
    full = costmodel.factor_cost(d, m, "full", eigh_constant=9)
    assert (full.bytes, full.refresh_flops, full.apply_flops) == (
        d * d * 4,
        11 * d**3,
        2 * d * d * m,
    )
    blocks = costmodel.factor_cost(d, m, "blocks", block=1000)  # 1000, 1000, 500
    assert blocks.bytes == (2 * 1000**2 + 500**2) * 4
    assert blocks.refresh_flops == (EIGH_FLOPS_PER_CUBE + 2) * (2 * 1000**3 + 500**3)
    assert blocks.apply_flops == 2 * (2 * 1000**2 + 500**2) * m
    one_block = costmodel.factor_cost(d, m, "blocks", block=d, eigh_constant=9)
    assert one_block == costmodel.FactorCost("blocks", *astuple(full)[1:])
    assert costmodel.factor_cost(d, m, "diagonal").bytes == d * 4
    assert costmodel.factor_cost(d, m, "identity").apply_flops == 0
    with pytest.raises(ValueError, match="form"):
        costmodel.factor_cost(d, m, "low-rank")
    with pytest.raises(ValueError, match="block"):
        costmodel.factor_cost(d, m, "blocks", block=0)


# ----------------------------------------------------------------- one model with natlib.kfac


def _square_mlp(width: int, depth: int, batch: int):
    model = problems.mlp([width] * (depth + 1), bias=False, seed=0)
    generator = torch.Generator().manual_seed(0)
    X = torch.randn(batch, width, generator=generator)
    y = torch.randn(batch, width, generator=generator)
    return model, X, y


@pytest.mark.parametrize("kind", ["mc", "exact", "empirical"])
@pytest.mark.parametrize("mode", ["pi", "exact"])
def test_kfac_flops_are_the_step_cost_of_a_square_mlp(kind, mode):
    width, depth, batch = 6, 3, 10
    model, X, y = _square_mlp(width, depth, batch)
    kfac = KFACApproximation.from_batch(model, nn.MSELoss(), X, y, kind=kind, damping_mode=mode)
    cost = costmodel.step_cost(width, batch, depth, kind=kind, damping_mode=mode)
    flops = kfac.flops
    assert flops.update == cost.factors
    assert flops.refresh == cost.refresh
    assert flops.solve == cost.precondition
    assert kfac.step_cost(T_cov=2, T_inv=5) == costmodel.step_cost(
        width, batch, depth, T_cov=2, T_inv=5, kind=kind, damping_mode=mode
    )


@pytest.mark.parametrize("mode", ["pi", "exact"])
def test_kfac_memory_is_the_layer_memory(mode):
    model = problems.mlp([5, 7, 3], seed=0)
    X, y = torch.randn(8, 5), torch.randint(3, (8,))
    kfac = KFACApproximation.from_batch(model, nn.CrossEntropyLoss(), X, y, damping_mode=mode)
    layers = [
        costmodel.layer_memory(5, 7, 8, True, mode),
        costmodel.layer_memory(7, 3, 8, True, mode),
    ]
    assert kfac.memory_bytes == sum(m.factors for m in layers)
    kfac.refresh(1e-3)
    assert kfac.memory_bytes == sum(m.factors + m.inverses for m in layers)


def test_network_step_cost_is_step_cost_for_square_layers() -> None:
    """Given K-FAC's own counts of a square MLP, the network model is chapter 4's step cost."""
    d, B, L, T_cov, T_inv = 64, 32, 3, 2, 5
    refresh, solve = costmodel.kronecker_layers_flops([(d, d)] * L, "pi")
    update = L * costmodel.kronecker_factor_flops(d, d, B, 1)
    network = costmodel.network_step_cost([(d, d, B)] * L, update, refresh, solve, T_cov, T_inv)
    assert network == costmodel.step_cost(d, B, L, T_cov, T_inv)
    with pytest.raises(ValueError, match="T_inv"):
        costmodel.network_step_cost([(d, d, B)], update, refresh, solve, T_inv=0)
    with pytest.raises(ValueError, match="cotangents must be an integer of at least 0"):
        costmodel.network_step_cost([(d, d, B)], update, refresh, solve, cotangents=-1)
