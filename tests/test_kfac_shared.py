"""K-FAC-expand and K-FAC-reduce (Eschenhagen et al., 2023) for nn.Linear on (N, T, d) inputs,
against the exact GGN's blocks in their exact cases, and bounded elsewhere."""

from __future__ import annotations

import pytest
import torch
from cases import loss_function, targets
from helpers import assert_close
from torch import nn

from natlib import curvature
from natlib.kfac import KFACApproximation
from natlib.layout import ParamLayout

pytestmark = pytest.mark.usefixtures("float64")

N, T, D = 3, 5, 3


class MeanOverPositions(nn.Module):
    """``(N, T, d) -> (N, d)``: the reduction of the reduce setting."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(1)


def expand_net(activation: type[nn.Module] = nn.Identity, bias: bool = True) -> nn.Module:
    """Position-wise layers on ``(N, T, 3)``, outputs ``(N, T, 2)``: the expand setting."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, 4, bias), activation(), nn.Linear(4, 2, bias))


def reduce_net(activation: type[nn.Module] = nn.Identity, bias: bool = True) -> nn.Module:
    """Weight-shared layers, a mean over positions, then a linear head: the reduce setting."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(D, 4, bias),
        nn.Linear(4, 4, bias),
        MeanOverPositions(),
        activation(),
        nn.Linear(4, 2, bias),
    )


def sequences(n: int = N, t: int = T, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, t, D, generator=torch.Generator().manual_seed(seed))


def relative_errors(model, loss_fn, X, y, approximation: str) -> list[float]:
    """Per layer, ``||K - GGN|| / ||GGN||`` on the layer's diagonal block."""
    K = KFACApproximation.from_batch(model, loss_fn, X, y, approximation=approximation)
    layout = ParamLayout.of(model)
    exact = layout.block_diagonal_blocks(curvature.ggn(model, loss_fn, X, y))
    approx = layout.block_diagonal_blocks(K.to_dense())
    return [((a - e).norm() / e.norm()).item() for a, e in zip(approx, exact)]


def block_diagonal_ggn(model, loss_fn, X, y) -> torch.Tensor:
    return ParamLayout.of(model).block_diagonal(curvature.ggn(model, loss_fn, X, y))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_expand_exact_for_deep_linear_network_in_the_expand_setting(
    reduction: str, bias: bool
) -> None:
    """Eschenhagen et al. (2023), Prop. 1: MSE on every position of a deep linear network
    applied position by position, any N and T."""
    model, loss_fn = expand_net(bias=bias), loss_function("mse", reduction)
    X, y = sequences(), torch.randn(N, T, 2, generator=torch.Generator().manual_seed(2))
    K = KFACApproximation.from_batch(model, loss_fn, X, y, approximation="expand")
    assert K.positions == {"0": T, "2": T}
    assert_close(K.to_dense(), block_diagonal_ggn(model, loss_fn, X, y))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reduce_exact_for_deep_linear_network_in_the_reduce_setting(
    reduction: str, bias: bool
) -> None:
    """Eschenhagen et al. (2023), Prop. 2: MSE after a mean over positions of a deep linear
    network, any N and T (the head after the mean has R = 1)."""
    model, loss_fn = reduce_net(bias=bias), loss_function("mse", reduction)
    X, y = sequences(), targets("mse", N, 2)
    K = KFACApproximation.from_batch(model, loss_fn, X, y, approximation="reduce")
    assert K.positions == {"0": T, "1": T, "4": 1}
    assert_close(K.to_dense(), block_diagonal_ggn(model, loss_fn, X, y))


@pytest.mark.parametrize("loss", ["ce", "mse", "bce"])
def test_reduce_exact_for_one_example_in_the_reduce_setting(loss: str) -> None:
    """One sequence, nonlinear after the mean: the output gradient of the weight-shared layers
    is the same at every position, so K-FAC-reduce is exact for any loss."""
    model, loss_fn = reduce_net(nn.Tanh), loss_function(loss)
    X, y = sequences(1), targets(loss, 1, 2)
    K = KFACApproximation.from_batch(model, loss_fn, X, y, approximation="reduce")
    assert_close(K.to_dense(), block_diagonal_ggn(model, loss_fn, X, y))


def test_each_is_inexact_in_the_other_setting() -> None:
    """The exact cases are not trivial: expand in the reduce setting and reduce in the expand
    setting miss the shared layers' blocks."""
    loss_fn = loss_function("mse")
    X = sequences()
    errors = relative_errors(reduce_net(), loss_fn, X, targets("mse", N, 2), "expand")
    assert min(errors[:2]) > 1e-2, errors
    y = torch.randn(N, T, 2, generator=torch.Generator().manual_seed(2))
    errors = relative_errors(expand_net(), loss_fn, X, y, "reduce")
    assert min(errors) > 1e-2, errors


