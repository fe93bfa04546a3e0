"""Reparametrisations :math:`\\theta = h(\\phi)` and how optimisers' steps change under them.

A :class:`~natlib.coordinates.Reparametrization` (:mod:`natlib.coordinates`, whose maps are
re-exported here) maps new coordinates φ to a model's parameters θ (flat, in
``parameters_to_vector`` order). :class:`Reparametrized` wraps a model so that φ is its only
parameter; then ``natlib.curvature`` applied to it yields :math:`F_\\phi` and :math:`H_\\phi`
directly, and one update rule (:func:`direction`) serves both coordinate systems.
:func:`compare` runs a rule in θ and in φ from the same point and reports the discrepancy
in parameter space and in function space; :func:`compare_step_sizes` does so for one step of
several sizes (Amari, 1998; Martens, 2020).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor, nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from natlib import curvature
from natlib.checks import (
    check_choice,
    check_non_negative,
    check_positive,
    check_positive_int,
    warn_pseudo_inverse,
)
from natlib.coordinates import Affine as Affine
from natlib.coordinates import DiagonalScaling as DiagonalScaling
from natlib.coordinates import Elementwise as Elementwise
from natlib.coordinates import Exp as Exp
from natlib.coordinates import Reparametrization as Reparametrization
from natlib.coordinates import Sinh as Sinh
from natlib.exact import ExactCurvature, Fisher, Hessian
from natlib.losses import FisherKind, likelihood
from natlib.newton import SaddleFreeHessian


def _unflatten(model: nn.Module, theta: Tensor) -> dict[str, Tensor]:
    """Split a flat θ into ``model``'s named parameter shapes (``parameters_to_vector`` order)."""
    named = list(model.named_parameters())
    total = sum(p.numel() for _, p in named)
    if theta.shape != (total,):
        raise ValueError(
            f"theta must have shape ({total},) for this model, got {tuple(theta.shape)}."
        )
    pieces = theta.split([p.numel() for _, p in named])
    return {name: piece.view_as(p) for (name, p), piece in zip(named, pieces)}


def outputs(model: nn.Module, theta: Tensor, X: Tensor) -> Tensor:
    """The model's outputs on ``X`` with its parameters set to the flat vector θ (functionally)."""
    return torch.func.functional_call(model, _unflatten(model, theta), (X,))


class Reparametrized(nn.Module):
    """``model`` in coordinates φ: its only parameter is φ, its forward is :math:`f(x; h(\\phi))`.

    The wrapped model is kept outside the module tree (so ``parameters()`` yields φ alone) and
    evaluated with ``torch.func.functional_call``; its own parameters are left untouched.

    Args:
        model: any ``nn.Module``; θ is ``parameters_to_vector(model.parameters())``.
        reparam: the map :math:`\\theta = h(\\phi)`.
        phi: starting φ; default :math:`h^{-1}(\\theta)` at the model's current parameters.
    """

    def __init__(self, model: nn.Module, reparam: Reparametrization, phi: Tensor | None = None):
        super().__init__()
        self._model = (model,)
        self.reparam = reparam
        if phi is None:
            theta = nn.utils.parameters_to_vector(model.parameters()).detach()
            phi = reparam.inverse(theta)
        _unflatten(model, reparam.forward(phi))  # shape check
        self.phi = nn.Parameter(phi.detach().clone())

    @property
    def model(self) -> nn.Module:
        """The wrapped model (in θ-coordinates)."""
        return self._model[0]

    def theta(self) -> Tensor:
        """:math:`\\theta = h(\\phi)`, differentiable in φ."""
        return self.reparam.forward(self.phi)

    def forward(self, x: Tensor) -> Tensor:
        return outputs(self.model, self.theta(), x)


Rule = Literal["gd", "ngd", "newton", "saddle_free", "diag_fisher", "rms_emp"]
#: The rules chapter 1 compares (``"saddle_free"`` is chapter 6's addition).
RULES: tuple[str, ...] = tuple(r for r in get_args(Rule) if r != "saddle_free")
#: The rules that pseudo-solve with a dense curvature matrix, by its class.
DENSE_RULES: dict[str, type[ExactCurvature]] = {
    "ngd": Fisher,
    "newton": Hessian,
    "saddle_free": SaddleFreeHessian,
}
#: For the rules that divide by the Fisher's diagonal, its kind and the power applied.
DIAGONAL_RULES: dict[str, tuple[FisherKind, float]] = {
    "diag_fisher": ("exact", 1.0),
    "rms_emp": ("empirical", 0.5),
}


