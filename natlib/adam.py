r"""Adam's preconditioner (Kingma & Ba, 2015) as a curvature object, so that it can be set
beside the diagonal Fisher of :mod:`natlib.approximations`.

Adam keeps an exponential average of squared *mini-batch* gradients :math:`\bar g_t`,

.. math:: v_t = \beta_2 v_{t-1} + (1 - \beta_2)\, \bar g_t \odot \bar g_t, \qquad
          \hat v_t = v_t / (1 - \beta_2^t),

and divides by :math:`\sqrt{\hat v_t} + \varepsilon`. As a curvature matrix that is
:math:`C = \mathrm{diag}(\sqrt{\hat v_t})` with damping :math:`\lambda = \varepsilon`:
:math:`(C + \varepsilon I)^{-1} \bar g` is Adam's step without its first moment. It differs
from the diagonal Fisher :math:`\mathrm{diag}\,F = r \sum_n g_n \odot g_n` in three separate
ways: squared mini-batch gradients instead of per-example ones, the data's labels instead of
the model's, and the power :math:`-\tfrac12` instead of :math:`-1`.

The running average reproduces ``torch.optim.Adam``'s ``exp_avg_sq`` bit for bit (the same
operations on the same per-parameter tensors), and :meth:`AdamPreconditioner.denominators`
its denominators, with ``bias_correction=True`` (PyTorch always corrects).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from natlib.approximations import DiagonalFisher
from natlib.checks import (
    check_finite,
    check_positive,
    check_positive_int,
    check_unit_interval,
)
from natlib.gradient import GradientWatcher, check_gradient_kind, minibatch_gradient
from natlib.interface import Flops, RunningCurvature
from natlib.layout import ParamLayout
from natlib.losses import FisherKind


class AdamPreconditioner(RunningCurvature):
    r""":math:`C = \mathrm{diag}(\sqrt{v_t / (1 - \beta_2^t)})` (without bias correction
    :math:`\mathrm{diag}(\sqrt{v_t})`), with :math:`v_t` Adam's second moment.

    Attributes:
        second_moment: :math:`v_t`, one tensor per parameter, shaped like it.
        steps: :math:`t`, the number of gradients averaged in.
        gradient: the mini-batch gradient of a batch estimate (per parameter), which
            :meth:`update` averages in.
    """

    def __init__(
        self,
        layout: ParamLayout,
        second_moment: list[Tensor],
        steps: int,
        beta2: float = 0.999,
        bias_correction: bool = True,
        kind: FisherKind = "empirical",
        gradient: list[Tensor] | None = None,
    ) -> None:
        check_unit_interval("beta2", beta2)
        check_gradient_kind(kind, "Adam's preconditioner")
        for name, v in zip(layout.names, second_moment):
            check_finite(v, f"the second moment of parameter {name!r}")
        self.layout = layout
        self.second_moment, self.steps, self.gradient = second_moment, steps, gradient
        self.beta2, self.bias_correction, self.kind = beta2, bias_correction, kind
        self._damping: float | None = None

    @classmethod
    def of_gradient(
        cls,
        layout: ParamLayout,
        gradient: list[Tensor],
        beta2: float = 0.999,
        bias_correction: bool = True,
        kind: FisherKind = "empirical",
    ) -> AdamPreconditioner:
        r"""Adam's first step from zero: :math:`v_1 = (1 - \beta_2)\, \bar g \odot \bar g` for
        per-parameter gradients ``gradient``."""
        check_unit_interval("beta2", beta2)
        moment = [torch.zeros_like(g).mul_(beta2).addcmul_(g, g, value=1 - beta2) for g in gradient]
        return cls(layout, moment, 1, beta2, bias_correction, kind, gradient)

    @classmethod
    def from_batch(
        cls,
        model: nn.Module,
        loss_fn: nn.Module,
        X: Tensor,
        y: Tensor | None = None,
        *,
        kind: FisherKind = "empirical",
        generator: torch.Generator | None = None,
        beta2: float = 0.999,
        bias_correction: bool = True,
    ) -> AdamPreconditioner:
        """Adam's first step on the mini-batch gradient of the batch (``kind`` ``"empirical"``
        or ``"mc"``, see :func:`natlib.gradient.minibatch_gradient`)."""
        layout = ParamLayout.of(model)
        g = minibatch_gradient(model, loss_fn, X, y, kind, generator)
        return cls.of_gradient(layout, layout.split(g), beta2, bias_correction, kind)

    @classmethod
    def watch(
        cls,
        model: nn.Module,
        loss_fn: nn.Module,
        *,
        kind: FisherKind = "empirical",
        mc_samples: int = 1,
        generator: torch.Generator | None = None,
        beta2: float = 0.999,
        bias_correction: bool = True,
    ) -> GradientWatcher:
        """Batch estimates from the training loop's gradient (``kind="empirical"`` only)."""
        return GradientWatcher(
            model,
            kind,
            lambda layout, g: cls.of_gradient(layout, g, beta2, bias_correction, kind),
            "Adam's preconditioner",
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.second_moment[0].dtype

    @property
    def device(self) -> torch.device:
        return self.second_moment[0].device

    def _root(self) -> list[Tensor]:
        r""":math:`\sqrt{\hat v_t}` per parameter, as ``torch.optim.Adam`` computes it."""
        if not self.bias_correction:
            return [v.sqrt() for v in self.second_moment]
        correction = (1 - self.beta2 ** float(self.steps)) ** 0.5
        return [v.sqrt() / correction for v in self.second_moment]

    def denominators(self, damping: float) -> list[Tensor]:
        r""":math:`\sqrt{\hat v_t} + \varepsilon` per parameter, bit for bit
        ``torch.optim.Adam``'s ``denom`` for ``eps`` = ``damping``."""
        check_positive("damping", damping)
        return [root.add_(damping) for root in self._root()]

    def matvec(self, v: Tensor) -> Tensor:
        self.layout.check_vector(v)
        return self.layout.flatten(self._root()) * v

    def to_dense(self) -> Tensor:
        return torch.diag(self.layout.flatten(self._root()))

    def solve(self, v: Tensor, damping: float) -> Tensor:
        r""":math:`v \oslash (\sqrt{\hat v_t} + \varepsilon)`, Adam's step for :math:`v = \bar g`
        (its first moment) with ``eps`` = ``damping``."""
        self.layout.check_vector(v)
        return v / self.layout.flatten(self.denominators(damping))

    def update(self, batch: RunningCurvature, decay: float) -> None:
        r""":math:`v \leftarrow \beta_2 v + (1 - \beta_2)\, \bar g \odot \bar g` with the batch's
        gradient, as ``torch.optim.Adam`` (``decay`` must be :math:`\beta_2`)."""
        if (
            not isinstance(batch, AdamPreconditioner)
            or batch.gradient is None
            or batch.settings() != self.settings()
        ):
            raise ValueError(
                "update needs a batch estimate of Adam's preconditioner (with its gradient) "
                "of the same model and settings."
            )
        if decay != self.beta2:
            raise ValueError(
                f"Adam's second moment decays with beta2={self.beta2}; update got "
                f"decay={decay}. Pass ema_decay=beta2."
            )
        for v, g in zip(self.second_moment, batch.gradient):
            v.mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
        self.steps += 1

    def refresh(self, damping: float) -> None:
        """Nothing to decompose: records the damping (Adam's ``eps``)."""
        check_positive("damping", damping)
        self._damping = damping

    @property
    def damping(self) -> float | None:
        return self._damping

    @property
    def memory_bytes(self) -> int:
        return self.layout.numel * torch.empty((), dtype=self.dtype).element_size()

    @property
    def flops(self) -> Flops:
        """Three per parameter to average in a gradient, two (root, scale) to refresh, two
        (add, divide) per solve."""
        p = self.layout.numel
        return Flops(update=3 * p, refresh=2 * p, solve=2 * p)

    def settings(self) -> dict[str, Any]:
        return {
            "curvature": type(self).__name__,
            "kind": self.kind,
            "beta2": self.beta2,
            "bias_correction": self.bias_correction,
            "parameters": [(n, tuple(s)) for n, s in zip(self.layout.names, self.layout.shapes)],
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings(),
            "second_moment": [v.clone() for v in self.second_moment],
            "steps": self.steps,
            "damping": self._damping,
        }

    @classmethod
    def from_state_dict(
        cls, model: nn.Module, loss_fn: nn.Module, state: dict[str, Any]
    ) -> AdamPreconditioner:
        settings = state["settings"]
        moment = [v.clone() for v in state["second_moment"]]
        out = cls(
            ParamLayout.of(model),
            moment,
            state["steps"],
            settings["beta2"],
            settings["bias_correction"],
            settings["kind"],
        )
        if out.settings() != settings:
            raise ValueError(
                f"the saved Adam state has settings {settings}; this model needs {out.settings()}."
            )
        out._damping = state["damping"]
        return out


def minibatch_second_moment(
    model: nn.Module,
    loss_fn: nn.Module,
    X: Tensor,
    y: Tensor,
    batch_size: int,
    *,
    kind: FisherKind = "empirical",
    epochs: int = 1,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""The mean of :math:`\bar g_b \odot \bar g_b` over the mini-batches :math:`b` of
    ``epochs`` shuffled passes (the last incomplete batch of each pass dropped), at fixed
    weights, flat: what Adam's :math:`\hat v_t` averages as :math:`\beta_2 \to 1` if the
    weights did not move. ``kind="empirical"`` takes the data's labels; ``"mc"`` draws each
    example's label from the model, and then
    :math:`\mathbb E\,[\bar g_b \odot \bar g_b] = \mathrm{diag}\,F / B` exactly, because
    sampled gradients have mean zero (so the mini-batch alone changes only the scale).

    Raises:
        ValueError: for a bad ``batch_size`` or ``epochs``, or ``kind="exact"``.
    """
    check_positive_int("batch_size", batch_size)
    check_positive_int("epochs", epochs)
    n = X.shape[0]
    if batch_size > n:
        raise ValueError(f"batch_size {batch_size} exceeds the {n} examples.")
    total, batches = None, 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator).to(X.device)
        for start in range(0, n - batch_size + 1, batch_size):
            index = order[start : start + batch_size]
            g = minibatch_gradient(model, loss_fn, X[index], y[index], kind, generator)
            total = g * g if total is None else total.addcmul_(g, g)
            batches += 1
    return total / batches


#: The diagonals of :func:`adam_differences`, each one change away from the diagonal Fisher
#: (Adam makes all three).
DIFFERENCES = (
    "diagonal Fisher",
    "data labels",
    "mini-batch squares",
    "power -1/2",
    "Adam",
)


def adam_differences(
    model: nn.Module,
    loss_fn: nn.Module,
    X: Tensor,
    y: Tensor,
    batch_size: int,
    *,
    epochs: int = 1,
    generator: torch.Generator | None = None,
) -> dict[str, tuple[Tensor, float]]:
    r"""Adam's preconditioner and the diagonal Fisher, and the three ways they differ taken
    one at a time, as ``{name: (diagonal, power)}`` for the curvature
    :math:`\mathrm{diagonal}^{\,\mathrm{power}}` (keys :data:`DIFFERENCES`):

    - ``"diagonal Fisher"``: :math:`\mathrm{diag}\,F` (per-example, the model's labels in
      expectation), power 1;
    - ``"data labels"``: :math:`\mathrm{diag}\,F_\text{emp}`, per-example gradients at the
      data's labels, power 1;
    - ``"mini-batch squares"``: :func:`minibatch_second_moment` with labels drawn from the
      model, power 1;
    - ``"power -1/2"``: :math:`\mathrm{diag}\,F`, power :math:`\tfrac12` (so the step divides
      by its square root);
    - ``"Adam"``: :func:`minibatch_second_moment` at the data's labels, power
      :math:`\tfrac12`.
    """
    fisher = DiagonalFisher.from_batch(model, loss_fn, X, y).diagonal
    empirical = DiagonalFisher.from_batch(model, loss_fn, X, y, kind="empirical").diagonal
    options = dict(epochs=epochs, generator=generator)
    sampled = minibatch_second_moment(model, loss_fn, X, y, batch_size, kind="mc", **options)
    squares = minibatch_second_moment(model, loss_fn, X, y, batch_size, **options)
    return {
        "diagonal Fisher": (fisher, 1.0),
        "data labels": (empirical, 1.0),
        "mini-batch squares": (sampled, 1.0),
        "power -1/2": (fisher, 0.5),
        "Adam": (squares, 0.5),
    }


def diagonal_direction(
    gradient: Tensor, diagonal: Tensor, power: float, damping: float, mean: float
) -> Tensor:
    r""":math:`g \oslash (\kappa c + \lambda)` with :math:`c = \mathrm{diagonal}^{\,p}` rescaled
    by :math:`\kappa = \mathrm{mean} / \bar c` to the given mean, so that one damping
    :math:`\lambda` means the same for curvatures of different scales and powers."""
    check_positive("damping", damping)
    check_positive("mean", mean)
    c = diagonal**power
    return gradient / (c * (mean / c.mean()) + damping)
