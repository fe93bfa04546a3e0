r"""The mini-batch gradient as a curvature statistic, for the methods built on it (Adam's
preconditioner, Shampoo), from a batch or from a training loop's own backward pass.

Unlike the Fisher of :mod:`natlib.approximations`, these methods see only the gradient of the
mini-batch loss :math:`\bar g = \nabla_\theta L = r \sum_n g_n`, never per-example gradients.
Its labels are the data's (``kind="empirical"``) or, for comparison, one draw from the model
(``kind="mc"``); ``"exact"`` has no mini-batch gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from natlib import curvature
from natlib.checks import check_choice, check_finite
from natlib.interface import RunningCurvature, Watcher
from natlib.layout import ParamLayout
from natlib.losses import FisherKind, likelihood

GradientKind = Literal["empirical", "mc"]  # the Fisher kinds with a mini-batch gradient


def check_gradient_kind(kind: FisherKind, what: str) -> None:
    """``kind`` names labels a mini-batch gradient can use; the error names ``what``."""
    if kind not in get_args(GradientKind):
        raise ValueError(
            f"{what} uses the mini-batch gradient, so kind {kind!r} is not supported; use "
            "'empirical' (data labels) or 'mc' (labels drawn from the model)."
        )


def minibatch_gradient(
    model: nn.Module,
    loss_fn: nn.Module,
    X: Tensor,
    y: Tensor | None,
    kind: FisherKind,
    generator: torch.Generator | None = None,
) -> Tensor:
    r""":math:`\nabla_\theta L` at the data labels ``y`` (``"empirical"``) or at labels drawn
    once per example from the model's predictive distribution (``"mc"``), flat.

    Raises:
        ValueError: for ``kind="exact"`` or an unknown kind, or missing labels.
    """
    check_choice("Fisher kind", kind, FisherKind)
    check_gradient_kind(kind, "this method")
    if kind == "mc":
        lik = likelihood(loss_fn)
        with torch.no_grad():
            raw = model(X)
        output, _ = lik.prepare(raw, None)
        y = lik.sample(output, 1, generator)[0]
        y = y if not y.is_floating_point() else y.reshape(raw.shape)
    elif y is None:
        raise ValueError("the mini-batch gradient at the data labels needs y.")
    return curvature.flat_gradient(model, loss_fn, X, y)


class GradientWatcher(Watcher):
    """Reads the gradient that a training loop's ``loss.backward()`` left in the parameters'
    ``.grad`` and builds a batch estimate from it with ``build(layout, per-parameter grads)``.
    Only ``kind="empirical"``: the loop's labels are the data's."""

    def __init__(
        self,
        model: nn.Module,
        kind: FisherKind,
        build: Callable[[ParamLayout, list[Tensor]], RunningCurvature],
        what: str,
    ) -> None:
        check_choice("Fisher kind", kind, FisherKind)
        if kind != "empirical":
            raise ValueError(
                f"{what} trains on the gradient of the loop's own loss, so kind must be "
                f"'empirical', got {kind!r}."
            )
        self.layout = ParamLayout.of(model)
        self.parameters = list(model.parameters())
        self.build = build
        self._recorded = False

    def start(self, inputs: tuple) -> None:
        self._recorded = False

    def finish(self, output: Tensor) -> None:
        self._recorded = True

    def estimate(self) -> RunningCurvature:
        grads = []
        for name, p in zip(self.layout.names, self.parameters):
            if not self._recorded or p.grad is None:
                raise RuntimeError(
                    f"parameter {name!r} has no gradient of a recorded forward pass; run the "
                    "model and loss.backward() before step()."
                )
            check_finite(p.grad, f"the gradient of parameter {name!r}")
            grads.append(p.grad.detach().clone())
        self._recorded = False
        return self.build(self.layout, grads)

    def remove(self) -> None:
        self._recorded = False
