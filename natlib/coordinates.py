"""Coordinate changes :math:`\\theta = h(\\phi)` of a model's flat parameters, with inverse and
Jacobian: elementwise maps (:class:`DiagonalScaling`, :class:`Sinh`, :class:`Exp`) and affine
maps (:class:`Affine`).

:mod:`natlib.reparam` runs update rules in both coordinate systems and re-exports these names;
a natural-gradient step is invariant under affine maps, and under the nonlinear ones to
first order in the step size (Amari, 1998; Martens, 2020).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor


def _check_vector(name: str, value: Tensor, size: int | None = None) -> None:
    if not isinstance(value, Tensor) or value.dim() < 1:
        raise ValueError(f"{name} must be a tensor of shape (..., P), got {value!r}.")
    if size is not None and value.shape[-1] != size:
        raise ValueError(
            f"{name} has {value.shape[-1]} entries in its last dimension; this map acts on {size}."
        )


def log_uniform(
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
        return cls(log_uniform(size, spread, generator, dtype))

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
        s = log_uniform(size, spread, generator, dtype)
        U, V = (haar_orthogonal(size, generator, s.dtype) for _ in range(2))
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


def haar_orthogonal(size: int, generator: torch.Generator | None, dtype: torch.dtype) -> Tensor:
    """A Haar-distributed orthogonal matrix: QR of a Gaussian matrix with the signs fixed."""
    Q, R = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=dtype))
    return Q * torch.sign(torch.diagonal(R))
