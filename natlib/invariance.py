r"""K-FAC's invariance to affine maps of each layer's inputs and outputs, measured.

Martens & Grosse (2015, §10) show that undamped K-FAC takes the same step in function space
when every linear layer :math:`s = W a + b` is replaced by
:math:`s = \Phi\,(W^\dagger (M a + c) + b^\dagger)` with fixed invertible :math:`M, \Phi`
and a fixed shift :math:`c`: the input factor becomes :math:`\Omega A \Omega^\top` with
:math:`\Omega = \begin{pmatrix} M & c \\ 0 & 1 \end{pmatrix}` and the output factor
:math:`\Phi^\top G \Phi`, and their inverses undo the maps. Damping :math:`A + \lambda I`
breaks this, because :math:`\lambda I` is not transformed. :func:`transformed` builds the
transformed network with the same function; :func:`step_discrepancy` compares one K-FAC
step (or the gradient step) taken in both, mapped back to the original weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from natlib import curvature
from natlib.checks import check_non_negative
from natlib.coordinates import haar_orthogonal, log_uniform
from natlib.kfac import KFACApproximation
from natlib.losses import likelihood
from natlib.reparam import outputs


class FixedAffine(nn.Module):
    """:math:`x \\mapsto x M^\\top + c` with fixed (buffer) ``M`` and ``c``: no parameters."""

    def __init__(self, M: Tensor, c: Tensor) -> None:
        super().__init__()
        self.register_buffer("M", M)
        self.register_buffer("c", c)

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.M.T + self.c


@dataclass(frozen=True)
class LayerMaps:
    """The maps of one layer: input :math:`a \\mapsto M a + c`, output :math:`\\Phi`."""

    M: Tensor
    c: Tensor
    Phi: Tensor


def _random_matrix(size: int, spread: float, generator: torch.Generator, like: Tensor) -> Tensor:
    s = log_uniform(size, spread, generator, like.dtype)
    U, V = (haar_orthogonal(size, generator, like.dtype) for _ in range(2))
    return (U * s @ V.T).to(like.device)


def transformed(
    model: nn.Sequential, spread: float = 1.0, seed: int = 0
) -> tuple[nn.Sequential, list[LayerMaps]]:
    """The same function with every ``nn.Linear`` wrapped in random affine maps.

    Each linear layer becomes ``FixedAffine(M, c)``, ``Linear(W†, b†)``, ``FixedAffine(Φ, 0)``
    with :math:`W^\\dagger = \\Phi^{-1} W M^{-1}` and
    :math:`b^\\dagger = \\Phi^{-1} b - W^\\dagger c`; :math:`M, \\Phi` have singular values
    :math:`e^u`, :math:`u \\sim \\mathcal{U}[-\\text{spread}, \\text{spread}]`, and
    :math:`c \\sim \\mathcal{N}(0, I)`.

    Raises:
        ValueError: if ``model`` is not an ``nn.Sequential`` or a linear layer has no bias.
    """
    if not isinstance(model, nn.Sequential):
        raise ValueError(f"transformed needs an nn.Sequential, got {type(model).__name__}.")
    check_non_negative("spread", spread)
    generator = torch.Generator().manual_seed(seed)
    modules, maps = [], []
    for module in model:
        if not isinstance(module, nn.Linear):
            modules.append(module)
            continue
        if module.bias is None:
            raise ValueError("transformed needs linear layers with a bias (the shift c).")
        W, b = module.weight.detach(), module.bias.detach()
        M = _random_matrix(W.shape[1], spread, generator, W)
        Phi = _random_matrix(W.shape[0], spread, generator, W)
        c = torch.randn(W.shape[1], generator=generator, dtype=W.dtype).to(W.device)
        W_dagger = torch.linalg.solve(Phi, W) @ torch.linalg.inv(M)
        b_dagger = torch.linalg.solve(Phi, b) - W_dagger @ c
        linear = nn.Linear(W.shape[1], W.shape[0]).to(device=W.device, dtype=W.dtype)
        with torch.no_grad():
            linear.weight.copy_(W_dagger)
            linear.bias.copy_(b_dagger)
        modules += [FixedAffine(M, c), linear, FixedAffine(Phi, torch.zeros_like(b))]
        maps.append(LayerMaps(M, c, Phi))
    return nn.Sequential(*modules), maps


def to_original(maps: list[LayerMaps], step: Tensor) -> Tensor:
    """A flat step of the transformed network's :math:`(W^\\dagger, b^\\dagger)` as a step of
    the original weights: :math:`\\Delta W = \\Phi\\,\\Delta W^\\dagger M`,
    :math:`\\Delta b = \\Phi\\,(\\Delta b^\\dagger + \\Delta W^\\dagger c)` (linear in the
    step, so it maps a displacement exactly)."""
    size = sum(m.Phi.shape[0] * (m.M.shape[0] + 1) for m in maps)
    if step.shape != (size,):
        raise ValueError(f"step has {step.numel()} entries; the maps cover {size}.")
    parts, start = [], 0
    for m in maps:
        d_out, d_in = m.Phi.shape[0], m.M.shape[0]
        dW = step[start : start + d_out * d_in].view(d_out, d_in)
        db = step[start + d_out * d_in : start + d_out * (d_in + 1)]
        start += d_out * (d_in + 1)
        parts += [(m.Phi @ dW @ m.M).flatten(), m.Phi @ (db + dW @ m.c)]
    return torch.cat(parts)


def step_discrepancy(
    model: nn.Sequential,
    loss_fn: nn.Module,
    X: Tensor,
    y: Tensor,
    damping: float | None,
    damping_mode: str = "exact",
    spread: float = 1.0,
    seed: int = 0,
) -> float:
    r"""How differently one step moves the predictions when taken in the transformed network:
    :math:`\lVert J(T d^\dagger - d)\rVert / \lVert J d\rVert`, where :math:`d` is the
    step direction in the original network, :math:`d^\dagger` the one in
    :func:`transformed` mapped back by :func:`to_original` (:math:`T`), and :math:`J` the
    Jacobian of the predictions on ``X`` (class probabilities for cross-entropy). Measured in
    function space because a singular factor leaves the step's null-space part, which moves
    no prediction, arbitrary. ``damping=None`` compares the gradient itself (gradient
    descent); otherwise :math:`d` is the K-FAC direction with type-2 factors of the batch,
    damped by ``damping`` in ``damping_mode``."""
    other, maps = transformed(model, spread, seed)

    def direction(net: nn.Module) -> Tensor:
        g = curvature.flat_gradient(net, loss_fn, X, y)
        if damping is None:
            return g
        kfac = KFACApproximation.from_batch(net, loss_fn, X, y, damping_mode=damping_mode)
        return kfac.solve(g, damping)

    d, d_dagger = direction(model), to_original(maps, direction(other))
    predict = likelihood(loss_fn).predictive_mean
    theta = nn.utils.parameters_to_vector(model.parameters()).detach()
    with torch.no_grad():
        moved = [
            torch.func.jvp(lambda t: predict(outputs(model, t, X)), (theta,), (v,))[1]
            for v in (d, d_dagger)
        ]
    return ((moved[1] - moved[0]).norm() / moved[0].norm()).item()
