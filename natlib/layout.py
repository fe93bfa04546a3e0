r"""One parameter layout: flat vector, per-parameter tensors, per-module blocks, ``[W | b]``.

Every dense ``(P, P)`` matrix and flat vector in natlib is indexed like
``parameters_to_vector(model.parameters())``: parameters in registration order, each
flattened row-major. A :class:`ParamLayout` records that order once, and converts between

- the flat vector (``(P,)``),
- the per-parameter tensors (``split`` / ``flatten``),
- the blocks of the parameters each module owns (``blocks``, ``block_diagonal``),
- and, for the layers K-FAC supports, the ``(d_out, d_in + 1)`` matrix :math:`[W \mid b]`
  (:class:`LinearLayer` for ``nn.Linear``, :class:`Conv2dLayer` for ``nn.Conv2d``, whose
  ``(C_out, C_in, k_h, k_w)`` weight flattens row-major to ``(C_out, C_in k_h k_w)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from natlib.checks import check_choice


@dataclass(frozen=True)
class Block:
    """The parameters one module owns, at ``start:stop`` of the flat vector."""

    name: str
    module: nn.Module = field(repr=False, compare=False)
    start: int
    stop: int

    @property
    def numel(self) -> int:
        return self.stop - self.start

    @property
    def slice(self) -> slice:
        return slice(self.start, self.stop)


@dataclass(frozen=True)
class LinearLayer(Block):
    """An ``nn.Linear`` block, whose gradient is the matrix :math:`[dW \\mid db]`."""

    d_in: int = 0
    d_out: int = 0
    bias: bool = False

    @property
    def d_a(self) -> int:
        """The size of the input factor, :math:`d_\\text{in}` plus one with a bias."""
        return self.d_in + int(self.bias)

    def join(self, weight: Tensor, bias: Tensor | None) -> Tensor:
        """The ``(d_out, d_a)`` matrix :math:`[W \\mid b]` of a weight-shaped and bias pair."""
        return weight if bias is None else torch.cat([weight, bias.unsqueeze(-1)], dim=-1)

    def split(self, matrix: Tensor) -> list[Tensor]:
        """Inverse of :meth:`join`: ``[weight]`` or ``[weight, bias]``."""
        if not self.bias:
            return [matrix]
        return [matrix[..., : self.d_in], matrix[..., self.d_in]]

    def matrix(self, v: Tensor) -> Tensor:
        """This layer's part of a flat vector ``v`` as :math:`[W \\mid b]`."""
        part = v[self.slice]
        weight = part[: self.d_out * self.d_in].view(self.d_out, self.d_in)
        return self.join(weight, part[self.d_out * self.d_in :] if self.bias else None)

    def flat(self, matrix: Tensor) -> Tensor:
        """Inverse of :meth:`matrix`: ``[W | b]`` back to this layer's flat part."""
        return torch.cat([p.flatten() for p in self.split(matrix)])

    def permutation(self, device: torch.device | None = None) -> Tensor:
        """Indices into row-major :math:`\\mathrm{vec}([W \\mid b])` in parameter order
        (weight row-major, then bias)."""
        index = torch.arange(self.numel, device=device).view(self.d_out, self.d_a)
        if not self.bias:
            return index.flatten()
        return torch.cat([index[:, : self.d_in].flatten(), index[:, self.d_in]])


@dataclass(frozen=True)
class Conv2dLayer(LinearLayer):
    """An ``nn.Conv2d`` block (``groups=1``): a linear layer on its input patches of size
    :math:`d_\text{in} = C_\text{in} k_h k_w`, with the geometry ``torch.nn.functional.unfold``
    needs to cut them."""

    kernel_size: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    stride: tuple[int, int] = (1, 1)


Unsupported = Literal["error", "gradient"]
#: What the Kronecker-factored methods support, as their error messages name it.
KRONECKER_LAYERS = (
    "nn.Linear (inputs (N, ..., d_in)) and nn.Conv2d (groups=1, integer zero padding)"
)


def _kronecker_layer(label: str, module: nn.Module, start: int, stop: int) -> LinearLayer | str:
    """The K-FAC block of ``module``, or why K-FAC does not support it."""
    bias = getattr(module, "bias", None) is not None
    if type(module) is nn.Linear:
        return LinearLayer(
            label, module, start, stop, module.in_features, module.out_features, bias
        )
    if type(module) is not nn.Conv2d:
        return type(module).__name__
    if module.groups != 1:
        return f"Conv2d with groups={module.groups}"
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        return f"Conv2d with padding={module.padding!r}, padding_mode={module.padding_mode!r}"
    kh, kw = module.kernel_size
    return Conv2dLayer(
        label,
        module,
        start,
        stop,
        module.in_channels * kh * kw,
        module.out_channels,
        bias,
        module.kernel_size,
        module.dilation,
        module.padding,
        module.stride,
    )


