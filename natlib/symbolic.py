"""Sympy derivations the book shows and the tests check."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import sympy as sp
from sympy.stats import E, Normal

from natlib.checks import check_positive_int

Expectation = Callable[[sp.Expr, Sequence[sp.Expr]], sp.Expr]


def fisher_information(
    log_prob: sp.Expr,
    params: Sequence[sp.Symbol],
    expectation: Callable[[sp.Expr], sp.Expr],
) -> sp.Matrix:
    """The Fisher information from its definition, :math:`F = \\mathbb{E}_y[\\nabla\\log p\\,
    \\nabla\\log p^\\top]` (Amari, 1998).

    Args:
        log_prob: :math:`\\log p(y \\mid \\text{params})` as a sympy expression.
        params: the parameters to differentiate with respect to.
        expectation: maps an expression in ``y`` to its expectation under the model.
    """
    score = [sp.diff(log_prob, p) for p in params]
    n = len(params)
    return sp.Matrix(n, n, lambda i, j: sp.simplify(expectation(score[i] * score[j])))


@dataclass(frozen=True)
class TransformationLaw:
    """One family in coordinates :math:`\\theta = h(\\phi)`: both sides of the laws
    :math:`\\nabla_\\phi L = J^\\top \\nabla_\\theta L` and :math:`F_\\phi = J^\\top F_\\theta J`.

    θ-quantities are functions of θ, φ-quantities and the Jacobian :math:`J = \\partial\\theta /
    \\partial\\phi` functions of φ; the loss is the negative log-likelihood of one observation y.
    """

    theta: tuple[sp.Symbol, ...]
    phi: tuple[sp.Symbol, ...]
    theta_of_phi: sp.Matrix
    jacobian: sp.Matrix
    grad_theta: sp.Matrix
    grad_phi: sp.Matrix
    fisher_theta: sp.Matrix
    fisher_phi: sp.Matrix

    def gradient_residual(self) -> sp.Matrix:
        """:math:`\\nabla_\\phi L - J^\\top \\nabla_\\theta L`, simplified (0 if the law holds)."""
        return _simplify(self.grad_phi - self.jacobian.T * self._at_phi(self.grad_theta))

    def fisher_residual(self) -> sp.Matrix:
        """:math:`F_\\phi - J^\\top F_\\theta J`, simplified (zero when the law holds)."""
        pullback = self.jacobian.T * self._at_phi(self.fisher_theta) * self.jacobian
        return _simplify(self.fisher_phi - pullback)

    def _at_phi(self, expr: sp.Matrix) -> sp.Matrix:
        return expr.subs(dict(zip(self.theta, self.theta_of_phi)))


def _simplify(expr: sp.Matrix) -> sp.Matrix:
    """Simplify with hyperbolic functions written as exponentials, which sympy cancels best."""
    return sp.simplify(expr.applyfunc(lambda e: e.rewrite(sp.exp)))


@dataclass(frozen=True)
class _Family:
    theta: tuple[sp.Symbol, ...]
    phi: tuple[sp.Symbol, ...]
    theta_of_phi: list[sp.Expr]
    log_prob: sp.Expr
    expectation: Expectation


def _bernoulli() -> _Family:
    p = sp.Symbol("p", positive=True)
    z = sp.Symbol("z", real=True)
    y = sp.Symbol("y")
    log_prob = y * sp.log(p) + (1 - y) * sp.log(1 - p)

    def expectation(expr: sp.Expr, theta: Sequence[sp.Expr]) -> sp.Expr:
        return theta[0] * expr.subs(y, 1) + (1 - theta[0]) * expr.subs(y, 0)

    return _Family((p,), (z,), [1 / (1 + sp.exp(-z))], log_prob, expectation)


def _gaussian() -> _Family:
    mu = sp.Symbol("mu", real=True)
    sigma = sp.Symbol("sigma", positive=True)
    s = sp.Symbol("s", real=True)
    y = sp.Symbol("y", real=True)
    log_prob = -sp.log(sigma) - sp.log(2 * sp.pi) / 2 - (y - mu) ** 2 / (2 * sigma**2)

    def expectation(expr: sp.Expr, theta: Sequence[sp.Expr]) -> sp.Expr:
        return E(expr.subs(y, Normal("Y", theta[0], theta[1])))

    return _Family((mu, sigma), (mu, s), [mu, sp.exp(s)], log_prob, expectation)


_FAMILIES = {"bernoulli": _bernoulli, "gaussian": _gaussian}


def transformation_law(family: Literal["bernoulli", "gaussian"]) -> TransformationLaw:
    """Derive gradient and Fisher in two coordinate systems of one family, each from its
    definition, so that :meth:`TransformationLaw.fisher_residual` checks the tensor law.

    Families: ``"bernoulli"`` with probability :math:`\\theta = p` against logit
    :math:`\\phi = z`, :math:`p = 1/(1+e^{-z})`; ``"gaussian"`` with :math:`\\theta = (\\mu,
    \\sigma)` against :math:`\\phi = (\\mu, s)`, :math:`\\sigma = e^s`.
    """
    if family not in _FAMILIES:
        raise ValueError(f"family {family!r} is not supported; use one of {sorted(_FAMILIES)}.")
    f = _FAMILIES[family]()
    theta, phi, h, log_prob = f.theta, f.phi, f.theta_of_phi, f.log_prob
    theta_of_phi = sp.Matrix(h)
    log_prob_phi = log_prob.subs(dict(zip(theta, h)))
    fisher_theta = fisher_information(log_prob, theta, lambda e: f.expectation(e, theta))
    fisher_phi = fisher_information(log_prob_phi, phi, lambda e: f.expectation(e, h))
    return TransformationLaw(
        theta=theta,
        phi=phi,
        theta_of_phi=theta_of_phi,
        jacobian=theta_of_phi.jacobian(phi),
        grad_theta=sp.simplify(sp.Matrix([-sp.diff(log_prob, t) for t in theta])),
        grad_phi=sp.simplify(sp.Matrix([-sp.diff(log_prob_phi, v) for v in phi])),
        fisher_theta=fisher_theta,
        fisher_phi=fisher_phi,
    )


@dataclass(frozen=True)
class AffineSteps:
    """One step of size η in θ-coordinates and in φ-coordinates, :math:`\\theta = A\\phi + b`,
    the φ-step mapped to θ exactly: :math:`h(\\phi + \\Delta\\phi) - h(\\phi)`.

    ``gd_predicted`` is :math:`-\\eta A A^\\top \\nabla_\\theta L`, what the φ-step of gradient
    descent becomes.
    """

    ngd_theta: sp.Matrix
    ngd_phi: sp.Matrix
    gd_theta: sp.Matrix
    gd_phi: sp.Matrix
    gd_predicted: sp.Matrix


def affine_steps(n: int = 2) -> AffineSteps:
    """Natural-gradient and gradient steps under a generic invertible affine map in n dimensions.

    The φ-system uses the laws :math:`\\nabla_\\phi L = A^\\top g`, :math:`F_\\phi = A^\\top F A`
    for a generic symmetric Fisher :math:`F` and gradient :math:`g` (Amari, 1998; Martens,
    2020). Then :math:`A\\,\\Delta\\phi_{\\rm NGD} = -\\eta F^{-1} g` for every η, while
    :math:`A\\,\\Delta\\phi_{\\rm GD} = -\\eta A A^\\top g`.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}.")
    eta = sp.Symbol("eta", positive=True)
    A = sp.Matrix(n, n, lambda i, j: sp.Symbol(f"a{i + 1}{j + 1}", real=True))
    b = sp.Matrix(n, 1, lambda i, _: sp.Symbol(f"b{i + 1}", real=True))
    phi = sp.Matrix(n, 1, lambda i, _: sp.Symbol(f"phi{i + 1}", real=True))
    g = sp.Matrix(n, 1, lambda i, _: sp.Symbol(f"g{i + 1}", real=True))
    F = sp.Matrix(n, n, lambda i, j: sp.Symbol(f"f{min(i, j) + 1}{max(i, j) + 1}", real=True))

    def h(v: sp.Matrix) -> sp.Matrix:
        return A * v + b

    grad_phi, fisher_phi = A.T * g, A.T * F * A
    ngd_dphi = -eta * fisher_phi.inv() * grad_phi
    gd_dphi = -eta * grad_phi
    return AffineSteps(
        ngd_theta=-eta * F.inv() * g,
        ngd_phi=sp.simplify(h(phi + ngd_dphi) - h(phi)),
        gd_theta=-eta * g,
        gd_phi=sp.expand(h(phi + gd_dphi) - h(phi)),
        gd_predicted=-eta * A * A.T * g,
    )


