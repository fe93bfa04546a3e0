r"""Hessian-free optimisation (Martens, 2010): truncated conjugate gradients on damped
GGN-vector products, warm-started, with Levenberg-Marquardt damping.

Step :math:`k`, with the gradient :math:`g` and loss :math:`L` of the training loop's batch and
the GGN :math:`G` (:class:`natlib.exact.GGN`, matrix-free) of its first ``curvature_batch_size``
examples:

1. :math:`d` approximately minimises the damped quadratic model
   :math:`g^\top d + \tfrac12 d^\top (G + \lambda I) d`: conjugate gradients on
   :math:`(G + \lambda I)d = -g` (:func:`natlib.linalg.conjugate_gradient`), started at
   :math:`\zeta d_{k-1}` and stopped at relative residual ``cg_tol`` or after ``cg_max_iter``
   iterations;
2. :math:`p = \eta d`, :math:`\theta \leftarrow \theta + p`;
3. the reduction ratio :math:`\rho = (L(\theta + p) - L(\theta)) / (g^\top p + \tfrac12
   p^\top G p)` (:func:`reduction_ratio`), both on the loop's batch;
4. :math:`\lambda \leftarrow` :func:`levenberg_marquardt` :math:`(\lambda, \rho)`.

Martens (2010) also preconditions conjugate gradients, stops them on relative progress and
backtracks over their iterates; those refinements are not implemented here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from natlib.checks import check_positive, check_positive_int, check_unit_interval
from natlib.exact import GGN
from natlib.linalg import conjugate_gradient
from natlib.preconditioned import PreconditionedOptimizer

BOOST, DROP = 3 / 2, 2 / 3  # damping factors of Martens (2010, §4.1)
LOW_RATIO, HIGH_RATIO = 1 / 4, 3 / 4  # reduction ratios below and above which they apply


def reduction_ratio(actual: float, predicted: float) -> float:
    r""":math:`\rho = \text{actual} / \text{predicted}` for a predicted change below zero; a
    model that predicts no decrease gives :math:`\rho = -\infty` (trust it less).

    Raises:
        ValueError: if either change is NaN or Inf.
    """
    if not (math.isfinite(actual) and math.isfinite(predicted)):
        raise ValueError(
            f"the actual ({actual}) and predicted ({predicted}) loss changes must be finite."
        )
    return actual / predicted if predicted < 0 else -math.inf


def levenberg_marquardt(damping: float, rho: float) -> float:
    r"""The Levenberg-Marquardt rule of Martens (2010, §4.1): :math:`\lambda \cdot 3/2` if
    :math:`\rho < 1/4`, :math:`\lambda \cdot 2/3` if :math:`\rho > 3/4`, else :math:`\lambda`.

    Raises:
        ValueError: if ``damping`` is not a positive finite number or ``rho`` is NaN.
    """
    check_positive("damping", damping)
    if math.isnan(rho):
        raise ValueError("the reduction ratio rho must be a number or -inf, got NaN.")
    if rho < LOW_RATIO:
        return damping * BOOST
    if rho > HIGH_RATIO:
        return damping * DROP
    return damping


@dataclass(frozen=True)
class HessianFreeStep:
    """What one :meth:`HessianFree.step` did: its conjugate-gradient run (``iterations`` GGN
    products, plus one for the model's prediction), the losses, the ratio and the damping
    before and after."""

    iterations: int
    residual: float
    loss_before: float
    loss_after: float
    predicted: float
    rho: float
    damping_before: float
    damping_after: float


class HessianFree(PreconditionedOptimizer):
    r"""Hessian-free optimisation (Martens, 2010), as in the module's numbered steps.

    It trains with the usual loop (``zero_grad``, ``loss_fn(model(X), y).backward()``,
    ``step()``, or ``step(closure)``): the hooks of
    :class:`natlib.preconditioned.PreconditionedOptimizer` and :class:`natlib.exact.LossWatcher`
    record the batch, its targets and its loss, which the step re-evaluates at
    :math:`\theta + p`. The damping lives in the parameter group and changes every step;
    ``last`` describes the last step.

    Args:
        lr: :math:`\eta` (1 is Martens's step).
        damping: the initial :math:`\lambda`.
        cg_max_iter: at most this many conjugate-gradient iterations per step (truncation).
        cg_tol: relative residual at which conjugate gradients stop earlier.
        warm_start: :math:`\zeta \in [0, 1)`, the share of the last direction CG starts from
            (Martens & Sutskever, 2012, use 0.95; 0 starts from zero).
        curvature_batch_size: the GGN uses the first this many examples of the batch
            (``None``: all).

    Raises:
        ValueError: for a bad hyper-parameter, a non-finite gradient, or a GGN product that
            is not finite.
        FloatingPointError: if the loss at :math:`\theta + p` is NaN or Inf (the parameters
            are restored first).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        lr: float = 1.0,
        damping: float = 1.0,
        cg_max_iter: int = 250,
        cg_tol: float = 1e-6,
        warm_start: float = 0.95,
        curvature_batch_size: int | None = None,
    ) -> None:
        check_positive_int("cg_max_iter", cg_max_iter)
        check_positive("cg_tol", cg_tol)
        check_unit_interval("warm_start", warm_start)
        if curvature_batch_size is not None:
            check_positive_int("curvature_batch_size", curvature_batch_size)
        super().__init__(model, loss_fn, GGN, lr, damping)
        self.cg_max_iter, self.cg_tol, self.warm_start = cg_max_iter, cg_tol, warm_start
        self.curvature_batch_size = curvature_batch_size
        self.last: HessianFreeStep | None = None

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One Hessian-free step on the recorded batch; ``closure`` (optional) runs the loop's
        forward and backward pass first and returns the loss."""
        loss, group, g = self._begin_step(closure)
        batch = self.watcher.batch()
        m = self.curvature_batch_size or batch.X.shape[0]
        ggn = GGN.from_batch(self.model, self.loss_fn, batch.X[:m], batch.y[:m]).matvec
        damping = group["damping"]
        params = group["params"]
        previous = [self.state[p].get("direction") for p in params]
        start = None
        if self.warm_start and previous[0] is not None:
            start = self.warm_start * self.layout.flatten(previous)
        result = conjugate_gradient(
            lambda v: ggn(v) + damping * v, -g, self.cg_tol, self.cg_max_iter, x0=start
        )
        step = group["lr"] * result.x
        predicted = (g @ step + 0.5 * step @ ggn(step)).item()
        saved = [p.clone() for p in params]
        for p, s in zip(params, self.layout.split(step)):
            p.add_(s)
        loss_after = self.loss_fn(self.model(batch.X), batch.y).item()
        if not math.isfinite(loss_after):
            for p, s in zip(params, saved):
                p.copy_(s)
            raise FloatingPointError(
                f"the loss after the Hessian-free step is {loss_after}; the parameters were "
                f"restored. Raise the damping (now {damping:g}) or lower lr ({group['lr']:g})."
            )
        loss_before = batch.loss.item()
        rho = reduction_ratio(loss_after - loss_before, predicted)
        group["damping"] = levenberg_marquardt(damping, rho)
        for p, d in zip(params, self.layout.split(result.x)):
            self.state[p]["direction"] = d.clone()
        self.last = HessianFreeStep(
            result.iterations,
            result.residual,
            loss_before,
            loss_after,
            predicted,
            rho,
            damping,
            group["damping"],
        )
        self.steps += 1
        return loss