@dataclass(frozen=True)
class ParamLayout:
    """Where every parameter of a model sits in the flat vector, grouped by module.

    Build it with :meth:`of`. ``blocks`` lists the modules that own parameters, in parameter
    order.
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    blocks: tuple[Block, ...]

    @classmethod
    def of(
        cls, model: nn.Module, kronecker: bool = False, unsupported: Unsupported = "error"
    ) -> ParamLayout:
        """The layout of ``model.parameters()``.

        Args:
            kronecker: the blocks of the layers K-FAC supports (:data:`KRONECKER_LAYERS`)
                are :class:`LinearLayer` or :class:`Conv2dLayer`.
            unsupported: with ``kronecker``, what to do with any other module that owns
                parameters (LayerNorm, Embedding, BatchNorm, ...): ``"error"``, or
                ``"gradient"`` to keep it as a plain :class:`Block`.

        Raises:
            ValueError: if the model has no parameters, a parameter is frozen or shared
                between modules (tied weights), or (``kronecker`` with ``unsupported="error"``)
                a module with parameters is not supported; the message names its path and type.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        check_choice("unsupported", unsupported, Unsupported)
        names, shapes, blocks, owners = [], [], [], {}
        start = 0
        for module_name, module in model.named_modules():
            own = list(module.named_parameters(recurse=False))
            if not own:
                continue
            label = module_name or "<root>"
            for name, p in own:
                full = f"{module_name}.{name}" if module_name else name
                if id(p) in owners:
                    raise ValueError(
                        f"parameter {full!r} is the same tensor as {owners[id(p)]!r} (tied "
                        "weights); natlib's curvature is defined per parameter, so untie them."
                    )
                if not p.requires_grad:
                    raise ValueError(
                        f"parameter {full!r} does not require grad; curvature is defined over "
                        "all parameters, so set requires_grad=True or wrap the trainable part "
                        "in its own module."
                    )
                owners[id(p)] = full
                names.append(full)
                shapes.append(p.shape)
            stop = start + sum(p.numel() for _, p in own)
            block = _kronecker_layer(label, module, start, stop) if kronecker else None
            if isinstance(block, str) and unsupported == "error":
                raise ValueError(
                    f"layer {label!r} ({block}) has parameters, but the Kronecker-factored "
                    f"methods here (K-FAC, EK-FAC, Shampoo) support only {KRONECKER_LAYERS}; "
                    "pass unsupported='gradient' to train the parameters of other layers by "
                    "plain gradient steps (K-FAC only)."
                )
            blocks.append(
                block if isinstance(block, LinearLayer) else Block(label, module, start, stop)
            )
            start = stop
        if not blocks:
            raise ValueError("the model has no parameters.")
        if [id(p) for p in model.parameters()] != list(owners):
            raise ValueError(
                "the model's parameters() order differs from its modules' order; natlib "
                "needs parameters registered module by module."
            )
        return cls(tuple(names), tuple(shapes), tuple(blocks))

    @property
    def numel(self) -> int:
        """P, the number of parameters."""
        return self.blocks[-1].stop

    @property
    def sizes(self) -> list[int]:
        return [s.numel() for s in self.shapes]

    def check_vector(self, v: Tensor, name: str = "v") -> None:
        """Raise ``ValueError`` unless ``v`` is a tensor of shape ``(P,)``."""
        if not isinstance(v, Tensor) or v.shape != (self.numel,):
            shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise ValueError(f"{name} must be a tensor of shape ({self.numel},), got {shape}.")

    def split(self, v: Tensor) -> list[Tensor]:
        """Views of a flat vector as the per-parameter tensors."""
        self.check_vector(v)
        return [c.view(s) for c, s in zip(v.split(self.sizes), self.shapes)]

    def flatten(self, tensors: Sequence[Tensor]) -> Tensor:
        """The flat vector of per-parameter tensors (shaped like the parameters)."""
        if len(tensors) != len(self.shapes):
            raise ValueError(f"expected {len(self.shapes)} tensors, got {len(tensors)}.")
        return torch.cat([t.reshape(-1) for t in tensors])

    def block_diagonal_blocks(self, matrix: Tensor) -> list[Tensor]:
        """The diagonal blocks of a ``(P, P)`` matrix, one per module."""
        if matrix.shape != (self.numel, self.numel):
            raise ValueError(
                f"the model holds {self.numel} parameters, the matrix is {tuple(matrix.shape)}."
            )
        return [matrix[b.slice, b.slice] for b in self.blocks]

    def block_diagonal(self, matrix: Tensor) -> Tensor:
        """``matrix`` with every entry outside the per-module diagonal blocks set to zero."""
        return torch.block_diag(*self.block_diagonal_blocks(matrix))
