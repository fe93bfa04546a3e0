r"""Natural-gradient optimisers: the configurations of one preconditioned
``torch.optim.Optimizer``.

:class:`KFAC`, :class:`NGD`, :class:`DiagonalNGD`, :class:`BlockDiagonalNGD`, :class:`EKFAC`,
:class:`Shampoo`, :class:`Newton`, :class:`SaddleFreeNewton` and :class:`GaussNewton` each fix
the curvature class (and default hyper-parameters) of
:class:`natlib.preconditioned.PreconditionedOptimizer`; a new method is its curvature class
plus a few lines here. The base, :class:`~natlib.preconditioned.Trace` and
:func:`~natlib.preconditioned.train` are re-exported from :mod:`natlib.preconditioned`.
Hessian-free optimisation, which needs the loss at the new point, is
:class:`natlib.hessianfree.HessianFree`.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from natlib.approximations import BlockDiagonalFisher, DiagonalFisher
from natlib.ekfac import EKFACApproximation
from natlib.exact import GGN, ExactCurvature, Fisher, Hessian
from natlib.factors import Approximation
from natlib.interface import Communicator, RunningCurvature
from natlib.kfac import KFACApproximation
from natlib.layout import Unsupported
from natlib.linalg import DampingMode
from natlib.losses import FisherKind
from natlib.newton import SaddleFreeHessian
from natlib.preconditioned import PreconditionedOptimizer as PreconditionedOptimizer
from natlib.preconditioned import Trace as Trace
from natlib.preconditioned import train as train
from natlib.shampoo import ShampooPreconditioner


class KFAC(PreconditionedOptimizer):
    r"""K-FAC (Martens & Grosse, 2015) for models of ``nn.Linear`` and ``nn.Conv2d`` layers:
    :class:`~natlib.preconditioned.PreconditionedOptimizer` with
    :class:`natlib.kfac.KFACApproximation`.

    Args:
        damping_mode: ``"exact"`` or factored ``"pi"`` (two products per layer and step).
        approximation: for weight-shared layers (Linear on ``(N, T, d)``, Conv2d),
            K-FAC-``"expand"`` or K-FAC-``"reduce"`` (Eschenhagen et al., 2023).
        unsupported: ``"error"`` for any other module with parameters, or ``"gradient"`` to
            train their parameters by the plain gradient step :math:`\eta g / (1 + \lambda)`
            (LayerNorm, Embedding).
        communicator: ``natlib.distributed.DistributedCommunicator()`` for data-parallel
            K-FAC under ``torchrun`` (:mod:`natlib.distributed`).

    The other arguments are those of :class:`~natlib.preconditioned.PreconditionedOptimizer`.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        lr: float = 0.01,
        damping: float = 1e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        T_cov: int = 1,
        T_inv: int = 10,
        ema_decay: float = 0.95,
        kl_clip: float | None = None,
        kind: FisherKind = "exact",
        mc_samples: int = 1,
        damping_mode: DampingMode = "pi",
        approximation: Approximation = "expand",
        unsupported: Unsupported = "error",
        seed: int = 0,
        communicator: Communicator | None = None,
    ) -> None:
        super().__init__(
            model,
            loss_fn,
            KFACApproximation,
            lr,
            damping,
            momentum,
            weight_decay,
            T_cov,
            T_inv,
            ema_decay,
            kl_clip,
            kind,
            mc_samples,
            seed,
            communicator,
            damping_mode=damping_mode,
            approximation=approximation,
            unsupported=unsupported,
        )


