"""Small models, losses and batches shared by the test modules (``from cases import ...``).

Every case is tiny enough for dense ``(P, P)`` matrices in float64, and seeded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from natlib import problems

LOSSES = ("ce", "mse", "bce")


@dataclass(frozen=True)
class Case:
    """A model, its loss and one batch."""

    name: str
    model: nn.Module
    loss_fn: nn.Module
    X: torch.Tensor
    y: torch.Tensor


def targets(loss: str, n: int, c: int, seed: int = 0) -> torch.Tensor:
    """Labels for ``loss``: class indices, real targets or probabilities."""
    generator = torch.Generator().manual_seed(seed)
    if loss == "ce":
        return torch.randint(c, (n,), generator=generator)
    if loss == "mse":
        return torch.randn(n, c, generator=generator)
    return torch.rand(n, c, generator=generator)


def loss_function(loss: str, reduction: str = "mean") -> nn.Module:
    kinds = {"ce": nn.CrossEntropyLoss, "mse": nn.MSELoss, "bce": nn.BCEWithLogitsLoss}
    return kinds[loss](reduction=reduction)


def mlp_case(
    loss: str = "ce",
    sizes: tuple[int, ...] = (4, 5, 3),
    n: int = 7,
    reduction: str = "mean",
    bias: bool = True,
    activation: str = "tanh",
    seed: int = 0,
) -> Case:
    """A tanh MLP of ``sizes`` on ``n`` random inputs (float64 under the fixture)."""
    model = problems.mlp(list(sizes), bias=bias, activation=activation, seed=seed + 1)
    X = torch.randn(n, sizes[0], generator=torch.Generator().manual_seed(seed + 2))
    name = f"{loss}-{reduction}-{'x'.join(map(str, sizes))}-n{n}"
    return Case(name, model, loss_function(loss, reduction), X, targets(loss, n, sizes[-1], seed))


def vector(size: int, seed: int = 4) -> torch.Tensor:
    """A random flat vector."""
    return torch.randn(size, generator=torch.Generator().manual_seed(seed))
