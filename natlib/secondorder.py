r"""Chapter 6's measurements: natural gradient against Newton, Gauss-Newton, Hessian-free and
L-BFGS.

- :func:`spectra`: the Hessian :math:`H`, the GGN :math:`G` and the Fisher :math:`F` of one
  batch, their eigenvalues and how far apart they are; :math:`H = G + \sum_n \sum_k
  (\partial \ell / \partial f_k)\,\nabla^2 f_k` (Martens, 2020, §8), so the residual term
  :math:`H - G` vanishes where the output residuals do.
- :func:`saddle_model` and :func:`path`: a two-parameter network :math:`f = b\,a\,x` with the
  loss :math:`(ab - 1)^2`, which has a saddle at the origin, and the iterates of any natlib
  optimiser on it.
- :func:`undamped_steps`: what one undamped Newton, Gauss-Newton and saddle-free step does to
  the loss.
- :func:`lbfgs_against`: the matrix that L-BFGS holds, compared with :math:`H` and :math:`F`.
- :func:`lbfgs_run` and :func:`invariance`: runs for :func:`natlib.reparam.compare_runs` and
  the classification of a measured discrepancy (exact, first order, none).
- :func:`digits_batch`, :func:`digits_model`, :func:`whitened_digits`: the problems; training
  comparisons are in :mod:`natlib.tuning`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from natlib import curvature
from natlib.checks import check_positive, check_positive_int
from natlib.lbfgs import LBFGSOperator

# --------------------------------------------------------------------------- three matrices


@dataclass(frozen=True)
class Spectra:
    """Eigenvalues (ascending) of the batch Hessian, GGN and Fisher, and their distances.

    ``residual`` is :math:`\\lVert H - G\\rVert_F / \\lVert H\\rVert_F`, ``fisher_ggn`` is
    :math:`\\lVert F - G\\rVert_F / \\lVert G\\rVert_F`; ``negative`` counts the eigenvalues of
    :math:`H` below ``-tol``, ``negative_mass`` is :math:`\\sum_{\\lambda_i<0} |\\lambda_i| /
    \\sum_i |\\lambda_i|`.
    """

    hessian: Tensor
    ggn: Tensor
    fisher: Tensor
    residual: float
    fisher_ggn: float
    negative: int
    negative_mass: float


def spectra(model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor) -> Spectra:
    """:class:`Spectra` of the batch ``(X, y)``, from the dense matrices."""
    H = curvature.hessian(model, loss_fn, X, y)
    G = curvature.ggn(model, loss_fn, X, y)
    F = curvature.fisher(model, loss_fn, X, y)
    values = [torch.linalg.eigvalsh(M) for M in (H, G, F)]
    h = values[0]
    tol = h.abs().max() * len(h) * torch.finfo(h.dtype).eps
    return Spectra(
        *values,
        residual=((H - G).norm() / H.norm()).item(),
        fisher_ggn=((F - G).norm() / G.norm()).item(),
        negative=int((h < -tol).sum()),
        negative_mass=(h.clamp(max=0).abs().sum() / h.abs().sum()).item(),
    )


def checkpoints(
    model: nn.Module,
    loss_fn: nn.Module,
    X: Tensor,
    y: Tensor,
    make: Callable[[nn.Module, nn.Module], torch.optim.Optimizer],
    at: Sequence[int],
    closure: bool = False,
) -> list[nn.Module]:
    """Copies of ``model`` after each number of full-batch steps in ``at`` of the optimiser
    ``make(m, loss_fn)`` on a copy ``m`` (the copies carry no optimiser hooks); ``closure``
    for optimisers that step with one (``torch.optim.LBFGS``)."""
    trained = copy.deepcopy(model)
    optimizer = make(trained, loss_fn)
    saved = []
    for k in range(max(at) + 1):
        if k in at:
            clean = copy.deepcopy(model)
            clean.load_state_dict(trained.state_dict())
            saved.append(clean)
        if k == max(at):
            break

        def step_closure() -> Tensor:
            optimizer.zero_grad()
            loss = loss_fn(trained(X), y)
            loss.backward()
            return loss

        if closure:
            optimizer.step(step_closure)
        else:
            step_closure()
            optimizer.step()
    return saved


# --------------------------------------------------------------------------- a saddle in 2-D


def saddle_model(a: float = 0.5, b: float = -0.3) -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    r"""The network :math:`f(x) = b\,a\,x` (two ``Linear(1, 1)`` without bias) at weights
    ``(a, b)``, one example :math:`x = 1, y = 1` and ``MSELoss``: the loss is
    :math:`(ab - 1)^2`, with minima on the hyperbola :math:`ab = 1` and a saddle at the origin,
    where :math:`H = \begin{pmatrix} 0 & -2 \\ -2 & 0 \end{pmatrix}`.

    Returns:
        ``(model, loss_fn, X, y)`` in float64.
    """
    model = nn.Sequential(nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)).double()
    vector_to_parameters(torch.tensor([a, b], dtype=torch.float64), model.parameters())
    one = torch.ones(1, 1, dtype=torch.float64)
    return model, nn.MSELoss(), one, one.clone()


def path(
    model: nn.Module,
    loss_fn: nn.Module,
    X: Tensor,
    y: Tensor,
    make: Callable[[nn.Module, nn.Module], torch.optim.Optimizer],
    steps: int,
) -> Tensor:
    """The parameters ``(steps + 1, P)`` of ``make(m, loss_fn)`` trained full-batch on a copy
    ``m`` of ``model`` (row 0: the start)."""
    check_positive_int("steps", steps)
    model = copy.deepcopy(model)
    optimizer = make(model, loss_fn)
    points = [parameters_to_vector(model.parameters()).detach().clone()]
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn(model(X), y).backward()
        optimizer.step()
        points.append(parameters_to_vector(model.parameters()).detach().clone())
    return torch.stack(points)


# --------------------------------------------------------------------------- undamped steps

UNDAMPED = ("newton", "gauss_newton", "saddle_free")


def _loss_at(model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor, theta: Tensor) -> float:
    model = copy.deepcopy(model)
    vector_to_parameters(theta, model.parameters())
    with torch.no_grad():
        return loss_fn(model(X), y).item()


@dataclass(frozen=True)
class StepOutcome:
    """One undamped step :math:`\\theta - d`: the loss change and whether :math:`d` is a
    descent direction (:math:`g^\\top d > 0`)."""

    change: float
    descent: bool


def undamped_steps(
    model: nn.Module,
    loss_fn: nn.Module,
    X: Tensor,
    y: Tensor,
    dampings: Sequence[float] = (0.0,),
) -> dict[tuple[float, str], StepOutcome]:
    r"""Full steps :math:`d = (C + \lambda I)^{+} g` for each :math:`\lambda` in ``dampings``
    and :math:`C` = :math:`H` (``"newton"``), :math:`G` (``"gauss_newton"``) and :math:`|H|`
    (``"saddle_free"``); :math:`^{+}` is the pseudo-inverse (eigenvalues below
    :math:`P \varepsilon \max_i |\lambda_i|` in magnitude are dropped), so :math:`\lambda = 0`
    is the undamped step. Keys: ``(damping, name)``."""
    for damping in dampings:
        if not (damping >= 0 and math.isfinite(damping)):
            raise ValueError(f"dampings must be non-negative and finite, got {damping!r}.")
    g = curvature.flat_gradient(model, loss_fn, X, y)
    h_values, h_vectors = torch.linalg.eigh(curvature.hessian(model, loss_fn, X, y))
    g_values, g_vectors = torch.linalg.eigh(curvature.ggn(model, loss_fn, X, y))
    bases = {
        "newton": (h_values, h_vectors),
        "gauss_newton": (g_values, g_vectors),
        "saddle_free": (h_values.abs(), h_vectors),
    }
    theta = parameters_to_vector(model.parameters()).detach()
    with torch.no_grad():
        before = loss_fn(model(X), y).item()
    outcomes = {}
    for damping in dampings:
        for name, (values, vectors) in bases.items():
            shifted = values + damping
            cut = len(g) * torch.finfo(g.dtype).eps * shifted.abs().max()
            inverse = torch.where(shifted.abs() > cut, 1 / shifted, torch.zeros_like(shifted))
            d = vectors @ (inverse * (vectors.T @ g))
            change = _loss_at(model, loss_fn, X, y, theta - d) - before
            outcomes[damping, name] = StepOutcome(change, bool(g @ d > 0))
    return outcomes


# --------------------------------------------------------------------------- L-BFGS


def _cosine(a: Tensor, b: Tensor) -> float:
    return (a @ b / (a.norm() * b.norm())).item()


@dataclass(frozen=True)
class LBFGSComparison:
    """L-BFGS's matrix at the end of a run, against the Hessian and the Fisher there.

    ``secant_hessian`` and ``secant_fisher`` are the medians over the stored pairs of
    :math:`\\lVert y_i - C s_i\\rVert / \\lVert y_i\\rVert` for :math:`C = H, F`;
    ``cos_newton`` and ``cos_ngd`` the cosines between the L-BFGS direction :math:`H_m g` and
    :math:`(H + \\lambda I)^{-1} g`, :math:`(F + \\lambda I)^{-1} g`; ``cos_gradient_ngd``
    the cosine between :math:`g` itself and the NGD direction (the baseline); ``hessian_fisher``
    :math:`\\lVert H - F\\rVert_F / \\lVert H\\rVert_F`."""

    loss: float
    secant_hessian: float
    secant_fisher: float
    cos_newton: float
    cos_ngd: float
    cos_gradient_ngd: float
    hessian_fisher: float


def lbfgs_against(
    model: nn.Module,
    loss_fn: nn.Module,
    X: Tensor,
    y: Tensor,
    iterations: int,
    history: int = 10,
    damping: float = 1e-4,
) -> LBFGSComparison:
    """Run ``torch.optim.LBFGS`` (strong Wolfe line search) for ``iterations`` full-batch
    iterations from a copy of ``model`` and compare its history with :math:`H` and :math:`F`
    at the point reached."""
    check_positive("damping", damping)
    copied = copy.deepcopy(model)
    optimizer = torch.optim.LBFGS(
        copied.parameters(),
        max_iter=iterations,
        history_size=history,
        line_search_fn="strong_wolfe",
        tolerance_grad=0.0,
        tolerance_change=0.0,
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = loss_fn(copied(X), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    operator = LBFGSOperator.from_optimizer(copied, optimizer)
    H = curvature.hessian(copied, loss_fn, X, y)
    F = curvature.fisher(copied, loss_fn, X, y)
    g = curvature.flat_gradient(copied, loss_fn, X, y)
    eye = torch.eye(len(g), dtype=g.dtype, device=g.device)

    def secant(C: Tensor) -> float:
        return (
            torch.stack(
                [
                    (d - C @ s).norm() / d.norm()
                    for s, d in zip(operator.steps, operator.differences)
                ]
            )
            .median()
            .item()
        )

    direction = operator.solve(g, 0.0)
    ngd = torch.linalg.solve(F + damping * eye, g)
    with torch.no_grad():
        loss = loss_fn(copied(X), y).item()
    return LBFGSComparison(
        loss,
        secant(H),
        secant(F),
        _cosine(direction, torch.linalg.solve(H + damping * eye, g)),
        _cosine(direction, ngd),
        _cosine(g, ngd),
        ((H - F).norm() / H.norm()).item(),
    )


def lbfgs_run(
    loss_fn: nn.Module, X: Tensor, y: Tensor, lr: float, steps: int, history: int = 10
) -> Callable[[nn.Module], Tensor]:
    """A run for :func:`natlib.reparam.compare_runs`: ``steps`` iterations of
    ``torch.optim.LBFGS`` with a fixed step size ``lr`` (no line search) on a copy."""
    check_positive("lr", lr)

    def run(model: nn.Module) -> Tensor:
        model = copy.deepcopy(model)
        params = list(model.parameters())
        start = parameters_to_vector(params).detach().clone()
        optimizer = torch.optim.LBFGS(
            params,
            lr=lr,
            max_iter=steps,
            history_size=history,
            tolerance_grad=0.0,
            tolerance_change=0.0,
        )

        def closure() -> Tensor:
            optimizer.zero_grad()
            loss = loss_fn(model(X), y)
            loss.backward()
            return loss

        optimizer.step(closure)
        return torch.stack([start, parameters_to_vector(params).detach()])

    return run


Invariance = Literal["exact", "first order", "none"]


def invariance(small: float, large: float, ratio: float, exact: float = 1e-8) -> Invariance:
    """Classify the relative discrepancies of one step at two step sizes ``ratio`` apart:
    ``"exact"`` if both are below ``exact``; ``"first order"`` if the discrepancy shrinks at
    least half as fast as the step size (:math:`O(\\eta)`); else ``"none"``."""
    if max(small, large) < exact:
        return "exact"
    return "first order" if small <= large / math.sqrt(ratio) else "none"


# --------------------------------------------------------------------------- the digits problem


#: The layer sizes of chapter 6's digits classifier, a tanh MLP trained in float64.
DIGITS_SIZES = (64, 6, 10)
#: How many of the first digits training examples it trains on, full batch.
DIGITS_EXAMPLES = 128


def digits_batch() -> tuple[Tensor, Tensor, nn.Module]:
    """``(X, y, loss_fn)``: the first :data:`DIGITS_EXAMPLES` digits training examples."""
    from natlib import problems

    data = problems.digits(dtype=torch.float64)
    return data.X_train[:DIGITS_EXAMPLES], data.y_train[:DIGITS_EXAMPLES], data.loss_fn


def whitened_digits(components: int = 16) -> tuple[Tensor, Tensor, nn.Module]:
    """``(X, Y, MSELoss())``: the batch of :func:`digits_batch` projected on its first
    ``components`` principal components (centred, unit variance) with one-hot targets, so
    that a small network's Fisher and Hessian are invertible (raw pixels are affinely
    dependent on a small batch, which leaves null directions)."""
    check_positive_int("components", components)
    X, y, _ = digits_batch()
    centred = X - X.mean(0)
    basis = torch.linalg.svd(centred, full_matrices=False).Vh[:components].T
    projected = centred @ basis
    Y = nn.functional.one_hot(y, 10).to(X.dtype)
    return projected / projected.std(0), Y, nn.MSELoss()


def digits_model(seed: int) -> nn.Module:
    """The classifier :data:`DIGITS_SIZES`, initialised from ``seed``, in float64."""
    from natlib import problems

    return problems.mlp(DIGITS_SIZES, seed=seed).double()
