r"""Kronecker-factor statistics of linear layers with weight sharing, from a forward pass.

For a layer with inputs :math:`a_n` and output gradients :math:`g_{nk}` (one per output
cotangent :math:`b_{nk}`), K-FAC's factors are
:math:`A = \frac1N \sum_n \bar a_n \bar a_n^\top` and :math:`G = \sum_{nk} g_{nk} g_{nk}^\top`
(Martens & Grosse, 2015, §3); :class:`Recorder` keeps the inputs and outputs it needs.

A layer may share its weight over :math:`R` positions per example: an ``nn.Linear`` on inputs
``(N, ..., d_in)`` (tokens of a sequence, :math:`R` the product of the middle dimensions), or
an ``nn.Conv2d``, a linear layer on the :math:`R = L` patches that
``torch.nn.functional.unfold`` cuts (Grosse & Martens, 2016). Example :math:`n`'s weight
gradient is then :math:`\sum_r g_{nrk} \bar a_{nr}^\top`, and Eschenhagen et al. (2023, §3)
give two Kronecker approximations (``Approximation``):

- ``"expand"`` treats the :math:`NR` positions as examples:
  :math:`A = \frac{1}{NR} \sum_{nr} \bar a_{nr} \bar a_{nr}^\top`,
  :math:`G = \sum_{nrk} g_{nrk} g_{nrk}^\top`. Exact for deep linear networks with
  ``MSELoss`` that apply every layer position by position and put the loss on every position
  (the *expand* setting: a sequence model's per-token loss), as for the plain K-FAC
  (their Prop. 1); for a Conv2d it is KFC (Grosse & Martens, 2016, §3.1), whose
  :math:`\Omega = \mathbb{E}[\sum_t \bar a_t \bar a_t^\top]` sums over the locations and
  :math:`\Gamma = \frac1L \mathbb{E}[\sum_t g_t g_t^\top]` averages; here the factor
  :math:`L` sits in :math:`G` instead, which changes neither :math:`A \otimes G` nor its
  damped inverses.
- ``"reduce"`` averages the inputs and sums the output gradients over the positions first:
  :math:`\hat a_n = \frac1R \sum_r \bar a_{nr}`, :math:`\hat g_{nk} = \sum_r g_{nrk}`,
  :math:`A = \frac1N \sum_n \hat a_n \hat a_n^\top`,
  :math:`G = \sum_{nk} \hat g_{nk} \hat g_{nk}^\top`. When :math:`g_{nrk}` does not depend on
  :math:`r`, the gradient is exactly :math:`\hat g_{nk} \hat a_n^\top`; so it is exact for
  deep linear networks with ``MSELoss`` whose positions are averaged (or summed) after the
  weight-shared layers and before the loss (the *reduce* setting: a pooled classifier), and
  for one example in that setting (their Prop. 2). It costs :math:`N` rows instead of
  :math:`NR`.

With :math:`R = 1` (``nn.Linear`` on ``(N, d_in)``) both are the plain K-FAC, computed as
before from the same rows.

**Caveat: the exact kind when later layers mix positions.** A model with a loss on every
position (a language model's ``(N T, V)`` logits) has the GGN
:math:`\sum_{n} \sum_{t} J_{nt}^\top B_{nt} B_{nt}^\top J_{nt}`, one term per output
position :math:`t`. :meth:`Recorder.output_gradients` back-propagates each cotangent index
:math:`k` for all output positions in one pass, so a layer's output gradient at position
:math:`r` is :math:`g_{nrk} = \sum_t J_{nt,r}^\top b_{ntk}` and
:math:`\sum_k g_{nrk} g_{nrk}^\top` holds the products
:math:`J_{nt,r}^\top b_{ntk} b_{nt'k}^\top J_{nt',r}` of *different* output positions
:math:`t \neq t'`, which the GGN does not have. They vanish when no later layer mixes positions
(:math:`J_{nt,r} = 0` for :math:`t \neq r`: the expand setting above, where expand is exact), and
in expectation for ``kind="mc"``, whose sampled cotangents are independent across positions.
With attention and ``kind="exact"`` (:math:`b_{ntk}` the :math:`k`-th column of the loss
Hessian's square root at :math:`t`: correlated across positions) they remain: the exact kind is
then *not* the noise-free limit of the Monte-Carlo kind but a biased estimate of the
expand or reduce factor. Independently of the kind, expand drops the products of different
positions :math:`r \neq r'` of the layer itself, which the per-sequence weight gradient
:math:`\sum_r g_{nrk} \bar a_{nr}^\top` has, and reduce keeps them only as products of sums.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from natlib import hooks
from natlib.checks import check_finite
from natlib.layout import Conv2dLayer, LinearLayer
from natlib.losses import FisherKind, Likelihood

Approximation = Literal["expand", "reduce"]


def homogeneous(a: Tensor, bias: bool) -> Tensor:
    r"""The inputs :math:`\bar a = (a, 1)` with a bias, :math:`a` without: ``(..., d_A)`` from
    ``(..., d_in)`` (``(N, d_in)`` rows or ``(N, R, d_in)`` positions)."""
    return torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1) if bias else a


def input_factor(a: Tensor, bias: bool) -> Tensor:
    r""":math:`A = \frac1N \sum_n \bar a_n \bar a_n^\top`, :math:`\bar a = (a, 1)` with a bias."""
    a = homogeneous(a, bias)
    return (a.T @ a).div_(a.shape[0])


def gradient_factor(g: Tensor) -> Tensor:
    r""":math:`G = \sum_{m} g_m g_m^\top` over the rows of ``g``."""
    return g.T @ g


def input_positions(layer: LinearLayer, x: Tensor) -> Tensor:
    """A layer's input as ``(N, R, d_in)``: its patches for a Conv2d (``unfold``, channel-major
    like the flattened weight), the middle dimensions of ``(N, ..., d_in)`` for a Linear."""
    if isinstance(layer, Conv2dLayer):
        patches = nn.functional.unfold(
            x, layer.kernel_size, layer.dilation, layer.padding, layer.stride
        )
        return patches.transpose(1, 2)
    return x.reshape(x.shape[0], -1, layer.d_in)


def output_positions(layer: LinearLayer, g: Tensor, positions: int) -> Tensor:
    """A layer's output gradient, ``(..., N, *S, d_out)`` or ``(..., N, C_out, H, W)`` for a
    Conv2d, as ``(M, R, d_out)`` with ``R = positions``."""
    if isinstance(layer, Conv2dLayer):
        g = g.flatten(-2).transpose(-1, -2)
    return g.reshape(-1, positions, layer.d_out)


def shared_input_factor(a: Tensor, bias: bool, approximation: Approximation) -> Tensor:
    r""":math:`A` of inputs ``(N, R, d_in)``: over the :math:`NR` rows (``"expand"``) or the
    :math:`N` position means (``"reduce"``)."""
    rows = a.mean(1) if approximation == "reduce" else a.reshape(-1, a.shape[-1])
    return input_factor(rows, bias)


def shared_gradient_factor(g: Tensor, approximation: Approximation) -> Tensor:
    r""":math:`G` of output gradients ``(M, R, d_out)``: over all rows (``"expand"``) or the
    sums over positions (``"reduce"``)."""
    rows = g.sum(1) if approximation == "reduce" else g.reshape(-1, g.shape[-1])
    return gradient_factor(rows)


class Recorder:
    """Forward hooks that keep each layer's input positions ``(N, R, d_in)`` and output while
    active, and form the factors of ``approximation``."""

    def __init__(self, layers: Sequence[LinearLayer], approximation: Approximation) -> None:
        self.layers = list(layers)
        self.approximation = approximation
        self.inputs: dict[str, Tensor] = {}
        self.outputs: dict[str, Tensor] = {}
        self.active = False
        self._names = {id(layer.module): layer.name for layer in self.layers}
        self._layers = {layer.name: layer for layer in self.layers}
        self._handles = [hooks.register(layer.module, self, "_record") for layer in self.layers]

    def _record(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        if not self.active:
            return
        name = self._names[id(module)]
        if name in self.inputs:
            raise ValueError(
                f"layer {name!r} ran twice in one forward pass; K-FAC here supports each "
                "layer applied once."
            )
        x, conv = args[0], isinstance(module, nn.Conv2d)
        if (conv and x.ndim != 4) or x.ndim < 2:
            expected = "(N, C, H, W)" if conv else "(N, ..., d_in)"
            raise ValueError(
                f"layer {name!r} got input of shape {tuple(x.shape)}; K-FAC here supports "
                f"batched inputs {expected}."
            )
        self.inputs[name] = input_positions(self._layers[name], x.detach())
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

    def positions(self) -> dict[str, int]:
        """R, the positions each layer shares its weight over, in the recorded pass."""
        return {name: a.shape[1] for name, a in self.inputs.items()}

    def input_factors(self) -> dict[str, Tensor]:
        r""":math:`A` of every layer (:func:`shared_input_factor`)."""
        return {
            layer.name: shared_input_factor(self.inputs[layer.name], layer.bias, self.approximation)
            for layer in self.layers
        }

    def output_gradients(
        self, output: Tensor, cotangents: Tensor, retain_graph: bool = False
    ) -> dict[str, Tensor]:
        r"""The output gradients :math:`g_{nrk}`, ``(K, N, R, d_out)`` per layer (positions as
        in ``inputs``), by one backward pass of the cotangents, shape
        ``(K, *output.shape)``, vectorised over k."""
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
        positions = self.positions()
        return {
            layer.name: self.gradient_positions(layer, g, cotangents.shape[0], positions)
            for layer, g in zip(self.layers, grads)
        }

    def gradient_positions(
        self, layer: LinearLayer, g: Tensor, num_cotangents: int, positions: dict[str, int]
    ) -> Tensor:
        """``layer``'s output gradient (for ``num_cotangents`` cotangents, stacked first or
        not) as ``(K, N, R, d_out)`` (:func:`output_positions`)."""
        rows = output_positions(layer, g, positions[layer.name])
        return rows.reshape(num_cotangents, -1, *rows.shape[1:])

    def gradient_factors(
        self, output: Tensor, cotangents: Tensor, retain_graph: bool = False
    ) -> dict[str, Tensor]:
        r""":math:`G` of every layer (:func:`shared_gradient_factor`) from
        :meth:`output_gradients`."""
        grads = self.output_gradients(output, cotangents, retain_graph)
        return factors_of(self.layers, grads, self.approximation)


def factors_of(
    layers: Sequence[LinearLayer], grads: dict[str, Tensor], approximation: Approximation
) -> dict[str, Tensor]:
    r""":math:`G` (:func:`shared_gradient_factor`) of output gradients ``(K, N, R, d_out)``."""
    return {
        layer.name: shared_gradient_factor(grads[layer.name].flatten(0, 1), approximation)
        for layer in layers
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
