"""natlib.kfac against natlib.curvature's exact matrices, hand computations and sympy."""

import math

import pytest
import torch
from cases import LOSSES, loss_function, targets
from helpers import assert_close
from torch import nn

from natlib import curvature, problems
from natlib.kfac import KFACApproximation, nearest_kronecker
from natlib.layout import ParamLayout
from natlib.linalg import damped_inverse, eigh
from natlib.symbolic import kronecker_identities

pytestmark = pytest.mark.usefixtures("float64")


def loss_and_targets(name: str, reduction: str, n: int, c: int, seed: int = 0):
    return loss_function(name, reduction), targets(name, n, c, seed)


def block_diagonal(F: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """The layer-wise block diagonal of a dense matrix in parameter order."""
    return ParamLayout.of(model).block_diagonal(F)


def kfac(model, loss_fn, X, y=None, **options) -> KFACApproximation:
    return KFACApproximation.from_batch(model, loss_fn, X, y, **options)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", LOSSES)
def test_exact_for_one_example(name: str, reduction: str, bias: bool) -> None:
    model = problems.mlp([5, 4, 3, 3], bias=bias, seed=1)
    loss_fn, y = loss_and_targets(name, reduction, 1, 3)
    X = torch.randn(1, 5, generator=torch.Generator().manual_seed(2))
    K = kfac(model, loss_fn, X, y).to_dense()
    assert_close(K, block_diagonal(curvature.ggn(model, loss_fn, X, y), model))
    assert_close(K, block_diagonal(curvature.fisher(model, loss_fn, X), model))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_exact_for_deep_linear_network_with_squared_loss(reduction: str, bias: bool) -> None:
    model = problems.mlp([4, 5, 3, 2], activation="identity", bias=bias, seed=1)
    loss_fn, y = loss_and_targets("mse", reduction, 9, 2)
    X = torch.randn(9, 4, generator=torch.Generator().manual_seed(2))
    expected = block_diagonal(curvature.ggn(model, loss_fn, X, y), model)
    assert_close(kfac(model, loss_fn, X, y).to_dense(), expected)


def test_not_exact_for_a_nonlinear_network_on_a_batch() -> None:
    """The exact cases above are not trivial: with tanh and 9 examples the blocks differ."""
    model = problems.mlp([4, 5, 2], seed=1)
    loss_fn, y = loss_and_targets("mse", "mean", 9, 2)
    X = torch.randn(9, 4, generator=torch.Generator().manual_seed(2))
    expected = block_diagonal(curvature.fisher(model, loss_fn, X), model)
    error = (kfac(model, loss_fn, X).to_dense() - expected).norm() / expected.norm()
    assert error > 1e-3


def test_vector_output_model() -> None:
    """A model whose output is ``(N,)`` (one regression target) is reshaped like curvature."""
    model = nn.Sequential(problems.mlp([3, 1], seed=1), nn.Flatten(0))
    X = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    expected = curvature.fisher(model, nn.MSELoss(), X)
    assert_close(kfac(model, nn.MSELoss(), X).to_dense(), expected)


@pytest.mark.parametrize("name", LOSSES)
def test_mc_factors_converge_to_exact(name: str) -> None:
    model = problems.mlp([4, 5, 3], seed=1)
    loss_fn, _ = loss_and_targets(name, "mean", 6, 3)
    X = torch.randn(6, 4, generator=torch.Generator().manual_seed(2))
    exact = kfac(model, loss_fn, X).factors
    errors = []
    for samples in (10, 10_000):
        generator = torch.Generator().manual_seed(3)
        mc = kfac(model, loss_fn, X, kind="mc", mc_samples=samples, generator=generator)
        error = 0.0
        for layer, (A, G) in exact.items():
            assert torch.equal(mc.factors[layer][0], A)
            error = max(error, ((mc.factors[layer][1] - G).norm() / G.norm()).item())
        errors.append(error)
    assert errors[1] < 0.05 and errors[1] < errors[0] / 5, errors


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", LOSSES)
def test_empirical_factors_by_hand(name: str, reduction: str) -> None:
    """A two-layer tanh network, back-propagated by hand one example at a time."""
    model = problems.mlp([4, 5, 3], seed=1)
    loss_fn, y = loss_and_targets(name, reduction, 6, 3)
    X = torch.randn(6, 4, generator=torch.Generator().manual_seed(2))
    W1, b1, W2, b2 = (p.detach() for p in model.parameters())
    r = 1.0 if reduction == "sum" else (1 / 6 if name == "ce" else 1 / 18)
    A1, A2, G1, G2 = 0.0, 0.0, 0.0, 0.0
    for x, t in zip(X, y):
        h = torch.tanh(W1 @ x + b1)
        f = W2 @ h + b2
        if name == "ce":
            g2 = f.softmax(0) - nn.functional.one_hot(t, 3)
        elif name == "mse":
            g2 = 2 * (f - t)
        else:
            g2 = torch.sigmoid(f) - t
        g1 = (W2.T @ g2) * (1 - h**2)
        a1, a2 = torch.cat([x, torch.ones(1)]), torch.cat([h, torch.ones(1)])
        A1, A2 = A1 + torch.outer(a1, a1) / 6, A2 + torch.outer(a2, a2) / 6
        G1, G2 = G1 + r * torch.outer(g1, g1), G2 + r * torch.outer(g2, g2)
    factors = kfac(model, loss_fn, X, y, kind="empirical").factors
    for actual, expected in zip([*factors["0"], *factors["2"]], [A1, G1, A2, G2]):
        assert_close(actual, expected)


def _approximation(
    bias: bool = True, damping_mode: str = "exact"
) -> tuple[nn.Module, KFACApproximation]:
    model = problems.mlp([4, 3, 2], bias=bias, seed=1)
    X = torch.randn(7, 4, generator=torch.Generator().manual_seed(2))
    return model, kfac(model, nn.CrossEntropyLoss(), X, damping_mode=damping_mode)


@pytest.mark.parametrize("bias", [True, False])
def test_solve_exact_damping(bias: bool) -> None:
    model, approx = _approximation(bias)
    K = approx.to_dense()
    v = torch.randn(K.shape[0], generator=torch.Generator().manual_seed(4))
    expected = torch.linalg.solve(K + 0.1 * torch.eye(K.shape[0]), v)
    assert_close(approx.solve(v, 0.1), expected)


def test_solve_pi_damping_equals_dense_kronecker_inverse() -> None:
    _, approx = _approximation(damping_mode="pi")
    lam = 0.1
    blocks = []
    for layer in approx.layers:
        A, G = approx.factors[layer.name]
        pi = math.sqrt((A.trace() / A.shape[0]) / (G.trace() / G.shape[0]))
        damped_a = A + pi * math.sqrt(lam) * torch.eye(A.shape[0])
        damped_g = G + math.sqrt(lam) / pi * torch.eye(G.shape[0])
        order = layer.permutation()
        blocks.append(torch.kron(damped_g, damped_a)[order][:, order])
    dense = torch.block_diag(*blocks)
    v = torch.randn(dense.shape[0], generator=torch.Generator().manual_seed(4))
    assert_close(approx.solve(v, lam), torch.linalg.solve(dense, v))


def test_solve_refreshes_when_the_damping_changes_and_stays_stale_after_update() -> None:
    model, approx = _approximation()
    v = torch.randn(approx.layout.numel, generator=torch.Generator().manual_seed(4))
    first = approx.solve(v, 0.1)
    K = approx.to_dense()
    assert_close(approx.solve(v, 1.0), torch.linalg.solve(K + torch.eye(len(v)), v))
    X = torch.randn(5, 4, generator=torch.Generator().manual_seed(9))
    approx.update(kfac(model, nn.CrossEntropyLoss(), X, damping_mode="exact"), decay=0.5)
    stale = approx.solve(v, 1.0)  # the inverse of the last refresh, on purpose
    assert_close(stale, torch.linalg.solve(K + torch.eye(len(v)), v))
    approx.refresh(0.1)
    K = approx.to_dense()
    assert_close(approx.solve(v, 0.1), torch.linalg.solve(K + 0.1 * torch.eye(len(v)), v))
    assert not torch.allclose(approx.solve(v, 0.1), first)


def test_cost_counts() -> None:
    _, approx = _approximation()  # layers 4 -> 3 (d_A = 5, d_G = 3) and 3 -> 2 (4, 2)
    factor_numel = 25 + 9 + 16 + 4
    assert approx.memory_bytes == 8 * factor_numel
    assert approx.num_cotangents == 1  # B has C - 1 = 1 column for 2 classes
    flops = approx.flops
    assert flops.update == 2 * 7 * (25 + 9) + 2 * 7 * (16 + 4)
    assert flops.refresh == 9 * (125 + 27 + 64 + 8)
    products = 15 * 8 + 8 * 6
    assert flops.solve == 4 * products
    approx.refresh(0.1)  # eigenvectors and the (d_G, d_A) scale of exact damping
    assert approx.memory_bytes == 8 * (2 * factor_numel + 15 + 8)
    _, factored = _approximation(damping_mode="pi")
    assert factored.flops.solve == 2 * products
    assert factored.flops.refresh == 11 * (125 + 27 + 64 + 8)


def test_nearest_kronecker() -> None:
    """Recovers an exact Kronecker block, and is at least as close as K-FAC otherwise."""
    model = problems.mlp([4, 5, 3], seed=1)
    X = torch.randn(9, 4, generator=torch.Generator().manual_seed(2))
    approx = kfac(model, nn.CrossEntropyLoss(), X)
    F = curvature.fisher(model, nn.CrossEntropyLoss(), X)
    layout = approx.layout
    for layer, kfac_block, block in zip(
        approx.layers,
        layout.block_diagonal_blocks(approx.to_dense()),
        layout.block_diagonal_blocks(F),
    ):
        A, G = nearest_kronecker(kfac_block, layer)
        assert_close(torch.kron(A, G), torch.kron(*approx.factors[layer.name]))
        A, G = nearest_kronecker(block, layer)
        order = layer.permutation()
        single = torch.kron(G, A)[order][:, order]
        assert (single - block).norm() <= (kfac_block - block).norm()
    with pytest.raises(ValueError, match="holds 43 parameters, the matrix is"):
        layout.block_diagonal_blocks(torch.eye(3))


def test_kronecker_identities_hold() -> None:
    for name, residual in kronecker_identities().items():
        assert residual.is_zero_matrix, name


def test_eigh_retries_float32_in_float64(monkeypatch: pytest.MonkeyPatch) -> None:
    real = torch.linalg.eigh

    def fails_in_float32(matrix: torch.Tensor):
        if matrix.dtype == torch.float32:
            raise torch.linalg.LinAlgError("did not converge")
        return real(matrix)

    monkeypatch.setattr(torch.linalg, "eigh", fails_in_float32)
    M = torch.randn(5, 5, dtype=torch.float32)
    values, vectors = eigh(M @ M.T, "test factor")
    assert values.dtype == vectors.dtype == torch.float32
    assert_close((vectors * values) @ vectors.T, M @ M.T, rtol=1e-5)


def test_unsupported_layer_is_named() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"'1' \(LayerNorm\).*only nn.Linear"):
        kfac(model, nn.MSELoss(), torch.randn(2, 3))


