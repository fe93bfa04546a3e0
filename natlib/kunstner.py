r"""The regression experiments of Kunstner, Balles & Hennig (2019) on the empirical Fisher.

**Figure 1.** Linear regression :math:`y = x^\top\theta + \varepsilon`,
:math:`\varepsilon \sim \mathcal{N}(0, 1)`, with their Gaussian prior of variance
:math:`\sigma_p^2` scaled by :math:`1/N`:

.. math::
    L(\theta) &= \frac{1}{2N} \sum_n (x_n^\top\theta - y_n)^2 + \frac{\lVert\theta\rVert^2}
    {2\sigma_p^2 N}, \\
    \nabla L &= \frac{X^\top r}{N} + \frac{\theta}{\sigma_p^2 N}, \quad
    F = H = \frac{X^\top X}{N} + \frac{I}{\sigma_p^2 N},

and the empirical Fisher of the data term,
:math:`\tilde F(\theta) = \frac1N \sum_n r_n^2 x_n x_n^\top` with residuals
:math:`r = X\theta - y`. :class:`LinearRegression` evaluates these for many parameter vectors
at once, so :func:`flow` can follow the preconditioned gradient fields
:math:`\dot\theta = -\gamma (C + \lambda I)^{-1} \nabla L` the way their code does (Euler
steps). :meth:`LinearRegression.as_torch` gives the same data term as a model and loss that
:mod:`natlib.curvature` takes, and the tests check the closed forms against it.

**Figure 2.** Logistic regression on three data sets from their code, one well specified and
two misspecified (:func:`natlib.problems.kunstner_logistic`, re-exported here as
``logistic_dataset`` with ``LOGISTIC_DATASETS``); :func:`misspecification` compares the
Fisher and the empirical Fisher at the maximum-likelihood parameters, both from
:mod:`natlib.curvature`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from natlib import curvature, runtime
from natlib.checks import check_choice
from natlib.problems import LOGISTIC_DATASETS as LOGISTIC_DATASETS
from natlib.problems import LogisticDataset as LogisticDataset
from natlib.problems import kunstner_logistic as logistic_dataset  # noqa: F401 (re-export)

Preconditioner = Literal["gd", "ngd", "ef"]
#: The preconditioners :func:`field` accepts.
PRECONDITIONERS: tuple[str, ...] = get_args(Preconditioner)


@dataclass(frozen=True)
class LinearRegression:
    r"""Kunstner et al.'s linear regression posterior; ``theta`` may be batched ``(..., P)``.

    Everything is a polynomial in :math:`\theta` whose coefficients are moments of the data,
    computed once, so evaluating a field costs the same for any :math:`N`:
    :math:`\nabla L = F\theta - X^\top y / N` and
    :math:`\tilde F_{ij}(\theta) = \theta^\top M^{(4)}_{ij}\theta - 2\, M^{(3)}_{ij}{}^\top
    \theta + M^{(2)}_{ij}` with :math:`M^{(4)}_{abij} = \frac1N\sum_n x_a x_b x_i x_j`,
    :math:`M^{(3)}_{aij} = \frac1N\sum_n y\, x_a x_i x_j`,
    :math:`M^{(2)}_{ij} = \frac1N\sum_n y^2 x_i x_j`.
    """

    X: Tensor
    y: Tensor
    prior_variance: float = 0.1

    @cached_property
    def _moments(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        n, p = self.X.shape
        X, y = self.X, self.y
        prior = torch.eye(p, dtype=X.dtype, device=X.device) / (self.prior_variance * n)
        fisher = X.T @ X / n + prior
        m4 = torch.einsum("na,nb,ni,nj->abij", X, X, X, X) / n
        m3 = torch.einsum("n,na,ni,nj->aij", y, X, X, X) / n
        m2 = torch.einsum("n,ni,nj->ij", y.square(), X, X) / n
        return fisher, X.T @ y / n, m4, m3, m2

    def loss(self, theta: Tensor) -> Tensor:
        n = len(self.y)
        data = (theta @ self.X.T - self.y).square().mean(-1) / 2
        return data + theta.square().sum(-1) / (2 * self.prior_variance * n)

    def gradient(self, theta: Tensor) -> Tensor:
        fisher, xy, *_ = self._moments
        return theta @ fisher - xy

    def fisher(self) -> Tensor:
        return self._moments[0]

    def empirical_fisher(self, theta: Tensor) -> Tensor:
        *_, m4, m3, m2 = self._moments
        quadratic = torch.einsum("...a,...b,abij->...ij", theta, theta, m4)
        return quadratic - 2 * torch.einsum("...a,aij->...ij", theta, m3) + m2

    def minimiser(self) -> Tensor:
        fisher, xy, *_ = self._moments
        return torch.linalg.solve(fisher, xy)

    def as_torch(self) -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
        r"""The data term as ``(model, loss_fn, X, y)`` for :mod:`natlib.curvature`.

        ``MSELoss`` is :math:`(f - y)^2`, the likelihood :math:`\mathcal{N}(f, \frac12)`;
        dividing inputs and targets by :math:`\sqrt2` turns it into
        :math:`\frac12 (x^\top\theta - y)^2`, the unit-variance Gaussian of this problem.
        """
        model = nn.Linear(self.X.shape[1], 1, bias=False).to(self.X)
        return model, nn.MSELoss(), self.X / math.sqrt(2), self.y[:, None] / math.sqrt(2)


def field(
    problem: LinearRegression,
    preconditioner: Preconditioner,
    gamma: float = 1.0,
    damping: float = 1e-8,
) -> Callable[[Tensor], Tensor]:
    r"""The vector field :math:`\theta \mapsto -\gamma (C(\theta) + \lambda I)^{-1}\nabla L`.

    :math:`C = I` (``"gd"``, with no damping), the Fisher (``"ngd"``) or the empirical Fisher
    (``"ef"``), as in Kunstner et al. (2019, Fig. 1). The matrices are
    :class:`LinearRegression`'s closed forms, batched over many :math:`\theta` at once for
    :func:`flow`; the tests check them against :func:`natlib.curvature.fisher` (kinds
    ``"exact"`` and ``"empirical"``) on :meth:`LinearRegression.as_torch`.

    Raises:
        ValueError: for a preconditioner not in :data:`PRECONDITIONERS`.
    """
    check_choice("preconditioner", preconditioner, Preconditioner)
    eye = torch.eye(problem.X.shape[1], dtype=problem.X.dtype, device=problem.X.device)

    def vector(theta: Tensor) -> Tensor:
        g = problem.gradient(theta)
        if preconditioner == "gd":
            return -gamma * g
        C = problem.fisher() if preconditioner == "ngd" else problem.empirical_fisher(theta)
        C = (C + damping * eye).expand(*g.shape, g.shape[-1])
        return -gamma * torch.linalg.solve(C, g)

    return vector


def flow(
    vector: Callable[[Tensor], Tensor],
    starts: Tensor,
    step_size: float = 1e-2,
    steps: int = 5_000,
) -> Tensor:
    r"""Euler steps :math:`\theta_{k+1} = \theta_k + h\, v(\theta_k)` from every start at once,
    shape ``(steps + 1, *starts.shape)``.

    Kunstner et al. take 50,000 steps of :math:`h = 10^{-3}`; the default covers the same time
    span :math:`hK = 50` with ten times fewer steps (the tests check that the path lengths
    agree). The steps are tiny tensor operations, so they run on one thread: with more,
    synchronisation costs more than the arithmetic.
    """
    with runtime.threads(1):
        path = starts.new_empty(steps + 1, *starts.shape)
        path[0] = starts
        for k in range(steps):
            path[k + 1] = path[k] + step_size * vector(path[k])
    return path


def path_ratio(path: Tensor) -> Tensor:
    """Path length over straight-line distance from start to end, for each path in ``path``."""
    length = (path[1:] - path[:-1]).norm(dim=-1).sum(0)
    return length / (path[-1] - path[0]).norm(dim=-1)


@dataclass(frozen=True)
class Misspecification:
    """Fisher and empirical Fisher of logistic regression at its maximum-likelihood point."""

    theta: Tensor
    fisher: Tensor
    empirical_fisher: Tensor

    @property
    def relative_difference(self) -> float:
        r""":math:`\lVert \tilde F - F \rVert_F / \lVert F \rVert_F`."""
        return ((self.empirical_fisher - self.fisher).norm() / self.fisher.norm()).item()


def misspecification(X: Tensor, y: Tensor, iterations: int = 30) -> Misspecification:
    r"""Fit logistic regression without bias by natural-gradient steps (for a canonical link,
    :math:`F = H` and they are Newton steps) and compare :math:`F` with :math:`\tilde F` there.
    """
    model = nn.Linear(X.shape[1], 1, bias=False).to(X)
    nn.init.zeros_(model.weight)
    loss_fn = nn.BCEWithLogitsLoss()
    targets = y[:, None]
    for _ in range(iterations):
        if curvature.flat_gradient(model, loss_fn, X, targets).norm() < 1e-12:
            break
        step = curvature.natural_gradient(model, loss_fn, X, targets, damping=1e-12, tol=1e-12)
        with torch.no_grad():
            model.weight -= step.view_as(model.weight)
    else:
        raise RuntimeError(f"Newton did not converge in {iterations} iterations.")
    return Misspecification(
        theta=model.weight.detach().flatten(),
        fisher=curvature.fisher(model, loss_fn, X),
        empirical_fisher=curvature.fisher(model, loss_fn, X, targets, kind="empirical"),
    )