def newton_affine_residual(n: int = 2) -> sp.Matrix:
    r"""Newton's step is exactly invariant under an invertible affine map :math:`\theta = A\phi
    + b`, for every step size :math:`\eta`: the residual, zero when the identity holds.

    The step depends on the gradient and Hessian at the current point only, so the loss is its
    generic second-order Taylor polynomial there, :math:`L(\theta) = c + g^\top(\theta -
    \theta_0) + \tfrac12 (\theta - \theta_0)^\top H (\theta - \theta_0)` with symbols
    :math:`g` and symmetric :math:`H`. Differentiating :math:`L(A\phi + b)` gives
    :math:`\nabla_\phi L = A^\top g` and :math:`\nabla^2_\phi L = A^\top H A` (the map has no
    second derivative to add a term, unlike :func:`nonlinear_step_discrepancy`), and the
    φ-step mapped to θ equals the θ-step (Nocedal & Wright, 2006, §2.2; Martens, 2020, §12.1).

    Returns:
        :math:`h(\phi_0 + \Delta\phi) - h(\phi_0) - \Delta\theta` with
        :math:`\Delta\phi = -\eta (\nabla^2_\phi L)^{-1} \nabla_\phi L`,
        :math:`\Delta\theta = -\eta H^{-1} g`, simplified: the ``n x 1`` zero matrix.
    """
    check_positive_int("n", n)
    eta, c = sp.Symbol("eta", positive=True), sp.Symbol("c", real=True)
    A, b = _generic("a", n, n), _generic("b", n, 1)
    g, H = _generic("g", n, 1), _generic("H", n, n, symmetric=True)
    phi0, phi = _generic("p", n, 1), _generic("x", n, 1)

    def h(v: sp.Matrix) -> sp.Matrix:
        return A * v + b

    offset = h(phi) - h(phi0)
    loss = c + (g.T * offset)[0, 0] + (offset.T * H * offset)[0, 0] / 2
    at_phi0 = dict(zip(phi, phi0))
    grad_phi = sp.Matrix([sp.diff(loss, x) for x in phi]).subs(at_phi0)
    hess_phi = sp.hessian(loss, list(phi)).subs(at_phi0)
    dphi = -eta * hess_phi.inv() * grad_phi
    dtheta = -eta * H.inv() * g
    return sp.simplify(h(phi0 + dphi) - h(phi0) - dtheta)