class NGD(PreconditionedOptimizer):
    r"""Damped natural gradient descent with the dense Fisher of each batch:
    :math:`\theta \leftarrow \theta - \eta\,(F + \lambda I)^{-1} \nabla_\theta L` (Amari,
    1998), :math:`F` from :class:`natlib.exact.Fisher`, refreshed every step and solved by
    Cholesky. Cubic in the parameter count: for small models only."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        lr: float = 1.0,
        damping: float = 1e-3,
        kind: FisherKind = "exact",
        mc_samples: int = 1,
        seed: int = 0,
    ) -> None:
        super().__init__(
            model, loss_fn, Fisher, lr, damping, kind=kind, mc_samples=mc_samples, seed=seed
        )


class BatchCurvatureMethod(PreconditionedOptimizer):
    r""":math:`\theta \leftarrow \theta - \eta\,(C + \lambda I)^{-1} \nabla_\theta L` with the
    exact matrix :math:`C` (class attribute ``matrix``) of each batch, formed every step with no
    averaging: dense and factorised up to :data:`natlib.exact.DENSE_LIMIT` parameters,
    matrix-free and solved by conjugate gradients beyond. The batch's labels come from the
    loss module's call (:class:`natlib.exact.LossWatcher`), so the loop must compute the loss
    as ``loss_fn(model(X), y)`` with the ``loss_fn`` given here.

    Args:
        lr, damping, momentum, weight_decay: as
            :class:`~natlib.preconditioned.PreconditionedOptimizer`.
    """

    matrix: ClassVar[type[ExactCurvature]]

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        lr: float = 1.0,
        damping: float = 1e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(model, loss_fn, self.matrix, lr, damping, momentum, weight_decay)


class Newton(BatchCurvatureMethod):
    r"""Damped Newton, :math:`\theta \leftarrow \theta - \eta\,(H + \lambda I)^{-1}
    \nabla_\theta L` with the batch Hessian :math:`H` (:class:`natlib.exact.Hessian`; Nocedal &
    Wright, 2006, §3.4). :math:`H + \lambda I` may be indefinite: the dense solve is an LU
    solve, and conjugate gradients (beyond :data:`natlib.exact.DENSE_LIMIT`) raise
    ``ValueError`` on negative curvature, asking for more damping."""

    matrix = Hessian


class SaddleFreeNewton(BatchCurvatureMethod):
    r"""Saddle-free Newton (Dauphin et al., 2014), :math:`\theta \leftarrow \theta - \eta\,
    (|H| + \lambda I)^{-1} \nabla_\theta L` with :math:`|H| = V|\Lambda|V^\top`
    (:class:`natlib.newton.SaddleFreeHessian`): dense, for small models only."""

    matrix = SaddleFreeHessian


class GaussNewton(BatchCurvatureMethod):
    r"""Damped (generalised) Gauss-Newton, :math:`\theta \leftarrow \theta - \eta\,(G +
    \lambda I)^{-1} \nabla_\theta L` with the batch GGN :math:`G = \sum_n J_n^\top
    (\nabla_f^2 L) J_n` (:class:`natlib.exact.GGN`; Schraudolph, 2002; Martens, 2020, §8),
    which equals the exact Fisher for the supported losses: the same step as :class:`NGD`."""

    matrix = GGN


class Configuration(PreconditionedOptimizer):
    """:class:`~natlib.preconditioned.PreconditionedOptimizer` with its curvature class
    (``curvature_type``) and default hyper-parameters (``configuration``) fixed; keyword
    arguments override them."""

    curvature_type: ClassVar[type[RunningCurvature]]
    configuration: ClassVar[dict[str, Any]]

    def __init__(self, model: nn.Module, loss_fn: nn.Module, **hyperparameters: Any) -> None:
        options = self.configuration | hyperparameters
        super().__init__(model, loss_fn, self.curvature_type, **options)


class DiagonalNGD(Configuration):
    r"""Natural gradient with the Fisher's diagonal, :math:`\Delta = (g + \omega\theta) \oslash
    (\mathrm{diag}\,F + \lambda)`, from squared per-example (per-cotangent) gradients
    (:class:`natlib.approximations.DiagonalFisher`). Defaults: ``lr=0.1``, ``damping=1e-3``,
    ``kind="exact"``, ``T_cov=T_inv=1``, ``ema_decay=0.95``; others as
    :class:`~natlib.preconditioned.PreconditionedOptimizer`."""

    curvature_type = DiagonalFisher
    configuration = dict(lr=0.1, damping=1e-3, ema_decay=0.95)


class BlockDiagonalNGD(Configuration):
    r"""Natural gradient with the Fisher's exact layer-wise diagonal blocks
    (:class:`natlib.approximations.BlockDiagonalFisher`), solved by Cholesky per layer.
    Defaults: ``lr=1.0``, ``damping=1e-3``, ``kind="exact"``, ``T_cov=T_inv=1``,
    ``ema_decay=0``; others as :class:`~natlib.preconditioned.PreconditionedOptimizer`."""

    curvature_type = BlockDiagonalFisher
    configuration = dict(lr=1.0, damping=1e-3)


class EKFAC(Configuration):
    r"""EK-FAC (George et al., 2018): K-FAC's eigenbasis every ``T_inv`` steps, its
    eigenvalues re-fitted to projected per-example gradients every ``T_cov`` steps
    (:class:`natlib.ekfac.EKFACApproximation`). Defaults as :class:`KFAC`: ``lr=0.01``,
    ``damping=1e-3``, ``T_inv=10``, ``ema_decay=0.95``, ``kind="exact"``."""

    curvature_type = EKFACApproximation
    configuration = dict(lr=0.01, damping=1e-3, T_inv=10, ema_decay=0.95)


class Shampoo(Configuration):
    r"""Shampoo (Gupta et al., 2018): :math:`\Delta = (L + \varepsilon I)^{-1/4} \bar G
    (R + \varepsilon I)^{-1/4}` per layer with :math:`\varepsilon` = ``damping``, inverse roots
    every ``T_inv`` steps (:class:`natlib.shampoo.ShampooPreconditioner`; ``damping_mode``
    ``"root"`` or ``"exact"``). Defaults: ``lr=0.01``, ``damping=1e-4``, ``T_inv=10``,
    ``ema_decay=0.99``, ``kind="empirical"`` (the loop's own gradient, the only one it
    supports)."""

    curvature_type = ShampooPreconditioner
    configuration = dict(lr=0.01, damping=1e-4, T_inv=10, ema_decay=0.99, kind="empirical")