def direction(
    model: nn.Module,
    loss_fn: nn.Module,
    X: Tensor,
    y: Tensor,
    rule: Rule,
    damping: float = 0.0,
) -> Tensor:
    """The preconditioned gradient :math:`d` of one update rule; the step is :math:`-\\eta d`.

    With :math:`g = \\nabla L` and damping :math:`\\lambda`:

    - ``"gd"``: :math:`d = g` (damping is ignored);
    - ``"ngd"``: :math:`d = (F + \\lambda I)^{+} g`, exact Fisher (Amari, 1998);
    - ``"newton"``: :math:`d = (H + \\lambda I)^{+} g` (Nocedal & Wright, 2006);
    - ``"saddle_free"``: :math:`d = (|H| + \\lambda I)^{+} g`, :math:`|H| = V|\\Lambda|V^\\top`
      (Dauphin et al., 2014);
    - ``"diag_fisher"``: :math:`d = g / (\\mathrm{diag}\\,F + \\lambda)`;
    - ``"rms_emp"``: :math:`d = g / (\\mathrm{diag}\\,F_{\\rm emp} + \\lambda)^{1/2}`, each
      coordinate divided by the root mean square of its per-example gradients (Kunstner et
      al., 2019). This is not Adam: Adam squares *mini-batch* gradients, so on the full batch
      and without momentum it divides :math:`g` by :math:`|g|`, sign descent (Kingma & Ba,
      2015; Balles & Hennig, 2018).

    :math:`^{+}` is the Moore-Penrose pseudo-inverse (the inverse when the matrix is
    invertible). The curvature objects are :class:`natlib.exact.Fisher` and
    :class:`natlib.exact.Hessian` (:data:`DENSE_RULES`, :data:`DIAGONAL_RULES`), so a
    :class:`Reparametrized` model gets :math:`F_\\phi`, :math:`H_\\phi` and takes its step in
    φ. The diagonal rules read the dense Fisher's diagonal (:math:`O(NP^2)`); for large models
    :class:`natlib.approximations.DiagonalFisher` gives it in :math:`O(NP)` time and
    :math:`O(P)` memory, equal up to round-off.

    Warns (``RuntimeWarning``) when ``damping`` is positive but the damped matrix is not
    numerically positive definite, so the pseudo-inverse stands in for the inverse.

    Raises:
        ValueError: for an unsupported rule, a negative or non-finite damping, a bad batch
            (see :mod:`natlib.curvature`), or zeros on a diagonal without damping.
    """
    check_choice("rule", rule, Rule)
    check_non_negative("damping", damping)
    g = curvature.flat_gradient(model, loss_fn, X, y)
    if rule == "gd":
        return g
    if rule in DENSE_RULES:
        matrix = DENSE_RULES[rule]
        C = matrix.from_batch(model, loss_fn, X, y).to_dense()
        damped = C + damping * torch.eye(len(C), dtype=C.dtype, device=C.device)
        return _pseudo_solve(damped, g, damping, matrix.what)
    kind, power = DIAGONAL_RULES[rule]
    # The dense Fisher's diagonal, not DiagonalFisher's squared per-example gradients: those
    # agree to round-off only, and chapter 1 glues these discrepancies at full precision.
    fisher = Fisher.from_batch(model, loss_fn, X, y, kind=kind).to_dense()
    diagonal = torch.diagonal(fisher) + damping
    d = g / diagonal**power
    if not torch.isfinite(d).all():
        raise ValueError(f"rule {rule!r}: the curvature's diagonal has zeros; use damping > 0.")
    return d


def _pseudo_solve(C: Tensor, g: Tensor, damping: float, what: str) -> Tensor:
    """:math:`C^{+} g` for symmetric :math:`C`: by Cholesky when :math:`C` is numerically
    positive definite (pivots above ``pinv``'s cut-off), else by the pseudo-inverse, with a
    warning when ``C`` is the ``what`` plus a positive ``damping`` (an inverse was meant)."""
    L, info = torch.linalg.cholesky_ex(C)
    pivots = torch.diagonal(L) ** 2
    if info.item() == 0 and pivots.min() > len(C) * torch.finfo(C.dtype).eps * pivots.max():
        return torch.cholesky_solve(g.unsqueeze(-1), L).squeeze(-1)
    if damping:
        warn_pseudo_inverse(what, damping)
    return torch.linalg.pinv(C, hermitian=True) @ g


def trajectory(
    model: nn.Module,
    loss_fn: nn.Module,
    X: Tensor,
    y: Tensor,
    rule: Rule,
    lr: float,
    steps: int = 1,
    damping: float = 0.0,
) -> Tensor:
    """Parameters :math:`\\theta_0, \\dots, \\theta_K` of :math:`\\theta_{k+1} = \\theta_k -
    \\eta\\, d(\\theta_k)` (see :func:`direction`), shape ``(steps + 1, P)``.

    Runs on a copy; ``model`` is left unchanged.

    Raises:
        ValueError: if ``lr`` is not a positive finite number or ``steps`` not a positive
            integer, and as :func:`direction`.
    """
    check_positive("lr", lr)
    check_positive_int("steps", steps)
    model = copy.deepcopy(model)
    params = list(model.parameters())
    thetas = [parameters_to_vector(params).detach()]
    for _ in range(steps):
        thetas.append(thetas[-1] - lr * direction(model, loss_fn, X, y, rule, damping))
        vector_to_parameters(thetas[-1], params)
    return torch.stack(thetas)


