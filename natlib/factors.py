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
from natlib.checks import check_finite
from natlib.layout import LinearLayer
from natlib.losses import FisherKind, Likelihood


def homogeneous(a: Tensor, bias: bool) -> Tensor:
    r"""The inputs :math:`\bar a_n = (a_n, 1)` with a bias, :math:`a_n` without, ``(N, d_A)``."""
    return torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1) if bias else a


def input_factor(a: Tensor, bias: bool) -> Tensor:
    r""":math:`A = \frac1N \sum_n \bar a_n \bar a_n^\top`, :math:`\bar a = (a, 1)` with a bias."""
    a = homogeneous(a, bias)
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

    def output_gradients(
        self, output: Tensor, cotangents: Tensor, retain_graph: bool = False
    ) -> dict[str, Tensor]:
        r"""The output gradients :math:`g_{nk}`, ``(K, N, d_out)`` per layer, by one backward
        pass of the cotangents, shape ``(K, *output.shape)``, vectorised over k."""
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
            layer.name: g.reshape(cotangents.shape[0], -1, layer.d_out)
            for layer, g in zip(self.layers, grads)
        }

    def gradient_factors(
        self, output: Tensor, cotangents: Tensor, retain_graph: bool = False
    ) -> dict[str, Tensor]:
        r""":math:`G = \sum_{nk} g_{nk} g_{nk}^\top` from :meth:`output_gradients`."""
        return factors_of(self.layers, self.output_gradients(output, cotangents, retain_graph))


def factors_of(layers: Sequence[LinearLayer], grads: dict[str, Tensor]) -> dict[str, Tensor]:
    r""":math:`G = \sum_{nk} g_{nk} g_{nk}^\top` of output gradients ``(K, N, d_out)``."""
    return {
        layer.name: gradient_factor(grads[layer.name].reshape(-1, layer.d_out)) for layer in layers
    }


def average_pairs(
    running: dict[str, tuple[Tensor, Tensor]],
    batch: dict[str, tuple[Tensor, Tensor]],
    decay: float,
    what: tuple[str, str],
) -> dict[str, tuple[Tensor, Tensor]]:
    r"""Per layer, :math:`X \leftarrow \varepsilon X + (1 - \varepsilon) X_\text{batch}` for both
    tensors of a pair of factors; ``decay`` 0 takes the batch's. Returns new tensors and never
    writes into ``running``, so a failure leaves the old average intact.

    Raises:
        ValueError: if an average has NaN or Inf; ``what`` names the two tensors of a pair.
    """
    averaged = {}
    for name, pair in running.items():
        new = batch[name]
        if decay:
            new = tuple(mine.mul(decay).add_(b, alpha=1.0 - decay) for mine, b in zip(pair, new))
        for tensor, label in zip(new, what):
            check_finite(tensor, f"the running {label} of layer {name!r}")
        averaged[name] = new
    return averaged


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
