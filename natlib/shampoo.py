r"""Shampoo (Gupta, Koren & Singer, 2018) for ``nn.Linear`` and ``nn.Conv2d`` layers.

Each layer's mini-batch gradient is a matrix :math:`\bar G = [dW \mid db]`
(:math:`d_\text{out} \times d_A`; a Conv2d's ``(C_out, C_in, k_h, k_w)`` weight gradient
flattened to ``(C_out, C_in k_h k_w)`` as in :class:`natlib.layout.Conv2dLayer`, the matrix
form of Gupta et al.'s order-4 tensor with the input dimensions grouped; a Linear shared over
positions has one gradient matrix whatever its inputs' shape); Shampoo keeps its left and
right second moments

.. math:: L = \bar G \bar G^\top, \qquad R = \bar G^\top \bar G

(averaged over steps) and preconditions with their inverse fourth roots,
:math:`\bar G \mapsto L^{-1/4} \bar G R^{-1/4}`, recomputed every :math:`T_\text{inv}` steps.
As a curvature matrix that is :math:`C = L^{1/4} \otimes R^{1/4}` per layer (row-major vec, in
``parameters_to_vector`` order after :meth:`ShampooPreconditioner.to_dense`). Damping comes in
two forms:

- ``"exact"``: :math:`(C + \lambda I)^{-1}` in the factors' eigenbases, the interface's solve;
- ``"root"``: :math:`(L + \lambda I)^{-1/4} \bar G (R + \lambda I)^{-1/4}`, Gupta et al.'s
  :math:`\varepsilon` inside each root (not the inverse of :math:`C + \lambda I`).

Gupta et al. sum the moments over all steps; here they are exponential averages, as in the
implementations that followed (Anil et al., 2020; Shi et al., 2023).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from natlib import costmodel
from natlib.checks import check_choice, check_finite, check_positive, check_unit_interval
from natlib.factors import average_pairs
from natlib.gradient import GradientWatcher, check_gradient_kind, minibatch_gradient
from natlib.interface import Flops, RunningCurvature
from natlib.layout import LinearLayer, ParamLayout
from natlib.linalg import Eigen, EigenInverse, FactoredInverse, eigh
from natlib.losses import FisherKind

ShampooDamping = Literal["exact", "root"]
ROOT = 0.25  # Shampoo's power for a matrix (order-2 tensor): L^{1/4} and R^{1/4}


class ShampooPreconditioner(RunningCurvature):
    r""":math:`\mathrm{diag}_l(L_l^{1/4} \otimes R_l^{1/4})` from the gradient matrices' second
    moments.

    Attributes:
        moments: ``{layer name: (L, R)}``, ``(d_out, d_out)`` and ``(d_A, d_A)``.
        eigen: ``{layer name: (eigen of L, eigen of R)}`` at the last refresh.
    """

    def __init__(
        self,
        layout: ParamLayout,
        moments: dict[str, tuple[Tensor, Tensor]],
        kind: FisherKind = "empirical",
        damping_mode: ShampooDamping = "root",
    ) -> None:
        check_gradient_kind(kind, "Shampoo")
        check_choice("Shampoo damping mode", damping_mode, ShampooDamping)
        for name, (L, R) in moments.items():
            check_finite(L, f"the left moment of layer {name!r}")
            check_finite(R, f"the right moment of layer {name!r}")
        self.layout, self.moments = layout, moments
        self.kind, self.damping_mode = kind, damping_mode
        self.eigen: dict[str, tuple[Eigen, Eigen]] = {}
        self._inverse: dict[str, EigenInverse | FactoredInverse] = {}
        self._damping: float | None = None

    @property
    def layers(self) -> tuple[LinearLayer, ...]:
        return self.layout.blocks  # type: ignore[return-value]

    @classmethod
    def of_gradient(
        cls,
        layout: ParamLayout,
        gradient: Tensor,
        kind: FisherKind = "empirical",
        damping_mode: ShampooDamping = "root",
    ) -> ShampooPreconditioner:
        r""":math:`L = \bar G \bar G^\top`, :math:`R = \bar G^\top \bar G` of a flat gradient."""
        moments = {}
        for layer in layout.blocks:
            G = layer.matrix(gradient)
            moments[layer.name] = (G @ G.T, G.T @ G)
        return cls(layout, moments, kind, damping_mode)

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
        damping_mode: ShampooDamping = "root",
    ) -> ShampooPreconditioner:
        """The moments of the batch's mini-batch gradient (``kind`` ``"empirical"`` or
        ``"mc"``, see :func:`natlib.gradient.minibatch_gradient`).

        Raises:
            ValueError: for layers other than ``nn.Linear`` and ``nn.Conv2d``
                (:data:`natlib.layout.KRONECKER_LAYERS`), ``kind="exact"``, or a bad mode.
        """
        layout = ParamLayout.of(model, kronecker=True)
        g = minibatch_gradient(model, loss_fn, X, y, kind, generator)
        return cls.of_gradient(layout, g, kind, damping_mode)

    @classmethod
    def watch(
        cls,
        model: nn.Module,
        loss_fn: nn.Module,
        *,
        kind: FisherKind = "empirical",
        mc_samples: int = 1,
        generator: torch.Generator | None = None,
        damping_mode: ShampooDamping = "root",
    ) -> GradientWatcher:
        """Batch estimates from the training loop's gradient (``kind="empirical"`` only)."""
        check_choice("Shampoo damping mode", damping_mode, ShampooDamping)
        layout = ParamLayout.of(model, kronecker=True)
        return GradientWatcher(
            model,
            kind,
            lambda _, g: cls.of_gradient(layout, layout.flatten(g), kind, damping_mode),
            "Shampoo",
        )

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.moments.values()))[0].dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self.moments.values()))[0].device

    def _eigen(self, layer: LinearLayer) -> tuple[Eigen, Eigen]:
        L, R = self.moments[layer.name]
        return eigh(L, f"the left moment of {layer.name!r}"), eigh(
            R, f"the right moment of {layer.name!r}"
        )

    def roots(self, layer: LinearLayer) -> tuple[Tensor, Tensor]:
        r""":math:`L^{1/4}` and :math:`R^{1/4}` of ``layer``'s current moments."""
        return tuple(Q * e.pow(ROOT) @ Q.T for e, Q in self._eigen(layer))  # type: ignore[return-value]

    def matvec(self, v: Tensor) -> Tensor:
        r""":math:`V \mapsto L^{1/4} V R^{1/4}` layer by layer."""
        self.layout.check_vector(v)
        parts = []
        for layer in self.layers:
            L4, R4 = self.roots(layer)
            parts.append(layer.flat(L4 @ layer.matrix(v) @ R4))
        return torch.cat(parts)

    def to_dense(self) -> Tensor:
        blocks = []
        for layer in self.layers:
            L4, R4 = self.roots(layer)
            order = layer.permutation(L4.device)
            blocks.append(torch.kron(L4, R4)[order][:, order])
        return torch.block_diag(*blocks)

    def solve(self, v: Tensor, damping: float) -> Tensor:
        """The damped inverse of the last :meth:`refresh` (refreshing when there is none or the
        damping differs) applied layer by layer."""
        self.layout.check_vector(v)
        check_positive("damping", damping)
        if not self._inverse or self._damping != damping:
            self.refresh(damping)
        return torch.cat(
            [layer.flat(self._inverse[layer.name].apply(layer.matrix(v))) for layer in self.layers]
        )

    def refresh(self, damping: float) -> None:
        r"""Eigendecompose :math:`L` and :math:`R` and cache the damped inverse roots."""
        check_positive("damping", damping)
        for layer in self.layers:
            (left, QL), (right, QR) = eigen = self._eigen(layer)
            self.eigen[layer.name] = eigen
            if self.damping_mode == "exact":
                scale = 1.0 / (left.pow(ROOT).unsqueeze(1) * right.pow(ROOT).unsqueeze(0) + damping)
                self._inverse[layer.name] = EigenInverse(QL, QR, scale)
            else:
                self._inverse[layer.name] = FactoredInverse(
                    QL * (left + damping).pow(-ROOT) @ QL.T,
                    QR * (right + damping).pow(-ROOT) @ QR.T,
                )
        self._damping = damping

    @property
    def damping(self) -> float | None:
        return self._damping

    def update(self, batch: RunningCurvature, decay: float) -> None:
        r""":math:`L \leftarrow \varepsilon L + (1 - \varepsilon) L_\text{batch}`, likewise
        :math:`R`; the cached inverse roots stay until the next :meth:`refresh`."""
        if not isinstance(batch, ShampooPreconditioner) or batch.settings() != self.settings():
            raise ValueError("update needs a Shampoo estimate of the same model and settings.")
        check_unit_interval("ema_decay", decay)
        self.moments = average_pairs(
            self.moments, batch.moments, decay, ("left moment", "right moment")
        )

    @property
    def memory_bytes(self) -> int:
        """Moments plus the cached inverse roots (or eigenbases and scale)."""
        numel = sum(L.numel() + R.numel() for L, R in self.moments.values())
        for inverse in self._inverse.values():
            numel += sum(t.numel() for t in vars(inverse).values())
        return numel * torch.empty((), dtype=self.dtype).element_size()

    @property
    def flops(self) -> Flops:
        r"""Per layer, :math:`2 d_G d_A (d_G + d_A)` to form :math:`L, R`; the K-FAC-like
        refresh and solve counts of :mod:`natlib.costmodel` (``"root"`` as ``"pi"``)."""
        refresh, solve = costmodel.kronecker_layers_flops(
            [(layer.d_a, layer.d_out) for layer in self.layers],
            "exact" if self.damping_mode == "exact" else "pi",
        )
        update = sum(
            2 * layer.d_out * layer.d_a * (layer.d_out + layer.d_a) for layer in self.layers
        )
        return Flops(update=update, refresh=refresh, solve=solve)

    def settings(self) -> dict[str, Any]:
        return {
            "curvature": type(self).__name__,
            "kind": self.kind,
            "damping_mode": self.damping_mode,
            "layers": [(layer.name, layer.d_out, layer.d_a) for layer in self.layers],
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings(),
            "moments": {name: (L.clone(), R.clone()) for name, (L, R) in self.moments.items()},
            "damping": self._damping,
        }

    @classmethod
    def from_state_dict(
        cls, model: nn.Module, loss_fn: nn.Module, state: dict[str, Any]
    ) -> ShampooPreconditioner:
        settings = state["settings"]
        moments = {name: (L.clone(), R.clone()) for name, (L, R) in state["moments"].items()}
        out = cls(
            ParamLayout.of(model, kronecker=True),
            moments,
            settings["kind"],
            settings["damping_mode"],
        )
        if out.settings() != settings:
            raise ValueError(
                f"the saved Shampoo state has settings {settings}, not {out.settings()}."
            )
        if state["damping"] is not None:
            out.refresh(state["damping"])
        return out
