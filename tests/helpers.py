"""Assertions shared by the test modules (imported as ``from helpers import ...``)."""

import torch

RTOL = 1e-10


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL) -> None:
    """Relative Frobenius error ``||actual - expected|| / ||expected||`` below ``rtol``,
    printing the error when it is not."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    error = (actual - expected).norm() / expected.norm().clamp_min(1e-300)
    assert error <= rtol, f"relative error {error:.3e} > {rtol:.0e}"
