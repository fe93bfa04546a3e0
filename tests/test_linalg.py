"""natlib.linalg: eigendecomposition with float64 retry, damped Kronecker inverses, Gram
products and conjugate gradients, against dense linear algebra in float64."""

import math

import pytest
import torch
from helpers import assert_close

from natlib.linalg import (
    EigenInverse,
    FactoredInverse,
    condition_number,
    conjugate_gradient,
    damped_inverse,
    eigh,
    gram,
)

pytestmark = pytest.mark.usefixtures("float64")


def _factors(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    M, N = torch.randn(4, 6, generator=generator), torch.randn(3, 5, generator=generator)
    return M @ M.T / 6, N @ N.T / 5


def test_eigen_inverse_is_the_exact_damped_kronecker_inverse() -> None:
    A, G = _factors()
    V = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    inverse = EigenInverse.of(eigh(A, "A"), eigh(G, "G"), 0.1)
    # Row-major vec: vec(G V A) = (G kron A) vec(V) for symmetric A.
    dense = torch.kron(G, A) + 0.1 * torch.eye(12)
    assert_close(inverse.apply(V).flatten(), torch.linalg.solve(dense, V.flatten()))


def test_factored_inverse_uses_pi_damping() -> None:
    A, G = _factors()
    V = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    lam = 0.1
    pi = math.sqrt((A.trace() / 4) / (G.trace() / 3))
    damped = torch.kron(
        G + math.sqrt(lam) / pi * torch.eye(3), A + pi * math.sqrt(lam) * torch.eye(4)
    )
    inverse = damped_inverse(eigh(A, "A"), eigh(G, "G"), lam, "pi")
    assert isinstance(inverse, FactoredInverse)
    assert_close(inverse.apply(V).flatten(), torch.linalg.solve(damped, V.flatten()))


def test_pi_is_one_when_a_factor_vanishes() -> None:
    A, _ = _factors()
    zero = torch.zeros(3, 3)
    inverse = damped_inverse(eigh(A, "A"), eigh(zero, "G"), 0.25, "pi")
    assert_close(inverse.G_inv, torch.eye(3) / 0.5)


@pytest.mark.parametrize("damping", [0.0, -1.0, float("nan"), float("inf")])
def test_damped_inverse_rejects_bad_damping(damping: float) -> None:
    A, G = _factors()
    with pytest.raises(ValueError, match="damping must be a positive finite number"):
        damped_inverse(eigh(A, "A"), eigh(G, "G"), damping, "exact")


def test_eigh_names_a_non_finite_matrix() -> None:
    with pytest.raises(ValueError, match="factor X contains NaN"):
        eigh(torch.full((2, 2), float("nan")), "factor X")


def test_eigh_names_a_float64_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    def fails(matrix: torch.Tensor):
        raise torch.linalg.LinAlgError("did not converge")

    monkeypatch.setattr(torch.linalg, "eigh", fails)
    with pytest.raises(ValueError, match="eigendecomposition of factor Y did not converge"):
        eigh(torch.eye(2), "factor Y")
    with pytest.raises(ValueError, match="in float64 either"):
        eigh(torch.eye(2, dtype=torch.float32), "factor Y")


@pytest.mark.parametrize("columns", [3, 1500])
def test_gram_equals_the_matrix_product(columns: int) -> None:
    M = torch.randn(7, columns, generator=torch.Generator().manual_seed(0))
    assert_close(gram(M), M.T @ M)


def test_conjugate_gradient_reports_iterations_and_convergence():
    A = torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64))
    b = torch.ones(5, dtype=torch.float64)
    result = conjugate_gradient(lambda v: A @ v, b)
    assert result.converged and result.iterations == 5
    assert_close(result.x, 1 / torch.arange(1.0, 6.0, dtype=torch.float64))
    truncated = conjugate_gradient(lambda v: A @ v, b, max_iter=2)
    assert not truncated.converged and truncated.iterations == 2 and truncated.residual > 1e-3


def test_conjugate_gradient_warm_start_reaches_the_same_solution():
    A = torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64))
    b = torch.ones(5, dtype=torch.float64)
    solution = 1 / torch.arange(1.0, 6.0, dtype=torch.float64)
    at_solution = conjugate_gradient(lambda v: A @ v, b, x0=solution)
    assert at_solution.converged and at_solution.iterations == 0
    warm = conjugate_gradient(lambda v: A @ v, b, x0=torch.ones(5, dtype=torch.float64))
    assert warm.converged
    assert_close(warm.x, solution)
    with pytest.raises(ValueError, match="x0 must have the shape of b"):
        conjugate_gradient(lambda v: A @ v, b, x0=torch.ones(4, dtype=torch.float64))


def test_conjugate_gradient_rejects_indefinite_matrices():
    A = torch.diag(torch.tensor([1.0, -1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="not positive definite"):
        conjugate_gradient(lambda v: A @ v, torch.ones(2, dtype=torch.float64))


def test_conjugate_gradient_rejects_bad_tolerance() -> None:
    for tol in (0.0, float("nan")):
        with pytest.raises(ValueError, match="tol must be a positive finite number"):
            conjugate_gradient(lambda v: v, torch.ones(2), tol=tol)


def test_condition_number_estimates_the_spectral_condition_number():
    generator = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(30, 30, generator=generator, dtype=torch.float64))
    C = (Q * torch.logspace(-4, 2, 30, dtype=torch.float64)) @ Q.T
    estimate = condition_number(C, torch.linalg.cholesky(C))
    assert 0.5e6 < estimate <= 1e6 * (1 + 1e-9)  # a lower bound, close after 20 iterations