@dataclass(frozen=True)
class Comparison:
    """One rule run from the same point in θ and in φ, both trajectories in θ-coordinates.

    ``parameter[k-1]`` and ``function[k-1]`` are the relative discrepancies after step k
    (:func:`compare`) or of the k-th step size (:func:`compare_step_sizes`),
    :math:`\\lVert(\\tilde\\theta_k - \\tilde\\theta_0) - (\\theta_k - \\theta_0)\\rVert /
    \\lVert\\theta_k - \\theta_0\\rVert` with :math:`\\tilde\\theta = h(\\phi)`, and the same
    for the predictions on the data (class probabilities, success probabilities or
    regression outputs) in place of the parameters.
    """

    theta: Tensor
    theta_via_phi: Tensor
    parameter: Tensor
    function: Tensor


def compare(
    model: nn.Module,
    reparam: Reparametrization,
    loss_fn: nn.Module,
    X: Tensor,
    y: Tensor,
    rule: Rule,
    lr: float,
    steps: int = 1,
    damping: float = 0.0,
) -> Comparison:
    """Run ``rule`` in θ and in φ = h⁻¹(θ) from the model's parameters, and compare.

    Displacements are measured from each run's own start (:math:`h(h^{-1}(\\theta_0))` for the
    φ-run), so round-off in the inverse does not count as discrepancy.

    Raises:
        ValueError: as :func:`trajectory`.
    """
    theta = trajectory(model, loss_fn, X, y, rule, lr, steps, damping)
    phi = trajectory(Reparametrized(model, reparam), loss_fn, X, y, rule, lr, steps, damping)
    return _comparison(model, reparam, loss_fn, X, theta, phi)


def compare_step_sizes(
    model: nn.Module,
    reparam: Reparametrization,
    loss_fn: nn.Module,
    X: Tensor,
    y: Tensor,
    rule: Rule,
    lrs: Sequence[float],
    damping: float = 0.0,
) -> Comparison:
    """One step of ``rule`` for each step size in ``lrs``, in θ and in φ, from the same point.

    Row ``k + 1`` of each trajectory is the step of size ``lrs[k]`` (row 0 is the start), so
    ``parameter[k]`` is the discrepancy of that step. The two directions are computed once.

    Raises:
        ValueError: if a step size is not a positive finite number, and as :func:`direction`.
    """
    lrs = torch.as_tensor(lrs, dtype=X.dtype, device=X.device).reshape(-1, 1)
    for lr in lrs.flatten().tolist():
        check_positive("step size", lr)
    starts, steps = [], []
    for m in (model, Reparametrized(model, reparam)):
        starts.append(parameters_to_vector(m.parameters()).detach())
        steps.append(lrs * direction(m, loss_fn, X, y, rule, damping))
    theta, phi = (torch.cat([start[None], start - step]) for start, step in zip(starts, steps))
    return _comparison(model, reparam, loss_fn, X, theta, phi)


def compare_runs(
    model: nn.Module,
    reparam: Reparametrization,
    loss_fn: nn.Module,
    X: Tensor,
    run: Callable[[nn.Module], Tensor],
) -> Comparison:
    """:func:`compare` for any method: ``run(m)`` returns the parameters of ``m`` along its
    run, ``(K + 1, P)`` (row 0: the start), without changing ``m``; it is called on ``model``
    (θ) and on :class:`Reparametrized` ``(model, reparam)`` (φ)."""
    theta = run(model)
    phi = run(Reparametrized(model, reparam))
    return _comparison(model, reparam, loss_fn, X, theta, phi)


def _comparison(
    model: nn.Module,
    reparam: Reparametrization,
    loss_fn: nn.Module,
    X: Tensor,
    theta: Tensor,
    phi: Tensor,
) -> Comparison:
    theta_via_phi = reparam.forward(phi)
    predict = likelihood(loss_fn).predictive_mean
    with torch.no_grad():
        f, f_via_phi = (
            torch.func.vmap(lambda t: predict(outputs(model, t, X)))(run)
            for run in (theta, theta_via_phi)
        )
    return Comparison(
        theta=theta,
        theta_via_phi=theta_via_phi,
        parameter=_relative_discrepancy(theta, theta_via_phi),
        function=_relative_discrepancy(f.flatten(1), f_via_phi.flatten(1)),
    )


def _relative_discrepancy(reference: Tensor, other: Tensor) -> Tensor:
    moved = reference[1:] - reference[0]
    moved_other = other[1:] - other[0]
    return torch.linalg.vector_norm(moved_other - moved, dim=1) / torch.linalg.vector_norm(
        moved, dim=1
    )