def test_expand_is_plain_kfac_on_the_positions_as_examples() -> None:
    """In the expand setting (position-wise tanh network, Bernoulli loss on every position)
    K-FAC-expand and the exact GGN both equal those of the N T positions taken as a batch of
    examples, so its error is the plain K-FAC's (here 0.96 for the first layer, 0.02 for the
    second: K-FAC is far off on this tiny tanh layer, but no further than on an MLP)."""
    model, loss_fn = expand_net(nn.Tanh), nn.BCEWithLogitsLoss()
    X, y = sequences(), torch.rand(N, T, 2, generator=torch.Generator().manual_seed(0))
    shared = KFACApproximation.from_batch(model, loss_fn, X, y, approximation="expand")
    flat = KFACApproximation.from_batch(model, loss_fn, X.reshape(N * T, D), y.reshape(N * T, 2))
    assert_close(shared.to_dense(), flat.to_dense())
    errors = relative_errors(model, loss_fn, X, y, "expand")
    flat_errors = relative_errors(
        model, loss_fn, X.reshape(N * T, D), y.reshape(N * T, 2), "expand"
    )
    assert errors == pytest.approx(flat_errors, rel=1e-8)
    assert max(errors) < 1.0, errors


def test_reduce_bounded_error_for_a_tanh_network() -> None:
    """Tanh after the mean, cross-entropy, three sequences: each layer's relative Frobenius
    error stays below 0.05 (measured: at most 0.0093)."""
    model, loss_fn = reduce_net(nn.Tanh), nn.CrossEntropyLoss()
    errors = relative_errors(model, loss_fn, sequences(), targets("ce", N, 2), "reduce")
    assert max(errors) < 0.05, errors


def test_same_as_plain_kfac_without_shared_positions() -> None:
    """On ``(N, d)`` inputs both approximations are the plain K-FAC, bit for bit."""
    model, X = expand_net(nn.Tanh), sequences()[:, 0]
    y, loss_fn = targets("ce", N, 2), nn.CrossEntropyLoss()
    expand = KFACApproximation.from_batch(model, loss_fn, X, y, approximation="expand")
    reduce = KFACApproximation.from_batch(model, loss_fn, X, y, approximation="reduce")
    for name, (A, G) in expand.factors.items():
        assert torch.equal(A, reduce.factors[name][0]) and torch.equal(G, reduce.factors[name][1])


@pytest.mark.parametrize("approximation", ["expand", "reduce"])
def test_empirical_watcher_matches_from_batch(approximation: str) -> None:
    """The optimiser's hooks (``kind="empirical"``, G from the loss's own backward pass)
    give the factors of ``from_batch``."""
    model, loss_fn = reduce_net(nn.Tanh), nn.CrossEntropyLoss()
    X, y = sequences(), targets("ce", N, 2)
    watcher = KFACApproximation.watch(model, loss_fn, kind="empirical", approximation=approximation)
    watcher.start((X,))
    output = model(X)
    watcher.finish(output)
    loss_fn(output, y).backward()
    watched = watcher.estimate()
    watcher.remove()
    direct = KFACApproximation.from_batch(
        model, loss_fn, X, y, kind="empirical", approximation=approximation
    )
    assert watched.positions == direct.positions
    assert_close(watched.to_dense(), direct.to_dense())


def test_unknown_approximation() -> None:
    with pytest.raises(ValueError, match="approximation 'average' is not supported"):
        KFACApproximation.from_batch(
            expand_net(), nn.MSELoss(), sequences(), approximation="average"
        )


def test_exact_kind_is_biased_when_attention_mixes_positions() -> None:
    """The caveat in natlib.factors: on a tiny transformer (float64), K-FAC with kind="exact"
    back-propagates every output position's cotangents together, so the layers whose positions
    attention mixes later (keys and values) get cross-position products; one example per
    (sequence, position) (natlib.language.PerPosition) removes them, and the Monte-Carlo
    kind, averaged over many samples, converges to that and not to the exact kind. Layers that
    nothing mixes afterwards (queries, output projection, MLP, head) are unaffected under
    expand."""
    from natlib import language

    data = language.stdlib_chars(context=6, train_chars=1_000, test_chars=10)
    X, y = data.X_train[:3], data.y_train[:3]
    model = language.transformer(context=6, width=4, layers=1, heads=2, seed=0).double()
    wrapped = language.PerPosition(model)
    rows, targets = language.per_position(X, y)
    loss_fn = data.loss_fn
    assert_close(wrapped(rows), model(X))
    ggn = curvature.ggn(wrapped, loss_fn, rows, targets)
    options = dict(approximation="expand", unsupported="gradient")
    together = KFACApproximation.from_batch(model, loss_fn, X, y.flatten(), **options)
    apart = KFACApproximation.from_batch(wrapped, loss_fn, rows, targets, **options)
    sampled = KFACApproximation.from_batch(
        model, loss_fn, X, y.flatten(), kind="mc", mc_samples=4000,
        generator=torch.Generator().manual_seed(0), **options,
    )  # fmt: skip
    name = "blocks.0.attention.{}".format
    for layer in ("key", "value"):
        _, G_together = together.factors[name(layer)]
        _, G_apart = apart.factors["model." + name(layer)]
        _, G_sampled = sampled.factors[name(layer)]
        assert (G_together - G_apart).norm() > 0.1 * G_apart.norm()
        assert (G_sampled - G_apart).norm() < 0.1 * G_apart.norm()
    for layer in ("blocks.0.attention.query", "blocks.0.mlp.2", "head"):
        assert_close(together.factors[layer][1], apart.factors["model." + layer][1])
    errors = together.block_errors(ggn)
    assert set(errors) == {layer.name for layer in together.layers}
    assert errors["head"] == pytest.approx(apart.block_errors(ggn)["model.head"], rel=1e-9)
