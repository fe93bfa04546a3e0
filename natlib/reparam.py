"""Reparametrisations :math:`\\theta = h(\\phi)` and how optimisers' steps change under them.

A :class:`Reparametrization` maps new coordinates φ to a model's parameters θ (flat, in
``parameters_to_vector`` order). :class:`Reparametrized` wraps a model so that φ is its only
parameter; then ``natlib.curvature`` applied to it yields :math:`F_\\phi` and :math:`H_\\phi`
directly, and one update rule (:func:`direction`) serves both coordinate systems.
:func:`compare` runs a rule in θ and in φ from the same point and reports the discrepancy
in parameter space and in function space; :func:`compare_step_sizes` does so for one step of
several sizes (Amari, 1998; Martens, 2020).
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

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
from natlib.losses import likelihood
from natlib.newton import absolute_value


def _check_vector(name: str, value: Tensor, size: int | None = None) -> None:
    if not isinstance(value, Tensor) or value.dim() < 1:
        raise ValueError(f"{name} must be a tensor of shape (..., P), got {value!r}.")
    if size is not None and value.shape[-1] != size:
        raise ValueError(
            f"{name} has {value.shape[-1]} entries in its last dimension; this map acts on {size}."
        )


def _log_uniform(
    size: int, spread: float, generator: torch.Generator | None, dtype: torch.dtype | None
) -> Tensor:
    """``size`` factors :math:`e^u` with :math:`u \\sim \\mathcal{U}[-s, s]`, s = ``spread``."""
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}.")
    if not spread >= 0.0:
        raise ValueError(f"spread must be non-negative, got {spread}.")
    u = torch.rand(size, generator=generator, dtype=dtype or torch.get_default_dtype())
    return torch.exp(spread * (2.0 * u - 1.0))


class Reparametrization(ABC):
    """A smooth bijection :math:`\\theta = h(\\phi)` with inverse and Jacobian.

    ``forward`` and ``inverse`` act on the last dimension of tensors of shape ``(..., P)``;
    ``jacobian`` returns :math:`J = \\partial\\theta / \\partial\\phi` of shape ``(P, P)`` at one
    point φ of shape ``(P,)``.
    """

    @abstractmethod
    def forward(self, phi: Tensor) -> Tensor:
        """:math:`\\theta = h(\\phi)`."""

    @abstractmethod
    def inverse(self, theta: Tensor) -> Tensor:
        """:math:`\\phi = h^{-1}(\\theta)`."""

    @abstractmethod
    def jacobian(self, phi: Tensor) -> Tensor:
        """:math:`J_{ij} = \\partial\\theta_i / \\partial\\phi_j` at ``phi`` of shape ``(P,)``."""

    def __call__(self, phi: Tensor) -> Tensor:
        return self.forward(phi)


class Elementwise(Reparametrization):
    """:math:`\\theta_i = h(\\phi_i)` per coordinate, so :math:`J = \\mathrm{diag}\\,h'(\\phi)`.

    Subclasses define ``_h``, ``_h_inverse`` and ``_h_prime``; ``size`` (``None`` for any) is
    the number of coordinates the map acts on.
    """

    size: int | None = None

    @abstractmethod
    def _h(self, phi: Tensor) -> Tensor: ...

    @abstractmethod
    def _h_inverse(self, theta: Tensor) -> Tensor: ...

    @abstractmethod
    def _h_prime(self, phi: Tensor) -> Tensor: ...

    def forward(self, phi: Tensor) -> Tensor:
        _check_vector("phi", phi, self.size)
        return self._h(phi)

    def inverse(self, theta: Tensor) -> Tensor:
        _check_vector("theta", theta, self.size)
        return self._h_inverse(theta)

    def jacobian(self, phi: Tensor) -> Tensor:
        _check_vector("phi", phi, self.size)
        if phi.dim() != 1:
            raise ValueError(f"jacobian needs one point phi of shape (P,), got {tuple(phi.shape)}.")
        return torch.diag(self._h_prime(phi))


class DiagonalScaling(Elementwise):
    """:math:`\\theta = s \\odot \\phi` for fixed non-zero, finite scales :math:`s`.

    Gradient descent in φ takes the θ-step :math:`-\\eta\\, s^2 \\odot \\nabla_\\theta L`.
    """

    def __init__(self, scales: Tensor):
        if not isinstance(scales, Tensor) or scales.dim() != 1 or scales.numel() == 0:
            raise ValueError(f"scales must be a non-empty 1-D tensor, got {scales!r}.")
        if not torch.isfinite(scales).all() or (scales == 0).any():
            raise ValueError("scales must be finite and non-zero, or the map is not invertible.")
        self.scales = scales
        self.size = scales.numel()

    @classmethod
    def random(
        cls,
        size: int,
        spread: float = 3.0,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
    ) -> DiagonalScaling:
        """Scales :math:`e^u`, :math:`u \\sim \\mathcal{U}[-\\text{spread}, \\text{spread}]`."""
        return cls(_log_uniform(size, spread, generator, dtype))

    def to(self, device: torch.device | str) -> DiagonalScaling:
        """The same map with its scales on ``device``."""
        return DiagonalScaling(self.scales.to(device))

    def _h(self, phi: Tensor) -> Tensor:
        return self.scales * phi

    def _h_inverse(self, theta: Tensor) -> Tensor:
        return theta / self.scales

    def _h_prime(self, phi: Tensor) -> Tensor:
        return self.scales.expand_as(phi).clone()


class Sinh(Elementwise):
    """:math:`\\theta = \\sinh\\phi`: linear near 0, exponential far out; :math:`h'' \\ne 0`."""

    def _h(self, phi: Tensor) -> Tensor:
        return torch.sinh(phi)

    def _h_inverse(self, theta: Tensor) -> Tensor:
        return torch.asinh(theta)

    def _h_prime(self, phi: Tensor) -> Tensor:
        return torch.cosh(phi)


class Exp(Elementwise):
    """:math:`\\theta = e^\\phi` (:math:`\\phi = \\log\\theta`), for positive parameters only."""

    def _h(self, phi: Tensor) -> Tensor:
        return torch.exp(phi)

    def _h_inverse(self, theta: Tensor) -> Tensor:
        if not (theta > 0).all():
            raise ValueError("Exp maps onto positive parameters; theta has entries <= 0.")
        return torch.log(theta)

    def _h_prime(self, phi: Tensor) -> Tensor:
        return torch.exp(phi)


class Affine(Reparametrization):
    """:math:`\\theta = A\\phi + b` for an invertible :math:`P \\times P` matrix :math:`A`.

    Gradient descent in φ takes the θ-step :math:`-\\eta A A^\\top \\nabla_\\theta L`; the
    natural-gradient step is unchanged for every η (Martens, 2020).
    """

    def __init__(self, A: Tensor, b: Tensor | None = None):
        if not isinstance(A, Tensor) or A.dim() != 2 or A.shape[0] != A.shape[1] or not A.numel():
            shape = tuple(A.shape) if isinstance(A, Tensor) else A
            raise ValueError(f"A must be a square, non-empty matrix, got {shape}.")
        size = A.shape[0]
        b = torch.zeros(size, dtype=A.dtype, device=A.device) if b is None else b
        if not isinstance(b, Tensor) or b.shape != (size,):
            raise ValueError(f"b must have shape ({size},) to match A, got {tuple(b.shape)}.")
        if not (torch.isfinite(A).all() and torch.isfinite(b).all()):
            raise ValueError("A and b must be finite.")
        cond = torch.linalg.cond(A).item()
        if not cond < 1.0 / (size * torch.finfo(A.dtype).eps):
            raise ValueError(
                f"A is singular to working precision (condition number {cond:.3g}); "
                "a reparametrisation must be invertible."
            )
        self.A, self.b, self.size = A, b, size

    @classmethod
    def random(
        cls,
        size: int,
        spread: float = 3.0,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
    ) -> Affine:
        """A dense :math:`A = U \\mathrm{diag}(s) V^\\top` and :math:`b \\sim \\mathcal{N}(0, I)`.

        :math:`U, V` are Haar-random orthogonal and the singular values :math:`s = e^u`,
        :math:`u \\sim \\mathcal{U}[-\\text{spread}, \\text{spread}]`, match
        :meth:`DiagonalScaling.random`.
        """
        s = _log_uniform(size, spread, generator, dtype)
        U, V = (_haar_orthogonal(size, generator, s.dtype) for _ in range(2))
        b = torch.randn(size, generator=generator, dtype=s.dtype)
        return cls(U * s @ V.T, b)

    def to(self, device: torch.device | str) -> Affine:
        """The same map with ``A`` and ``b`` on ``device``."""
        return Affine(self.A.to(device), self.b.to(device))

    def forward(self, phi: Tensor) -> Tensor:
        _check_vector("phi", phi, self.size)
        return phi @ self.A.T + self.b

    def inverse(self, theta: Tensor) -> Tensor:
        _check_vector("theta", theta, self.size)
        return torch.linalg.solve(self.A, (theta - self.b).unsqueeze(-1)).squeeze(-1)

    def jacobian(self, phi: Tensor) -> Tensor:
        _check_vector("phi", phi, self.size)
        if phi.dim() != 1:
            raise ValueError(f"jacobian needs one point phi of shape (P,), got {tuple(phi.shape)}.")
        return self.A.clone()


def _haar_orthogonal(size: int, generator: torch.Generator | None, dtype: torch.dtype) -> Tensor:
    """A Haar-distributed orthogonal matrix: QR of a Gaussian matrix with the signs fixed."""
    Q, R = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=dtype))
    return Q * torch.sign(torch.diagonal(R))


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


Rule = Literal["gd", "ngd", "newton", "saddle_free", "diag_fisher", "adam"]
#: The rules chapter 1 compares (``"saddle_free"`` is chapter 6's addition).
RULES: tuple[str, ...] = ("gd", "ngd", "newton", "diag_fisher", "adam")


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
    - ``"adam"``: :math:`d = g / (\\mathrm{diag}\\,F_{\\rm emp} + \\lambda)^{1/2}`, Adam's
      preconditioner without momentum (Kingma & Ba, 2015; Kunstner et al., 2019).

    :math:`^{+}` is the Moore-Penrose pseudo-inverse (the inverse when the matrix is
    invertible). Curvature comes from :mod:`natlib.curvature`, so a :class:`Reparametrized`
    model gets :math:`F_\\phi`, :math:`H_\\phi` and takes its step in φ.

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
    if rule in ("ngd", "newton"):
        matrix = curvature.fisher if rule == "ngd" else curvature.hessian
        C = matrix(model, loss_fn, X, y)
        damped = C + damping * torch.eye(len(C), dtype=C.dtype, device=C.device)
        return _pseudo_solve(damped, g, damping, "Fisher" if rule == "ngd" else "Hessian")
    if rule == "saddle_free":
        C = absolute_value(curvature.hessian(model, loss_fn, X, y))
        damped = C + damping * torch.eye(len(C), dtype=C.dtype, device=C.device)
        return _pseudo_solve(damped, g, damping, "saddle-free Hessian")
    kind, power = ("exact", 1.0) if rule == "diag_fisher" else ("empirical", 0.5)
    diagonal = torch.diagonal(curvature.fisher(model, loss_fn, X, y, kind=kind)) + damping
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
    predict = _predictor(loss_fn)
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


_PREDICTORS = {
    nn.CrossEntropyLoss: lambda f: f.softmax(-1),
    nn.BCEWithLogitsLoss: torch.sigmoid,
    nn.MSELoss: lambda f: f,
}


def _predictor(loss_fn: nn.Module):
    """The prediction :math:`\\mathbb{E}[y \\mid f]` behind a supported loss."""
    likelihood(loss_fn)  # rejects unsupported losses with the list of supported ones
    return _PREDICTORS[type(loss_fn)]
