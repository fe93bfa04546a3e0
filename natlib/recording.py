r"""Recording a training loop's forward pass for Kronecker-factored curvature.

:class:`FactorWatcher` hooks a model's ``nn.Linear`` and ``nn.Conv2d`` layers
(:class:`natlib.factors.Recorder`) and keeps, for each recorded pass, the input factors
:math:`A_l = \frac1N \sum_n \bar a_n \bar a_n^\top` and the output-gradient factors
:math:`G_l = \sum_{nk} g_{nk} g_{nk}^\top` (Martens & Grosse, 2015, §3), with the per-position
inputs and gradients they come from. K-FAC's and EK-FAC's watchers
(:class:`natlib.kfac.KFACWatcher`, :class:`natlib.ekfac.EKFACWatcher`) turn these statistics
into their estimates.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from natlib.checks import check_choice, check_positive_int
from natlib.factors import Approximation, Recorder, factors_of, raw_cotangents
from natlib.interface import Watcher
from natlib.layout import LinearLayer, ParamLayout, Unsupported
from natlib.linalg import DampingMode
from natlib.losses import FisherKind, likelihood


class FactorWatcher(Watcher):
    """Records a training loop's forward pass: the statistics of Kronecker-factored estimates.

    ``kind="mc"``/``"exact"``: one extra backward pass of sampled or factored output cotangents
    right after the forward pass; ``"empirical"``: the layers' output gradients of the loss's
    own ``backward()``, divided by the reduction factor. Subclasses implement
    ``estimate`` from the statistics of ``_take``.

    Raises:
        ValueError: for an unknown ``kind``, ``damping_mode`` or ``approximation``, a
            non-positive ``mc_samples``, or a model or loss K-FAC does not support.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        kind: FisherKind,
        mc_samples: int,
        generator: torch.Generator | None,
        damping_mode: DampingMode,
        approximation: Approximation,
        unsupported: Unsupported,
    ) -> None:
        check_choice("Fisher kind", kind, FisherKind)
        check_choice("damping mode", damping_mode, DampingMode)
        check_choice("approximation", approximation, Approximation)
        check_positive_int("mc_samples", mc_samples)
        self.layout = ParamLayout.of(model, kronecker=True, unsupported=unsupported)
        self.likelihood = likelihood(loss_fn)
        self.kind, self.mc_samples, self.generator = kind, mc_samples, generator
        self.damping_mode = damping_mode
        layers = [b for b in self.layout.blocks if isinstance(b, LinearLayer)]
        self.recorder = Recorder(layers, approximation)
        self._pending: dict[str, Any] | None = None

    def start(self, inputs: tuple) -> None:
        self.recorder.start()

    def finish(self, output: Tensor) -> None:
        recorder = self.recorder
        if not recorder.active:
            return
        recorder.stop()
        f = self.likelihood.output_matrix(output).detach()
        # The layers' input positions "a" ((N, R, d_in)) and output gradients "g"
        # ((K, N, R, d_out), times sqrt(scale)) stay for estimates that need per-example
        # statistics (EK-FAC); "rows" is the number of output rows the loss sees.
        pending: dict[str, Any] = {
            "A": recorder.input_factors(),
            "G": {},
            "N": next(iter(recorder.inputs.values())).shape[0],
            "R": recorder.positions(),
            "rows": f.shape[0],
            "a": recorder.inputs,
            "g": {},
            "scale": 1.0,
        }
        if self.kind == "empirical":
            # G from the loss's own backward: its output gradient is r * grad l, so divide by r.
            r = self.likelihood.scale(f)
            for layer in self.recorder.layers:
                recorder.outputs[layer.name].register_hook(
                    _keep_gradient(recorder, layer, r, pending)
                )
            pending["K"], pending["scale"] = 1, r
        else:
            cotangents = raw_cotangents(
                self.likelihood, output, self.kind, None, self.mc_samples, self.generator
            )
            grads = recorder.output_gradients(output, cotangents, retain_graph=True)
            pending["G"] = factors_of(recorder.layers, grads, recorder.approximation)
            pending["g"] = grads
            pending["K"] = cotangents.shape[0]
        recorder.outputs = {}
        self._pending = pending

    def _take(self) -> dict[str, Any]:
        """The recorded statistics, once."""
        pending, self._pending = self._pending, None
        if pending is None:
            raise RuntimeError(
                "no forward pass was recorded for this factor update; run the model on the "
                "batch with gradients enabled (and backward the loss) before step()."
            )
        return pending

    def remove(self) -> None:
        self.recorder.remove()


def _keep_gradient(recorder: Recorder, layer: LinearLayer, r: float, pending: dict[str, Any]):
    def hook(grad: Tensor) -> None:
        g = recorder.gradient_positions(layer, grad.detach(), 1, pending["R"])
        pending["G"][layer.name] = factors_of([layer], {layer.name: g}, recorder.approximation)[
            layer.name
        ].div_(r)
        pending["g"][layer.name] = g

    return hook
