r"""Symmetric eigendecompositions with a float64 retry, and damped Kronecker inverses.

A Kronecker-factored block :math:`A \otimes G` acts on a layer's gradient matrix
:math:`V = [dW \mid db]` (``d_G x d_A``) as :math:`V \mapsto G V A`. Its damped inverse comes
in two forms (Martens & Grosse, 2015, §6.3):

- :class:`EigenInverse`, the exact :math:`(A \otimes G + \lambda I)^{-1}`, applied in the
  factors' eigenbases;
- :class:`FactoredInverse`, the factored Tikhonov damping
  :math:`(A + \pi\sqrt\lambda I)^{-1} \otimes (G + \sqrt\lambda/\pi\, I)^{-1}`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from natlib.checks import check_choice, check_finite, check_positive, is_finite

DampingMode = Literal["exact", "pi"]
#: The default relative residual at which conjugate gradients stop, per dtype.
CG_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}
_GRAM_LEAF = 1024  # column blocks at most this wide are multiplied as a whole
# Symmetric QR with eigenvectors costs about 9 n^3 flops (Golub & Van Loan, 2013, §8.3).
EIGH_FLOPS_PER_CUBE = 9
# Forming (Q / (e + c)) Q^T from an eigendecomposition costs about 2 n^3 flops.
INVERSE_FLOPS_PER_CUBE = 2


class Eigen(NamedTuple):
    """Eigenvalues (ascending) and eigenvectors (columns) of a symmetric matrix."""

    values: Tensor
    vectors: Tensor


def eigh(matrix: Tensor, what: str) -> Eigen:
    """Eigenvalues (clamped at zero) and eigenvectors of a symmetric positive semi-definite
    matrix; ``what`` names it in errors.

    A float32 decomposition that fails or returns non-finite values is retried in float64.

    Raises:
        ValueError: if ``matrix`` holds NaN or Inf, or its float64 decomposition fails.
    """
    check_finite(matrix, what)
    try:
        values, vectors = torch.linalg.eigh(matrix)
        ok = is_finite(values) and is_finite(vectors)
    except torch.linalg.LinAlgError:
        if matrix.dtype == torch.float64:
            raise ValueError(f"the eigendecomposition of {what} did not converge.") from None
        ok = False
    if not ok:
        try:
            values, vectors = torch.linalg.eigh(matrix.double())
        except torch.linalg.LinAlgError:
            raise ValueError(
                f"the eigendecomposition of {what} did not converge, in float64 either."
            ) from None
        values, vectors = values.to(matrix.dtype), vectors.to(matrix.dtype)
    check_finite(values, f"the eigenvalues of {what}")
    return Eigen(values.clamp_min(0.0), vectors)


def condition_number(matrix: Tensor, cholesky: Tensor, iterations: int = 20) -> float:
    r"""An estimate of :math:`\kappa_2(C) = \lambda_\max / \lambda_\min` of a symmetric positive
    definite ``matrix`` :math:`C = LL^\top` (``cholesky`` is :math:`L`): power iterations on
    :math:`C` and on :math:`C^{-1}` (two triangular solves each), from a fixed random start.
    A lower bound that tightens with ``iterations``; :math:`O(P^2)` per iteration."""
    generator = torch.Generator(device=matrix.device).manual_seed(0)
    start = torch.randn(
        matrix.shape[0], 1, generator=generator, dtype=matrix.dtype, device=matrix.device
    )

    def largest(apply: Callable[[Tensor], Tensor]) -> Tensor:
        v = start / start.norm()
        for _ in range(iterations):
            w = apply(v)
            value = w.norm()
            v = w / value
        return value

    return (
        largest(lambda v: matrix @ v) * largest(lambda v: torch.cholesky_solve(v, cholesky))
    ).item()


def pi_factor(a: Tensor, g: Tensor) -> Tensor:
    r""":math:`\pi = \sqrt{(\mathrm{tr} A / d_A) / (\mathrm{tr} G / d_G)}` from the factors'
    eigenvalues; 1 when either trace vanishes."""
    ratio = (a.mean() / g.mean()).sqrt()
    return torch.where(torch.isfinite(ratio) & (ratio > 0), ratio, torch.ones_like(ratio))


@dataclass(frozen=True)
class EigenInverse:
    r""":math:`(A \otimes G + \lambda I)^{-1}` from :math:`A = Q_A \mathrm{diag}(a) Q_A^\top`,
    :math:`G = Q_G \mathrm{diag}(g) Q_G^\top`:

    .. math:: V \mapsto Q_G \big[(Q_G^\top V Q_A) \oslash (g a^\top + \lambda)\big] Q_A^\top .
    """

    QG: Tensor
    QA: Tensor
    scale: Tensor  # 1 / (g a^T + lambda), (d_G, d_A)

    @classmethod
    def of(cls, eigen_a: Eigen, eigen_g: Eigen, damping: float) -> EigenInverse:
        check_positive("damping", damping)
        (a, QA), (g, QG) = eigen_a, eigen_g
        return cls(QG, QA, 1.0 / (g.unsqueeze(1) * a.unsqueeze(0) + damping))

    def apply(self, V: Tensor) -> Tensor:
        """The inverse applied to ``V`` of shape ``(..., d_G, d_A)``."""
        return self.QG @ ((self.QG.T @ V @ self.QA) * self.scale) @ self.QA.T


@dataclass(frozen=True)
class FactoredInverse:
    r""":math:`(A + \pi\sqrt\lambda I)^{-1} \otimes (G + \sqrt\lambda/\pi\, I)^{-1}` with
    :math:`\pi` from :func:`pi_factor`: :math:`V \mapsto G_\lambda^{-1} V A_\lambda^{-1}`."""

    G_inv: Tensor
    A_inv: Tensor

    @classmethod
    def of(cls, eigen_a: Eigen, eigen_g: Eigen, damping: float) -> FactoredInverse:
        check_positive("damping", damping)
        (a, QA), (g, QG) = eigen_a, eigen_g
        pi = pi_factor(a, g)
        root = math.sqrt(damping)
        return cls((QG / (g + root / pi)) @ QG.T, (QA / (a + pi * root)) @ QA.T)

    def apply(self, V: Tensor) -> Tensor:
        """The inverse applied to ``V`` of shape ``(..., d_G, d_A)``."""
        return self.G_inv @ V @ self.A_inv


KroneckerInverse = EigenInverse | FactoredInverse


def damped_inverse(
    eigen_a: Eigen, eigen_g: Eigen, damping: float, mode: DampingMode
) -> KroneckerInverse:
    """The damped inverse of :math:`A \\otimes G` in ``mode`` ``"exact"`` or ``"pi"``."""
    check_choice("damping mode", mode, DampingMode)
    kind = EigenInverse if mode == "exact" else FactoredInverse
    return kind.of(eigen_a, eigen_g, damping)


def gram(M: Tensor) -> Tensor:
    r""":math:`M^\top M`, computing only the upper block triangle and mirroring it.

    Splits the columns in halves recursively: :math:`[M_1\ M_2]^\top [M_1\ M_2]` needs
    :math:`M_1^\top M_1`, :math:`M_2^\top M_2` (recursively) and one product
    :math:`M_1^\top M_2`, so the cost tends to half a general matrix product.
    """
    out = M.new_empty(M.shape[1], M.shape[1])

    def fill(lo: int, hi: int) -> None:
        if hi - lo <= _GRAM_LEAF:
            out[lo:hi, lo:hi] = M[:, lo:hi].T @ M[:, lo:hi]
            return
        mid = (lo + hi) // 2
        fill(lo, mid)
        fill(mid, hi)
        off = M[:, lo:mid].T @ M[:, mid:hi]
        out[lo:mid, mid:hi] = off
        out[mid:hi, lo:mid] = off.T

    fill(0, M.shape[1])
    return out


@dataclass(frozen=True)
class CGResult:
    """The outcome of :func:`conjugate_gradient`."""

    x: Tensor
    iterations: int
    residual: float  # relative residual ||b - Ax|| / ||b||
    converged: bool


def conjugate_gradient(
    matvec: Callable[[Tensor], Tensor],
    b: Tensor,
    tol: float = 1e-10,
    max_iter: int | None = None,
    x0: Tensor | None = None,
) -> CGResult:
    r"""Solve :math:`Ax = b` for symmetric positive definite :math:`A` given as ``matvec``.

    Conjugate gradients (Nocedal & Wright, 2006, Alg. 5.2), started at :math:`x = 0` or at
    ``x0`` (a warm start, as Hessian-free optimisation uses; Martens, 2010, §4.5), stopping
    when :math:`\lVert b - Ax \rVert \le \mathrm{tol} \lVert b \rVert` or after ``max_iter``
    iterations (default: the dimension).

    Raises:
        ValueError: if a search direction has non-positive curvature (:math:`A` is not
            positive definite), or ``x0`` does not have the shape of ``b``.
    """
    check_positive("tol", tol)
    max_iter = b.numel() if max_iter is None else max_iter
    if x0 is None:
        x = torch.zeros_like(b)
        r = b.clone()
    elif x0.shape != b.shape:
        raise ValueError(f"x0 must have the shape of b, {tuple(b.shape)}; got {tuple(x0.shape)}.")
    else:
        x = x0.clone()
        r = b - matvec(x)
    d = r.clone()
    rr = r @ r
    b_norm = b.norm()
    if b_norm == 0:
        return CGResult(torch.zeros_like(b), 0, 0.0, True)
    iterations = 0
    while iterations < max_iter and rr.sqrt() > tol * b_norm:
        ad = matvec(d)
        curvature = d @ ad
        if curvature <= 0:
            raise ValueError(
                f"conjugate gradients met non-positive curvature {curvature.item():.3g}; "
                "the matrix is not positive definite (add damping)."
            )
        alpha = rr / curvature
        x = x + alpha * d
        r = r - alpha * ad
        rr, rr_old = r @ r, rr
        d = r + (rr / rr_old) * d
        iterations += 1
    residual = (rr.sqrt() / b_norm).item()
    return CGResult(x, iterations, residual, residual <= tol)
