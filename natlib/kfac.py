r"""Kronecker-factored approximate curvature (K-FAC) for networks of ``nn.Linear`` layers.

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
    check_positive_int,
    check_unit_interval,
)
from natlib.factors import (
    Recorder,
    average_pairs,
    factors_of,
    gradient_factor,
    raw_cotangents,
)
from natlib.interface import Flops, RunningCurvature, Watcher
from natlib.layout import LinearLayer, ParamLayout
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


class KFACApproximation(RunningCurvature):
    r"""The block-diagonal K-FAC approximation :math:`\mathrm{diag}_l(A_l \otimes G_l)`.

    Its damped inverse is cached by :meth:`refresh` in ``damping_mode`` ``"exact"``
    (:class:`natlib.linalg.EigenInverse`) or factored ``"pi"``
    (:class:`natlib.linalg.FactoredInverse`).

    Attributes:
        layout: the model's parameter layout; its ``blocks`` are the ``nn.Linear`` layers.
        factors: ``{layer name: (A, G)}``.
        batch_size, num_cotangents: N and K of the (last) batch the factors come from.
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
    ) -> None:
        check_choice("Fisher kind", kind, FisherKind)
        check_choice("damping mode", damping_mode, DampingMode)
        if not all(isinstance(layer, LinearLayer) for layer in layout.blocks):
            raise ValueError(
                "K-FAC needs a layout of nn.Linear layers: ParamLayout.of(model, True)."
            )
        for layer in layout.blocks:
            A, G = factors[layer.name]
            if A.shape != (layer.d_a, layer.d_a) or G.shape != (layer.d_out, layer.d_out):
                raise ValueError(
                    f"factors of layer {layer.name!r} have shapes {tuple(A.shape)} and "
                    f"{tuple(G.shape)}; the layer needs ({layer.d_a}, {layer.d_a}) and "
                    f"({layer.d_out}, {layer.d_out})."
                )
            check_finite(A, f"factor A of layer {layer.name!r}")
            check_finite(G, f"factor G of layer {layer.name!r}")
        self.layout = layout
        self.factors = factors
        self.batch_size, self.num_cotangents = batch_size, num_cotangents
        self.kind, self.damping_mode = kind, damping_mode
        self.eigen: dict[str, tuple[Eigen, Eigen]] = {}
        self._inverse: dict[str, KroneckerInverse] = {}
        self._damping: float | None = None

    @property
    def layers(self) -> tuple[LinearLayer, ...]:
        return self.layout.blocks  # type: ignore[return-value]

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
    ) -> KFACApproximation:
        r"""K-FAC factors of every ``nn.Linear`` layer on the batch ``X``.

        Args:
            kind: ``"exact"`` (the type-2 Fisher: exact output-space Fisher through the loss
                Hessian's square root), ``"mc"`` (``mc_samples`` targets drawn from the model
                per example, with ``generator``) or ``"empirical"`` (the data labels ``y``).
            damping_mode: how :meth:`solve` damps, ``"exact"`` or factored ``"pi"``.

        Raises:
            TypeError: if ``X`` or ``y`` is not a tensor or the model does not return one.
            ValueError: for unsupported layers, losses or ``kind``, missing labels, an empty
                batch, a dtype or device mismatch, a BatchNorm or Dropout layer in training
                mode (checked before the forward pass), or NaN/Inf in outputs or factors.
        """
        lik = likelihood(loss_fn)  # the kind is checked with the cotangents
        layout = ParamLayout.of(model, linear_only=True)
        check_batch(model, X, y)
        recorder = Recorder(layout.blocks)  # type: ignore[arg-type]
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
        factors = {layer.name: (A[layer.name], G[layer.name]) for layer in layout.blocks}
        return cls(layout, factors, X.shape[0], cotangents.shape[0], kind, damping_mode)

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
    ) -> KFACWatcher:
        """A :class:`KFACWatcher` on ``model``."""
        return KFACWatcher(model, loss_fn, kind, mc_samples, generator, damping_mode)

    # ------------------------------------------------------------------ the matrix

    def matvec(self, v: Tensor) -> Tensor:
        """:math:`(A \\otimes G) v` layer by layer: :math:`V \\mapsto G V A`."""
        self.layout.check_vector(v)
        parts = []
        for layer in self.layers:
            A, G = self.factors[layer.name]
            parts.append(layer.flat(G @ layer.matrix(v) @ A))
        return torch.cat(parts)

    def to_dense(self) -> Tensor:
        """The block-diagonal ``(P, P)`` matrix in ``parameters_to_vector`` order."""
        blocks = []
        for layer in self.layers:
            A, G = self.factors[layer.name]
            order = layer.permutation(A.device)
            blocks.append(torch.kron(G, A)[order][:, order])
        return torch.block_diag(*blocks)

    def solve(self, v: Tensor, damping: float) -> Tensor:
        r"""The damped inverse of the last :meth:`refresh` applied to a flat ``v``; refreshes
        first when there is none or ``damping`` differs from its damping."""
        self.layout.check_vector(v)
        self._ensure_inverse(damping)
        return torch.cat(
            [layer.flat(self.apply_inverse(layer, layer.matrix(v))) for layer in self.layers]
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

        Raises:
            ValueError: if ``damping`` is not a positive finite number, or a factor's
                eigendecomposition fails or its damped inverse is not finite (naming the
                layer).
        """
        check_positive("damping", damping)
        eigens, inverses = {}, {}
        for layer in self.layers:
            A, G = self.factors[layer.name]
            eigen = (
                eigh(A, f"factor A of layer {layer.name!r}"),
                eigh(G, f"factor G of layer {layer.name!r}"),
            )
            inverse = damped_inverse(*eigen, damping, self.damping_mode)
            for tensor in vars(inverse).values():
                check_finite(tensor, f"the damped inverse of layer {layer.name!r}")
            eigens[layer.name], inverses[layer.name] = eigen, inverse
        self.eigen, self._inverse, self._damping = eigens, inverses, damping

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
        n, k = self.batch_size, self.num_cotangents
        refresh, solve = costmodel.kronecker_layers_flops(
            [(layer.d_a, layer.d_out) for layer in self.layers], self.damping_mode
        )
        update = sum(
            costmodel.kronecker_factor_flops(layer.d_a, layer.d_out, n, k) for layer in self.layers
        )
        return Flops(update=update, refresh=refresh, solve=solve)

    # ------------------------------------------------------------------ state

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
            "factors": {name: (A.clone(), G.clone()) for name, (A, G) in self.factors.items()},
            "batch": (self.batch_size, self.num_cotangents),
            "damping": self._damping,
            "inverse": {name: dict(vars(inv)) for name, inv in self._inverse.items()},
        }

    @classmethod
    def from_state_dict(
        cls, model: nn.Module, loss_fn: nn.Module, state: dict[str, Any]
    ) -> KFACApproximation:
        settings = state["settings"]
        layout = ParamLayout.of(model, linear_only=True)
        factors = {name: (A.clone(), G.clone()) for name, (A, G) in state["factors"].items()}
        if set(factors) != {layer.name for layer in layout.blocks}:
            raise ValueError(
                f"the saved K-FAC state covers layers {sorted(factors)}, the model has "
                f"{[layer.name for layer in layout.blocks]}."
            )
        out = cls(layout, factors, *state["batch"], settings["kind"], settings["damping_mode"])
        if out.settings() != settings:
            raise ValueError(
                f"the saved K-FAC state has settings {settings}, not {out.settings()}."
            )
        inverse = EigenInverse if out.damping_mode == "exact" else FactoredInverse
        out._inverse = {name: inverse(**fields) for name, fields in state["inverse"].items()}
        out._damping = state["damping"]
        return out


class KFACWatcher(Watcher):
    """Records a training loop's forward pass for K-FAC.

    ``kind="mc"``/``"exact"``: one extra backward pass of sampled or factored output cotangents
    right after the forward pass; ``"empirical"``: the layers' output gradients of the loss's
    own ``backward()``, divided by the reduction factor.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        kind: FisherKind,
        mc_samples: int,
        generator: torch.Generator | None,
        damping_mode: DampingMode,
    ) -> None:
        check_choice("Fisher kind", kind, FisherKind)
        check_choice("damping mode", damping_mode, DampingMode)
        check_positive_int("mc_samples", mc_samples)
        self.layout = ParamLayout.of(model, linear_only=True)
        self.likelihood = likelihood(loss_fn)
        self.kind, self.mc_samples, self.generator = kind, mc_samples, generator
        self.damping_mode = damping_mode
        self.recorder = Recorder(self.layout.blocks)  # type: ignore[arg-type]
        self._pending: dict[str, Any] | None = None

    def start(self, inputs: tuple) -> None:
        self.recorder.start()

    def finish(self, output: Tensor) -> None:
        recorder = self.recorder
        if not recorder.active:
            return
        recorder.stop()
        f = self.likelihood.output_matrix(output).detach()
        # The layers' inputs "a" and output gradients "g" ((K, N, d_out), times sqrt(scale))
        # stay for estimates that need per-example statistics (EK-FAC).
        pending: dict[str, Any] = {
            "A": recorder.input_factors(),
            "G": {},
            "N": f.shape[0],
            "a": recorder.inputs,
            "g": {},
            "scale": 1.0,
        }
        if self.kind == "empirical":
            # G from the loss's own backward: its output gradient is r * grad l, so divide by r.
            r = self.likelihood.scale(f)
            for layer in self.recorder.layers:
                recorder.outputs[layer.name].register_hook(_keep_gradient(layer, r, pending))
            pending["K"], pending["scale"] = 1, r
        else:
            cotangents = raw_cotangents(
                self.likelihood, output, self.kind, None, self.mc_samples, self.generator
            )
            grads = recorder.output_gradients(output, cotangents, retain_graph=True)
            pending["G"], pending["g"] = factors_of(self.layout.blocks, grads), grads
            pending["K"] = cotangents.shape[0]
        recorder.outputs = {}
        self._pending = pending

    def estimate(self) -> KFACApproximation:
        return self._kfac(self._take())

    def _take(self) -> dict[str, Any]:
        """The recorded statistics, once."""
        pending, self._pending = self._pending, None
        if pending is None:
            raise RuntimeError(
                "no forward pass was recorded for this factor update; run the model on the "
                "batch with gradients enabled (and backward the loss) before step()."
            )
        return pending

    def _kfac(self, pending: dict[str, Any]) -> KFACApproximation:
        factors = {}
        for layer in self.layout.blocks:
            if layer.name not in pending["G"]:
                raise RuntimeError(
                    f"layer {layer.name!r} got no output gradient; kind='empirical' needs "
                    "loss.backward() on the recorded forward pass before step()."
                )
            factors[layer.name] = (pending["A"][layer.name], pending["G"][layer.name])
        return KFACApproximation(
            self.layout, factors, pending["N"], pending["K"], self.kind, self.damping_mode
        )

    def remove(self) -> None:
        self.recorder.remove()


def _keep_gradient(layer: LinearLayer, r: float, pending: dict[str, Any]):
    def hook(grad: Tensor) -> None:
        pending["G"][layer.name] = gradient_factor(grad.detach()).div_(r)
        pending["g"][layer.name] = grad.detach().unsqueeze(0)

    return hook


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
