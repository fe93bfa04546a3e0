r"""Saddle-free Newton's curvature: the absolute value of the Hessian.

Newton's step :math:`-H^{-1}g` moves towards any stationary point, saddles included: along an
eigenvector of :math:`H` with eigenvalue :math:`\lambda_i < 0` it goes uphill. Saddle-free
Newton (Dauphin et al., 2014) rescales the gradient by the absolute eigenvalues instead,

.. math::
    |H| &= V |\Lambda| V^\top \quad\text{for}\quad H = V \Lambda V^\top, \\
    \Delta &= -(|H| + \lambda I)^{-1} g = -V (|\Lambda| + \lambda)^{-1} V^\top g,

which keeps Newton's step size along each eigenvector and descends along all of them.
:class:`SaddleFreeHessian` is that matrix behind the curvature interface, dense (it needs the
eigendecomposition of :math:`H`, so small models only); damped Newton with :math:`H` itself and
Gauss-Newton use :class:`natlib.exact.Hessian` and :class:`natlib.exact.GGN`, and the
optimisers are configurations in :mod:`natlib.optim`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from natlib import costmodel, curvature
from natlib.checks import check_finite, check_positive
from natlib.exact import ExactCurvature
from natlib.interface import Flops
from natlib.layout import ParamLayout
from natlib.linalg import Eigen, eigh
from natlib.losses import FisherKind


def absolute_value(matrix: Tensor, what: str = "the Hessian") -> Tensor:
    r""":math:`|A| = V|\Lambda|V^\top` of a symmetric :math:`A = V\Lambda V^\top`; ``what``
    names ``matrix`` in errors.

    Raises:
        ValueError: if ``matrix`` is not square or holds NaN or Inf.
    """
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"{what} must be a square matrix, got shape {tuple(matrix.shape)}.")
    return _absolute_eigen(matrix, what)[0]


def _absolute_eigen(matrix: Tensor, what: str) -> tuple[Tensor, Eigen]:
    r""":math:`|A|` and its eigendecomposition :math:`(|\Lambda|, V)`, from one ``eigh``."""
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"{what} must be a square matrix, got shape {tuple(matrix.shape)}.")
    check_finite(matrix, what)
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.abs()) @ vectors.T, Eigen(values.abs(), vectors)


class SaddleFreeHessian(ExactCurvature):
    r"""The saddle-free curvature :math:`|H| = V|\Lambda|V^\top` of one batch (Dauphin et al.,
    2014), dense; ``solve`` applies :math:`V(|\Lambda| + \lambda)^{-1}V^\top` from the
    eigendecomposition of the last :meth:`refresh`."""

    what = "saddle-free Hessian"

    @classmethod
    def of_hessian(
        cls, model: nn.Module, hessian: Tensor, batch_size: int = 1
    ) -> SaddleFreeHessian:
        """The saddle-free curvature of a given ``(P, P)`` Hessian of ``model``'s loss.

        Raises:
            ValueError: if ``hessian`` is not ``(P, P)`` or holds NaN or Inf.
        """
        layout = ParamLayout.of(model)
        if hessian.shape != (layout.numel, layout.numel):
            raise ValueError(
                f"the Hessian must have shape ({layout.numel}, {layout.numel}) for this model, "
                f"got {tuple(hessian.shape)}."
            )
        dense, eigen = _absolute_eigen(hessian, "the Hessian")
        curvature = cls(layout, None, dense, hessian, batch_size, {})
        curvature._eigen = (dense, eigen)  # refresh reuses it while the matrix is unchanged
        return curvature

    @classmethod
    def from_batch(
        cls,
        model: nn.Module,
        loss_fn: nn.Module,
        X: Tensor,
        y: Tensor | None = None,
        *,
        kind: FisherKind = "exact",
    ) -> SaddleFreeHessian:
        """:math:`|H|` of the batch ``(X, y)``, from the dense Hessian formed now."""
        cls._check_no_kind(kind)
        return cls.of_hessian(model, curvature.hessian(model, loss_fn, X, y), X.shape[0])

    def refresh(self, damping: float) -> None:
        r"""The eigendecomposition of :math:`|H|` (the eigenvectors of :math:`H`, eigenvalues
        :math:`|\lambda_i|`), kept with ``damping``.

        Raises:
            ValueError: for a bad ``damping``, or if the matrix holds NaN or Inf.
        """
        check_positive("damping", damping)
        dense, eigen = getattr(self, "_eigen", (None, None))
        check_finite(self.to_dense(), f"the {self.what}")
        if dense is None or dense is not self.to_dense():
            eigen = eigh(self.to_dense(), f"the {self.what}")
        self._factor = (damping, eigen)

    def _apply_factor(self, factor: Eigen, v: Tensor) -> Tensor:
        values, vectors = factor
        return vectors @ ((vectors.T @ v) / (values + self.damping))

    @property
    def flops(self) -> Flops:
        """As :class:`natlib.exact.ExactCurvature`, with an eigendecomposition for the refresh
        and two dense products with :math:`V` per solve."""
        p = self.layout.numel
        return Flops(
            update=super().flops.update,
            refresh=costmodel.eigh_flops(p),
            solve=2 * costmodel.factor_apply_flops(p, 1),
        )
