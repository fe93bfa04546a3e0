r"""Kronecker-factored approximate curvature (K-FAC) for ``nn.Linear`` and ``nn.Conv2d`` layers.

A linear layer :math:`s = W a + b` (weight :math:`d_\text{out} \times d_\text{in}`) has, for
example :math:`n` and an output cotangent :math:`k`, the weight gradient
:math:`g_{nk} \bar a_n^\top`, where :math:`\bar a = (a, 1)` appends the homogeneous coordinate
for the bias and :math:`g = \partial (b^\top f) / \partial s` back-propagates an output
cotangent :math:`b`. The layer's Fisher block is therefore
:math:`\sum_{nk} \bar a_n \bar a_n^\top \otimes g_{nk} g_{nk}^\top` (column-major vec), and
K-FAC replaces it by :math:`A \otimes G` with

.. math:: A = \tfrac1N \sum_n \bar a_n \bar a_n^\top, \qquad G = \sum_{nk} g_{nk} g_{nk}^\top

(Martens & Grosse, 2015, §3). The cotangents carry the loss's reduction factor, so that
:math:`A \otimes G` equals the exact block for a batch of one example, and the exact
*diagonal* blocks for deep linear networks with ``MSELoss`` at any batch size (there
:math:`g_{nk}` does not depend on n). PyTorch flattens weights row-major, where the same block
reads :math:`G \otimes A`; :meth:`KFACApproximation.to_dense` permutes it into
``parameters_to_vector`` order.

Layers that share their weight over positions (a Linear on ``(N, T, d_in)``, a Conv2d over
its output locations) use K-FAC-expand or K-FAC-reduce (``approximation``, see
:mod:`natlib.factors` for the formulas and their exact cases). Other modules with parameters
are an error, or, with ``unsupported="gradient"``, get the identity block: their step is the
plain gradient step :math:`\eta g / (1 + \lambda)` (LayerNorm and Embedding in
:func:`natlib.language.transformer`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from natlib import costmodel
from natlib.checks import (
    check_batch,
    check_choice,
    check_finite,
    check_positive,
    check_unit_interval,
)
from natlib.factors import Approximation, Recorder, average_pairs, raw_cotangents
from natlib.interface import Flops, RunningCurvature
from natlib.layout import Block, LinearLayer, ParamLayout, Unsupported
from natlib.linalg import (
    DampingMode,
    Eigen,
    EigenInverse,
    FactoredInverse,
    KroneckerInverse,
    damped_inverse,
    eigh,
)
from natlib.losses import FisherKind, likelihood
from natlib.recording import FactorWatcher


class KFACApproximation(RunningCurvature):
    r"""The block-diagonal K-FAC approximation :math:`\mathrm{diag}_l(A_l \otimes G_l)`, with
    the identity for the blocks of unsupported modules kept by ``unsupported="gradient"``.

    Its damped inverse is cached by :meth:`refresh` in ``damping_mode`` ``"exact"``
    (:class:`natlib.linalg.EigenInverse`) or factored ``"pi"``
    (:class:`natlib.linalg.FactoredInverse`).

    Attributes:
        layout: the model's parameter layout (``ParamLayout.of(model, kronecker=True)``).
        factors: ``{layer name: (A, G)}``.
        approximation: ``"expand"`` or ``"reduce"`` (:mod:`natlib.factors`).
        batch_size, num_cotangents: N and K of the (last) batch the factors come from.
        positions: ``{layer name: R}``, the positions each layer shared its weight over.
        eigen: ``{layer name: (eigen of A, eigen of G)}`` at the last refresh.
    """

    def __init__(
        self,
        layout: ParamLayout,
        factors: dict[str, tuple[Tensor, Tensor]],
        batch_size: int,
        num_cotangents: int,
        kind: FisherKind = "exact",
        damping_mode: DampingMode = "pi",
        approximation: Approximation = "expand",
        positions: dict[str, int] | None = None,
    ) -> None:
        check_choice("Fisher kind", kind, FisherKind)
        check_choice("damping mode", damping_mode, DampingMode)
        check_choice("approximation", approximation, Approximation)
        self.layout = layout
        if not self.layers:
            raise ValueError(
                "K-FAC needs a layout with Kronecker layers: ParamLayout.of(model, kronecker=True)."
            )
        if set(factors) != {layer.name for layer in self.layers}:
            raise ValueError(
                f"K-FAC factors cover layers {sorted(factors)}, the layout has "
                f"{[layer.name for layer in self.layers]}."
            )
        for layer in self.layers:
            A, G = factors[layer.name]
            if A.shape != (layer.d_a, layer.d_a) or G.shape != (layer.d_out, layer.d_out):
                raise ValueError(
                    f"factors of layer {layer.name!r} have shapes {tuple(A.shape)} and "
                    f"{tuple(G.shape)}; the layer needs ({layer.d_a}, {layer.d_a}) and "
                    f"({layer.d_out}, {layer.d_out})."
                )
            check_finite(A, f"factor A of layer {layer.name!r}")
            check_finite(G, f"factor G of layer {layer.name!r}")
        self.factors = factors
        self.batch_size, self.num_cotangents = batch_size, num_cotangents
        self.positions = positions or {layer.name: 1 for layer in self.layers}
        self.kind, self.damping_mode, self.approximation = kind, damping_mode, approximation
        self.eigen: dict[str, tuple[Eigen, Eigen]] = {}
        self._inverse: dict[str, KroneckerInverse] = {}
        self._damping: float | None = None

    @property
    def layers(self) -> tuple[LinearLayer, ...]:
        """The Kronecker-factored blocks."""
        return tuple(b for b in self.layout.blocks if isinstance(b, LinearLayer))

    @property
    def fallback(self) -> tuple[Block, ...]:
        """The blocks of unsupported modules, whose curvature block is the identity."""
        return tuple(b for b in self.layout.blocks if not isinstance(b, LinearLayer))

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.factors.values()))[0].dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self.factors.values()))[0].device

    # ------------------------------------------------------------------ building

    @classmethod
    def from_batch(
        cls,
        model: nn.Module,
        loss_fn: nn.Module,
        X: Tensor,
        y: Tensor | None = None,
        *,
        kind: FisherKind = "exact",
        mc_samples: int = 1,
        generator: torch.Generator | None = None,
        damping_mode: DampingMode = "pi",
        approximation: Approximation = "expand",
        unsupported: Unsupported = "error",
    ) -> KFACApproximation:
        r"""K-FAC factors of every ``nn.Linear`` and ``nn.Conv2d`` layer on the batch ``X``.

        Args:
            kind: ``"exact"`` (the type-2 Fisher: exact output-space Fisher through the loss
                Hessian's square root; biased for weight-shared layers whose positions later
                layers mix, see :mod:`natlib.factors`), ``"mc"`` (``mc_samples`` targets drawn
                from the model per example, with ``generator``) or ``"empirical"`` (the data
                labels ``y``).
            damping_mode: how :meth:`solve` damps, ``"exact"`` or factored ``"pi"``.
            approximation: for weight-shared layers, ``"expand"`` or ``"reduce"``.
            unsupported: ``"error"``, or ``"gradient"`` for identity blocks on the parameters of
                modules K-FAC does not support.

        Raises:
            TypeError: if ``X`` or ``y`` is not a tensor or the model does not return one.
            ValueError: for unsupported layers, losses or ``kind``, missing labels, an empty
                batch, a dtype or device mismatch, a BatchNorm or Dropout layer in training
                mode (checked before the forward pass), or NaN/Inf in outputs or factors.
        """
        lik = likelihood(loss_fn)  # the kind is checked with the cotangents
        check_choice("approximation", approximation, Approximation)
        layout = ParamLayout.of(model, kronecker=True, unsupported=unsupported)
        check_batch(model, X, y)
        recorder = Recorder([b for b in layout.blocks if isinstance(b, LinearLayer)], approximation)
        try:
            with torch.enable_grad():
                recorder.start()
                raw = model(X)
                recorder.stop()
                cotangents = raw_cotangents(lik, raw, kind, y, mc_samples, generator)
                G = recorder.gradient_factors(raw, cotangents)
                A = recorder.input_factors()
        finally:
            recorder.remove()
        factors = {layer.name: (A[layer.name], G[layer.name]) for layer in recorder.layers}
        return cls(
            layout,
            factors,
            X.shape[0],
            cotangents.shape[0],
            kind,
            damping_mode,
            approximation,
            recorder.positions(),
        )

    @classmethod
    def watch(
        cls,
        model: nn.Module,
        loss_fn: nn.Module,
        *,
        kind: FisherKind = "exact",
        mc_samples: int = 1,
        generator: torch.Generator | None = None,
        damping_mode: DampingMode = "pi",
        approximation: Approximation = "expand",
        unsupported: Unsupported = "error",
    ) -> KFACWatcher:
        """A :class:`KFACWatcher` on ``model``."""
        return KFACWatcher(
            model, loss_fn, kind, mc_samples, generator, damping_mode, approximation, unsupported
        )

    # ------------------------------------------------------------------ the matrix

    def matvec(self, v: Tensor) -> Tensor:
        """:math:`(A \\otimes G) v` layer by layer: :math:`V \\mapsto G V A` (the identity on
        :attr:`fallback` blocks)."""
        self.layout.check_vector(v)
        parts = []
        for block in self.layout.blocks:
            if not isinstance(block, LinearLayer):
                parts.append(v[block.slice])
                continue
            A, G = self.factors[block.name]
            parts.append(block.flat(G @ block.matrix(v) @ A))
        return torch.cat(parts)

    def to_dense(self) -> Tensor:
        """The block-diagonal ``(P, P)`` matrix in ``parameters_to_vector`` order."""
        blocks = []
        for block in self.layout.blocks:
            if not isinstance(block, LinearLayer):
                blocks.append(torch.eye(block.numel, dtype=self.dtype, device=self.device))
                continue
            blocks.append(self.kronecker_block(block))
        return torch.block_diag(*blocks)

    def block_errors(self, matrix: Tensor) -> dict[str, float]:
        r"""Per Kronecker layer, :math:`\lVert A \otimes G - M_{ll} \rVert_F / \lVert M_{ll}
        \rVert_F` against the layer's diagonal block of a dense ``(P, P)`` ``matrix`` in
        parameter order (the exact GGN or Fisher)."""
        blocks = self.layout.block_diagonal_blocks(matrix)
        return {
            b.name: ((self.kronecker_block(b) - m).norm() / m.norm()).item()
            for b, m in zip(self.layout.blocks, blocks)
            if isinstance(b, LinearLayer)
        }

    def kronecker_block(self, layer: LinearLayer) -> Tensor:
        r"""``layer``'s block :math:`A \otimes G`, in parameter order."""
        A, G = self.factors[layer.name]
        order = layer.permutation(A.device)
        return torch.kron(G, A)[order][:, order]

    def solve(self, v: Tensor, damping: float) -> Tensor:
        r"""The damped inverse of the last :meth:`refresh` applied to a flat ``v``; refreshes
        first when there is none or ``damping`` differs from its damping."""
        self.layout.check_vector(v)
        self._ensure_inverse(damping)
        return torch.cat(
            [
                block.flat(self.apply_inverse(block, block.matrix(v)))
                if isinstance(block, LinearLayer)
                else v[block.slice] / (1.0 + self._damping)
                for block in self.layout.blocks
            ]
        )

    def apply_inverse(self, layer: LinearLayer, V: Tensor) -> Tensor:
        """The cached damped inverse of ``layer``'s block applied to ``V = [dW | db]``."""
        return self._inverse[layer.name].apply(V)

    def _ensure_inverse(self, damping: float) -> None:
        check_positive("damping", damping)
        if not self._inverse or self._damping != damping:
            self.refresh(damping)

    @property
    def damping(self) -> float | None:
        return self._damping

    # ------------------------------------------------------------------ running estimate

    def update(self, batch: RunningCurvature, decay: float) -> None:
        r""":math:`A \leftarrow \varepsilon A + (1-\varepsilon) A_\text{batch}`, likewise
        :math:`G`; the cached inverse stays until the next :meth:`refresh`. New factors
        replace the old ones (none is written in place), so a failure changes nothing.

        Raises:
            ValueError: if ``batch`` is not a K-FAC estimate of the same settings, ``decay``
                is outside ``[0, 1)``, or an average is not finite (naming the layer).
        """
        if not isinstance(batch, KFACApproximation) or batch.settings() != self.settings():
            raise ValueError("update needs a K-FAC estimate of the same model and settings.")
        check_unit_interval("ema_decay", decay)
        self.factors = average_pairs(self.factors, batch.factors, decay, ("factor A", "factor G"))
        self.batch_size, self.num_cotangents = batch.batch_size, batch.num_cotangents

    def refresh(self, damping: float) -> None:
        """Eigendecompose every factor (float32 retried in float64) and cache the damped
        inverses for ``damping``; on failure the previous ones stay.

        :meth:`decompose` and :meth:`install` are its two halves, which
        :class:`natlib.distributed.DistributedCommunicator` runs on different ranks.

        Raises:
            ValueError: if ``damping`` is not a positive finite number, or a factor's
                eigendecomposition fails or its damped inverse is not finite (naming the
                layer).
        """
        check_positive("damping", damping)
        self.install(self.decompose([layer.name for layer in self.layers]), damping)

    def decompose(self, names: list[str]) -> dict[str, tuple[Eigen, Eigen]]:
        """The eigendecompositions of the factors of the layers ``names`` (float32 retried in
        float64); changes nothing.

        Raises:
            ValueError: if a factor holds NaN or Inf or its decomposition fails (naming it).
        """
        return {
            name: (
                eigh(self.factors[name][0], f"factor A of layer {name!r}"),
                eigh(self.factors[name][1], f"factor G of layer {name!r}"),
            )
            for name in names
        }

    def install(self, eigens: dict[str, tuple[Eigen, Eigen]], damping: float) -> None:
        """Cache the damped inverses for ``damping`` from every layer's ``eigens``; on failure
        the previous ones stay.

        Raises:
            ValueError: if ``damping`` is not positive, or a damped inverse is not finite.
        """
        check_positive("damping", damping)
        inverses = {}
        for layer in self.layers:
            inverse = damped_inverse(*eigens[layer.name], damping, self.damping_mode)
            for tensor in vars(inverse).values():
                check_finite(tensor, f"the damped inverse of layer {layer.name!r}")
            inverses[layer.name] = inverse
        self.eigen = {layer.name: eigens[layer.name] for layer in self.layers}
        self._inverse, self._damping = inverses, damping

    # ------------------------------------------------------------------ costs

    @property
    def memory_bytes(self) -> int:
        """Factors, plus cached inverses (the same sizes, and the ``(d_G, d_A)`` scale of
        exact damping)."""
        numel = sum(A.numel() + G.numel() for A, G in self.factors.values())
        for inverse in self._inverse.values():
            numel += sum(t.numel() for t in vars(inverse).values())
        return numel * torch.empty((), dtype=self.dtype).element_size()

    @property
    def flops(self) -> Flops:
        """From :mod:`natlib.costmodel`."""
        k = self.num_cotangents
        refresh, solve = costmodel.kronecker_layers_flops(
            [(layer.d_a, layer.d_out) for layer in self.layers], self.damping_mode
        )
        update = sum(
            costmodel.kronecker_factor_flops(layer.d_a, layer.d_out, self.rows(layer), k)
            for layer in self.layers
        )
        return Flops(update=update, refresh=refresh, solve=solve)

    def step_cost(self, T_cov: int = 1, T_inv: int = 1) -> costmodel.StepCost:
        """Chapter 4's FLOP model of one optimiser step with these factors
        (:func:`natlib.costmodel.network_step_cost`): every layer maps its :math:`NR` rows,
        and the Fisher's extra backward pass carries ``num_cotangents`` per row (none for
        the empirical Fisher)."""
        layers = [(b.d_in, b.d_out, self.batch_size * self.positions[b.name]) for b in self.layers]
        cotangents = 0 if self.kind == "empirical" else self.num_cotangents
        flops = self.flops
        return costmodel.network_step_cost(
            layers, flops.update, flops.refresh, flops.solve, T_cov, T_inv, cotangents
        )

    def rows(self, layer: LinearLayer) -> int:
        """Rows of ``layer``'s input statistics: NR (``"expand"``) or N (``"reduce"``)."""
        if self.approximation == "reduce":
            return self.batch_size
        return self.batch_size * self.positions[layer.name]

    # ------------------------------------------------------------------ state

    def settings(self) -> dict[str, Any]:
        return {
            "curvature": type(self).__name__,
            "kind": self.kind,
            "damping_mode": self.damping_mode,
            "approximation": self.approximation,
            "layers": [(layer.name, layer.d_out, layer.d_a) for layer in self.layers],
            "fallback": [block.name for block in self.fallback],
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings(),
            "factors": {name: (A.clone(), G.clone()) for name, (A, G) in self.factors.items()},
            "batch": (self.batch_size, self.num_cotangents),
            "positions": dict(self.positions),
            "damping": self._damping,
            "inverse": {name: dict(vars(inv)) for name, inv in self._inverse.items()},
        }

    @classmethod
    def from_state_dict(
        cls, model: nn.Module, loss_fn: nn.Module, state: dict[str, Any]
    ) -> KFACApproximation:
        settings = state["settings"]
        unsupported = "gradient" if settings["fallback"] else "error"
        layout = ParamLayout.of(model, kronecker=True, unsupported=unsupported)
        factors = {name: (A.clone(), G.clone()) for name, (A, G) in state["factors"].items()}
        out = cls(
            layout,
            factors,
            *state["batch"],
            settings["kind"],
            settings["damping_mode"],
            settings["approximation"],
            dict(state["positions"]),
        )
        if out.settings() != settings:
            raise ValueError(
                f"the saved K-FAC state has settings {settings}, not {out.settings()}."
            )
        inverse = EigenInverse if out.damping_mode == "exact" else FactoredInverse
        out._inverse = {name: inverse(**fields) for name, fields in state["inverse"].items()}
        out._damping = state["damping"]
        return out