def nonlinear_step_discrepancy(rule: Literal["ngd", "newton"], order: int = 2) -> list[sp.Expr]:
    """Taylor coefficients in η of one step's θ-space discrepancy under :math:`\\theta = h(\\phi)`.

    In one dimension, :math:`D(\\eta) = h(\\phi + \\Delta\\phi) - h(\\phi) - \\Delta\\theta
    = \\sum_k c_k\\,\\eta^k`. For ``"ngd"`` (:math:`F_\\phi = h'^2 F`) :math:`c_1 = 0` and
    :math:`c_2 = \\tfrac12 h'' (g / (F h'))^2`: invariance holds to first order only
    (Martens, 2020). For ``"newton"`` the Hessian picks up :math:`g\\,h''`, and
    :math:`c_1 = g^2 h'' / (H (H h'^2 + g h''))` is non-zero.

    Returns:
        ``[c_1, ..., c_order]`` in the symbols ``g`` (:math:`\\partial_\\theta L`), ``H``
        (:math:`\\partial^2_\\theta L`), ``F`` (Fisher in θ), ``h'`` and ``h''``.
    """
    if rule not in ("ngd", "newton"):
        raise ValueError(f"rule {rule!r} is not supported; use 'ngd' or 'newton'.")
    if not isinstance(order, int) or order < 1:
        raise ValueError(f"order must be a positive integer, got {order!r}.")
    phi, eta = sp.symbols("phi eta", real=True)
    h, loss, fisher = sp.Function("h"), sp.Function("L"), sp.Function("F")
    theta = h(phi)
    grad_theta = sp.diff(loss(theta), theta)
    hess_theta = sp.diff(loss(theta), theta, 2)
    grad_phi = sp.diff(loss(theta), phi)
    if rule == "ngd":
        dtheta = -eta * grad_theta / fisher(theta)
        dphi = -eta * grad_phi / (sp.diff(theta, phi) ** 2 * fisher(theta))
    else:
        dtheta = -eta * grad_theta / hess_theta
        dphi = -eta * grad_phi / sp.diff(loss(theta), phi, 2)
    discrepancy = h(phi + dphi) - theta - dtheta
    # readable names, highest derivatives first so that lower ones do not match inside them
    names = [
        (hess_theta, sp.Symbol("H")),
        (grad_theta, sp.Symbol("g")),
        (fisher(theta), sp.Symbol("F")),
        (sp.diff(theta, phi, 2), sp.Symbol("h''")),
        (sp.diff(theta, phi), sp.Symbol("h'")),
    ]
    coefficients = []
    for k in range(1, order + 1):
        c_k = (sp.diff(discrepancy, eta, k).subs(eta, 0) / sp.factorial(k)).doit()
        coefficients.append(sp.factor(sp.simplify(c_k.subs(names))))
    return coefficients


