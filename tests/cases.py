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
    """A model, its loss and one batch; unpacks as ``model, loss_fn, X, y``."""

    name: str
    model: nn.Module
    loss_fn: nn.Module
    X: torch.Tensor
    y: torch.Tensor

    def __iter__(self):
        return iter((self.model, self.loss_fn, self.X, self.y))


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


class Reparametrised(nn.Module):
    """A linear model whose weights are exp(phi): a single vector parameter, nonlinear map."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.phi = nn.Parameter(0.3 * torch.randn(d_in * d_out))
        self.shape = (d_out, d_in)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return X @ torch.exp(self.phi).view(self.shape).T


#: The model and output shapes the curvature functions must handle (:func:`shape_case`).
SHAPES = ("ce", "mse", "bce", "mse-vector", "reparam")


def shape_case(name: str, reduction: str = "mean", n: int = 5) -> Case:
    """A 3-4-3 tanh network on ``n`` random inputs for each loss (hard 0/1 targets for BCE),
    a network with ``(N,)`` outputs (``"mse-vector"``) or :class:`Reparametrised`."""
    generator = torch.Generator().manual_seed(0)
    X = torch.randn(n, 3, generator=generator)
    model: nn.Module = problems.mlp([3, 4, 3], seed=1)
    if name == "ce":
        y = torch.randint(3, (n,), generator=torch.Generator().manual_seed(3))
        return Case(name, model, loss_function("ce", reduction), X, y)
    if name == "bce":
        y = torch.rand(n, 3, generator=generator).round()
        return Case(name, model, loss_function("bce", reduction), X, y)
    y = torch.randn(n, 3, generator=generator)
    if name == "mse":
        return Case(name, model, loss_function("mse", reduction), X, y)
    if name == "mse-vector":
        model = nn.Sequential(problems.mlp([3, 4, 1], seed=1), nn.Flatten(0))
        return Case(name, model, loss_function("mse", reduction), X, y[:, 0])
    if name == "reparam":
        torch.manual_seed(2)
        return Case(name, Reparametrised(3, 2), loss_function("mse", reduction), X, y[:, :2])
    raise ValueError(f"unknown case {name!r}; use one of {SHAPES}")