class KFACWatcher(FactorWatcher):
    """Records a training loop's forward pass for K-FAC (:class:`natlib.recording.FactorWatcher`)
    and turns it into a :class:`KFACApproximation`."""

    def estimate(self) -> KFACApproximation:
        return self._kfac(self._take())

    def _kfac(self, pending: dict[str, Any]) -> KFACApproximation:
        factors = {}
        for layer in self.recorder.layers:
            if layer.name not in pending["G"]:
                raise RuntimeError(
                    f"layer {layer.name!r} got no output gradient; kind='empirical' needs "
                    "loss.backward() on the recorded forward pass before step()."
                )
            factors[layer.name] = (pending["A"][layer.name], pending["G"][layer.name])
        return KFACApproximation(
            self.layout,
            factors,
            pending["N"],
            pending["K"],
            self.kind,
            self.damping_mode,
            self.recorder.approximation,
            pending["R"],
        )


def nearest_kronecker(block: Tensor, layer: LinearLayer) -> tuple[Tensor, Tensor]:
    r"""The Kronecker product closest to a layer's block in Frobenius norm.

    Returns :math:`(A, G)` minimising :math:`\lVert A \otimes G - F_l \rVert_F` (in the
    layout of :meth:`KFACApproximation.to_dense`): rearranging the entries
    :math:`F_{(i,j),(k,l)}` into :math:`R_{(i,k),(j,l)}` turns Kronecker products into
    rank-one matrices, so the leading singular pair of :math:`R` gives the optimum
    (Van Loan & Pitsianis, 1993).
    """
    order = layer.permutation(block.device)
    row_major = torch.empty_like(block)
    row_major[order[:, None], order[None, :]] = block
    d_g, d_a = layer.d_out, layer.d_a
    R = row_major.view(d_g, d_a, d_g, d_a).permute(0, 2, 1, 3).reshape(d_g * d_g, d_a * d_a)
    U, S, Vh = torch.linalg.svd(R, full_matrices=False)
    sign = 1.0 if Vh[0].view(d_a, d_a).trace() >= 0 else -1.0
    root = S[0].sqrt()
    return sign * root * Vh[0].view(d_a, d_a), sign * root * U[:, 0].view(d_g, d_g)