def _generic(name: str, rows: int, cols: int, symmetric: bool = False) -> sp.Matrix:
    """A matrix of independent real symbols ``name{i}{j}`` (mirrored when ``symmetric``)."""

    def entry(i: int, j: int) -> sp.Symbol:
        i, j = (min(i, j), max(i, j)) if symmetric else (i, j)
        return sp.Symbol(f"{name}{i + 1}{j + 1}", real=True)

    return sp.Matrix(rows, cols, entry)


def kronecker_identities(d_out: int = 2, d_in: int = 2) -> dict[str, sp.Matrix]:
    r"""Residuals, zero when the identity holds, of the vec/Kronecker facts behind K-FAC
    (Martens & Grosse, 2015, §3), for a layer :math:`s = W\bar a`, :math:`\bar a = (a, 1)`,
    :math:`W` of size ``d_out`` x ``(d_in + 1)``, generic symbols throughout:

    - ``"gradient"``: :math:`\partial \ell(W\bar a)/\partial W = g \bar a^\top`,
      :math:`g = \nabla_s \ell`;
    - ``"block"``: :math:`\mathrm{vec}(g\bar a^\top)\mathrm{vec}(g\bar a^\top)^\top =
      \bar a\bar a^\top \otimes gg^\top` (column-major vec);
    - ``"vec"``: :math:`(A \otimes G)\,\mathrm{vec}(V) = \mathrm{vec}(G V A^\top)`;
    - ``"vec-row-major"``: :math:`(G \otimes A)\,\mathrm{vec}_r(V) = \mathrm{vec}_r(G V A^\top)`,
      the same product in PyTorch's row-major flattening;
    - ``"inverse"``: :math:`(A \otimes G)(A^{-1} \otimes G^{-1}) = I` (symmetric A, G);
    - ``"pi-damping"``: :math:`(A + \pi\gamma I) \otimes (G + \tfrac{\gamma}{\pi} I) =
      A \otimes G + \gamma^2 I + \pi\gamma\, I \otimes G + \tfrac{\gamma}{\pi} A \otimes I`.
    """
    if any(not isinstance(d, int) or d < 1 for d in (d_out, d_in)):
        raise ValueError(f"d_out and d_in must be positive integers, got {d_out!r}, {d_in!r}.")
    d_a = d_in + 1
    kron = sp.kronecker_product
    a_bar = sp.Matrix([*_generic("a", d_in, 1), 1])
    W = _generic("w", d_out, d_a)
    s = sp.symbols(f"s1:{d_out + 1}", real=True)
    ell = sp.Function("ell")
    loss = ell(*(W * a_bar))
    g_at = sp.Matrix([sp.diff(ell(*s), si) for si in s]).subs(dict(zip(s, W * a_bar)))
    gradient = sp.Matrix(d_out, d_a, lambda i, j: sp.diff(loss, W[i, j]))
    g = _generic("g", d_out, 1)
    per_example = g * a_bar.T
    A, G = _generic("A", d_a, d_a, symmetric=True), _generic("G", d_out, d_out, symmetric=True)
    V = _generic("v", d_out, d_a)
    pi, gamma = sp.symbols("pi gamma", positive=True)
    eye_a, eye_g = sp.eye(d_a), sp.eye(d_out)
    damped = kron(A + pi * gamma * eye_a, G + gamma / pi * eye_g)
    expanded = (
        kron(A, G)
        + gamma**2 * sp.eye(d_a * d_out)
        + pi * gamma * kron(eye_a, G)
        + gamma / pi * kron(A, eye_g)
    )
    return {
        "gradient": sp.simplify(gradient - g_at * a_bar.T),
        "block": sp.expand(
            per_example.vec() * per_example.vec().T - kron(a_bar * a_bar.T, g * g.T)
        ),
        "vec": sp.expand(kron(A, G) * V.vec() - (G * V * A.T).vec()),
        "vec-row-major": sp.expand(
            kron(G, A) * V.reshape(d_out * d_a, 1) - (G * V * A.T).reshape(d_out * d_a, 1)
        ),
        "inverse": sp.simplify(kron(A, G) * kron(A.inv(), G.inv()) - sp.eye(d_a * d_out)),
        "pi-damping": sp.expand(damped - expanded),
    }