def test_non_positive_damping() -> None:
    model, approx = _approximation()
    v = torch.randn(sum(p.numel() for p in model.parameters()))
    for damping in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="damping must be a positive"):
            approx.solve(v, damping)


def test_nan_factor_is_named() -> None:
    _, approx = _approximation()
    A, G = approx.factors["2"]
    approx.factors["2"] = (A, torch.full_like(G, float("nan")))
    with pytest.raises(ValueError, match="factor G of layer '2' contains NaN"):
        approx.solve(torch.zeros(approx.layout.numel), 0.1)


def test_bad_inputs() -> None:
    model = problems.mlp([3, 2], seed=0)
    X = torch.randn(4, 3)
    with pytest.raises(ValueError, match="empirical.*pass y"):
        kfac(model, nn.MSELoss(), X, kind="empirical")
    with pytest.raises(ValueError, match="Fisher kind 'type-1' is not supported"):
        kfac(model, nn.MSELoss(), X, kind="type-1")
    with pytest.raises(ValueError, match="L1Loss is not supported"):
        kfac(model, nn.L1Loss(), X)
    with pytest.raises(ValueError, match="mc_samples"):
        kfac(model, nn.MSELoss(), X, kind="mc", mc_samples=0)
    with pytest.raises(ValueError, match="model output contains NaN"):
        kfac(model, nn.MSELoss(), torch.full((4, 3), float("nan")))
    with pytest.raises(ValueError, match=r"batched inputs \(N, \.\.\., d_in\)"):
        kfac(nn.Sequential(nn.Flatten(0), model), nn.MSELoss(), torch.randn(3))
    shared = problems.mlp([3, 3], seed=0)[0]
    with pytest.raises(ValueError, match="ran twice"):
        kfac(nn.Sequential(shared, nn.Tanh(), shared), nn.MSELoss(), X)
    with pytest.raises(ValueError, match="must be a tensor of shape"):
        kfac(model, nn.MSELoss(), X).solve(torch.zeros(3), 0.1)


