r"""Kronecker-factor statistics of ``nn.Linear`` layers, recorded from a forward pass.

For a layer with inputs :math:`a_n` and output gradients :math:`g_{nk}` (one per output
cotangent :math:`b_{nk}`), K-FAC's factors are
:math:`A = \frac1N \sum_n \bar a_n \bar a_n^\top` and :math:`G = \sum_{nk} g_{nk} g_{nk}^\top`
(Martens & Grosse, 2015, §3); :class:`Recorder` keeps the inputs and outputs it needs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from natlib import hooks
from natlib.layout import LinearLayer
from natlib.losses import FisherKind, Likelihood


def input_factor(a: Tensor, bias: bool) -> Tensor:
    r""":math:`A = \frac1N \sum_n \bar a_n \bar a_n^\top`, :math:`\bar a = (a, 1)` with a bias."""
    if bias:
        a = torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)
    return (a.T @ a).div_(a.shape[0])


def gradient_factor(g: Tensor) -> Tensor:
    r""":math:`G = \sum_{m} g_m g_m^\top` over the rows of ``g``."""
    return g.T @ g


class Recorder:
    """Forward hooks that keep each ``nn.Linear`` layer's input and output while active."""

    def __init__(self, layers: Sequence[LinearLayer]) -> None:
        self.layers = list(layers)
        self.inputs: dict[str, Tensor] = {}
        self.outputs: dict[str, Tensor] = {}
        self.active = False
        self._names = {id(layer.module): layer.name for layer in self.layers}
        self._handles = [hooks.register(layer.module, self, "_record") for layer in self.layers]

    def _record(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        if not self.active:
            return
        name = self._names[id(module)]
        if name in self.inputs:
            raise ValueError(
                f"layer {name!r} ran twice in one forward pass; K-FAC here supports each "
                "nn.Linear applied once."
            )
        if args[0].ndim != 2:
            raise ValueError(
                f"layer {name!r} got input of shape {tuple(args[0].shape)}; K-FAC here "
                "supports (N, d_in) inputs."
            )
        self.inputs[name] = args[0].detach()
        self.outputs[name] = output

    def start(self) -> None:
        self.inputs, self.outputs, self.active = {}, {}, True

    def stop(self) -> None:
        self.active = False
        missing = [layer.name for layer in self.layers if layer.name not in self.inputs]
        if missing:
            raise ValueError(f"layers {missing} did not run in the forward pass.")

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def input_factors(self) -> dict[str, Tensor]:
        r""":math:`A = \frac1N \sum_n \bar a_n \bar a_n^\top` for every layer."""
        return {
            layer.name: input_factor(self.inputs[layer.name], layer.bias) for layer in self.layers
        }

    def gradient_factors(
        self, output: Tensor, cotangents: Tensor, retain_graph: bool = False
    ) -> dict[str, Tensor]:
        r""":math:`G = \sum_{nk} g_{nk} g_{nk}^\top` by one backward pass of the cotangents,
        shape ``(K, *output.shape)``, to every layer's output (vectorised over k)."""
        outputs = [self.outputs[layer.name] for layer in self.layers]
        batched = cotangents.shape[0] > 1
        grads = torch.autograd.grad(
            output,
            outputs,
            cotangents if batched else cotangents[0],
            retain_graph=retain_graph,
            is_grads_batched=batched,
            materialize_grads=True,
        )
        return {
            layer.name: gradient_factor(g.reshape(-1, layer.d_out))
            for layer, g in zip(self.layers, grads)
        }


def raw_cotangents(
    lik: Likelihood,
    raw: Tensor,
    kind: FisherKind,
    y: Tensor | None,
    mc_samples: int,
    generator: torch.Generator | None,
) -> Tensor:
    """Fisher output cotangents shaped like the model's ``raw`` output, ``(K, *raw.shape)``,
    ready to back-propagate (see :meth:`natlib.losses.Likelihood.fisher_cotangents`)."""
    output, target = lik.prepare(raw, y)
    b = lik.fisher_cotangents(output, kind, target, mc_samples, generator)
    return b.reshape(b.shape[0], *raw.shape)