@dataclass(frozen=True)
class KLExpansion:
    r""":math:`\mathrm{KL}(p_\theta \,\|\, p_{\theta + t\delta})` of one family, expanded in
    :math:`t`, next to the Fisher :math:`F(\theta)` from the score's definition.

    ``coefficients[k]`` is the Taylor coefficient of :math:`t^k`, :math:`k = 0, \dots, 3`.
    """

    family: str
    theta: tuple[sp.Symbol, ...]
    delta: tuple[sp.Symbol, ...]
    kl: sp.Expr
    coefficients: tuple[sp.Expr, ...]
    fisher: sp.Matrix

    @property
    def quadratic_form(self) -> sp.Expr:
        r""":math:`\tfrac12 \delta^\top F \delta`."""
        d = sp.Matrix(self.delta)
        return (d.T * self.fisher * d)[0, 0] / 2

    def residuals(self) -> tuple[sp.Expr, sp.Expr, sp.Expr]:
        r"""Zero when :math:`\mathrm{KL} = \tfrac12 t^2 \delta^\top F\delta + O(t^3)`: the
        coefficients of :math:`t^0`, :math:`t^1` and :math:`t^2 - \tfrac12\delta^\top F\delta`."""
        c0, c1, c2, _ = self.coefficients
        return tuple(sp.simplify(e.rewrite(sp.exp)) for e in (c0, c1, c2 - self.quadratic_form))