def test_damped_inverse_rejects_unknown_mode() -> None:
    eigen = eigh(torch.eye(2), "I")
    with pytest.raises(ValueError, match="damping mode 'tikhonov' is not supported"):
        damped_inverse(eigen, eigen, 0.1, "tikhonov")


def test_unsupported_layers_fall_back_to_the_gradient_step() -> None:
    """``unsupported="gradient"``: the LayerNorm's block is the identity, so its part of the
    solve is the plain gradient divided by 1 + damping; the Linear blocks are unchanged."""
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    X = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    approx = kfac(model, nn.MSELoss(), X, unsupported="gradient", damping_mode="exact")
    assert [b.name for b in approx.fallback] == ["1"]
    assert approx.settings()["fallback"] == ["1"]
    dense = approx.to_dense()
    norm = slice(16, 24)
    assert torch.equal(dense[norm, norm], torch.eye(8))
    assert not dense[norm, :16].any() and not dense[norm, 24:].any()
    v = torch.randn(approx.layout.numel, generator=torch.Generator().manual_seed(1))
    assert_close(approx.matvec(v), dense @ v)
    assert_close(approx.solve(v, 0.1), torch.linalg.solve(dense + 0.1 * torch.eye(len(v)), v))
    with pytest.raises(ValueError, match="unsupported 'skip' is not supported"):
        kfac(model, nn.MSELoss(), X, unsupported="skip")