def _kl_family(
    family: Literal["bernoulli", "gaussian", "categorical"],
) -> tuple[tuple[sp.Symbol, ...], Callable[[Sequence[sp.Expr]], sp.Expr], Expectation]:
    """Parameters, log-likelihood as a function of parameters, and the expectation over y."""
    if family == "bernoulli":  # the logit z, as BCEWithLogitsLoss
        z, y = sp.Symbol("z", real=True), sp.Symbol("y")

        def bernoulli_log_prob(t: Sequence[sp.Expr]) -> sp.Expr:
            p = 1 / (1 + sp.exp(-t[0]))
            return y * sp.log(p) + (1 - y) * sp.log(1 - p)

        def bernoulli_expectation(expr: sp.Expr, theta: Sequence[sp.Expr]) -> sp.Expr:
            p = 1 / (1 + sp.exp(-theta[0]))
            return p * expr.subs(y, 1) + (1 - p) * expr.subs(y, 0)

        return (z,), bernoulli_log_prob, bernoulli_expectation
    if family == "gaussian":  # mean and standard deviation
        mu, sigma, y = sp.Symbol("mu", real=True), sp.Symbol("sigma", positive=True), sp.Symbol("y")

        def gaussian_log_prob(t: Sequence[sp.Expr]) -> sp.Expr:
            return -sp.log(t[1]) - sp.log(2 * sp.pi) / 2 - (y - t[0]) ** 2 / (2 * t[1] ** 2)

        def gaussian_expectation(expr: sp.Expr, theta: Sequence[sp.Expr]) -> sp.Expr:
            return E(expr.subs(y, Normal("Y", theta[0], theta[1])))

        return (mu, sigma), gaussian_log_prob, gaussian_expectation
    if family == "categorical":  # three logits, as CrossEntropyLoss
        z, y = sp.symbols("z1:4", real=True), sp.symbols("y1:4")

        def categorical_expectation(expr: sp.Expr, theta: Sequence[sp.Expr]) -> sp.Expr:
            p = [sp.exp(t) / sum(sp.exp(u) for u in theta) for t in theta]
            one_hot = [{yj: int(j == k) for j, yj in enumerate(y)} for k in range(len(y))]
            return sum(pk * expr.subs(e) for pk, e in zip(p, one_hot, strict=True))

        def categorical_log_prob(t: Sequence[sp.Expr]) -> sp.Expr:
            return sum(yk * tk for yk, tk in zip(y, t, strict=True)) - sp.log(sum(map(sp.exp, t)))

        return z, categorical_log_prob, categorical_expectation
    raise ValueError(
        f"family {family!r} is not supported; use 'bernoulli', 'gaussian' or 'categorical'."
    )


def kl_expansion(family: Literal["bernoulli", "gaussian", "categorical"]) -> KLExpansion:
    r"""Expand :math:`\mathrm{KL}(p_\theta \| p_{\theta+t\delta}) = \mathbb{E}_{y \sim p_\theta}
    [\log p_\theta(y) - \log p_{\theta+t\delta}(y)]` in :math:`t`, both the KL and the Fisher
    :math:`F = \mathbb{E}[\nabla\log p\,\nabla\log p^\top]` from their definitions (Amari, 1998;
    Martens, 2020, §9). Families: ``"bernoulli"`` (logit :math:`z`), ``"gaussian"``
    (:math:`\mu, \sigma`), ``"categorical"`` (three logits :math:`z_1, z_2, z_3`).
    """
    theta, log_prob, expectation = _kl_family(family)
    delta = sp.symbols(f"delta1:{len(theta) + 1}", real=True)
    t = sp.Symbol("t", real=True)
    moved = [th + t * d for th, d in zip(theta, delta, strict=True)]
    kl_t = expectation(sp.expand_log(log_prob(theta) - log_prob(moved), force=True), theta)
    coefficients = tuple(
        sp.simplify(sp.diff(kl_t, t, k).subs(t, 0) / sp.factorial(k)) for k in range(4)
    )
    return KLExpansion(
        family=family,
        theta=tuple(theta),
        delta=tuple(delta),
        kl=sp.simplify(kl_t.subs(t, 1)),
        coefficients=coefficients,
        fisher=fisher_information(log_prob(theta), theta, lambda e: expectation(e, theta)),
    )
