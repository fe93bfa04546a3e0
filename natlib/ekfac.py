r"""Eigenvalue-corrected K-FAC (EK-FAC; George, Laurent, Bouthillier, Ballas & Vincent, 2018).

K-FAC's block :math:`A \otimes G` (:mod:`natlib.kfac`) has the eigenbasis
:math:`Q_A \otimes Q_G` and the eigenvalues :math:`a_j g_i`. EK-FAC keeps the basis and re-fits
the eigenvalues to the per-example (per-cotangent) gradients :math:`g_{nk} \bar a_n^\top`
projected on it,

.. math:: s_{ij} = \sum_{nk} \big(q_{G,i}^\top g_{nk}\big)^2 \big(q_{A,j}^\top \bar a_n\big)^2
          = \big(Q^\top F_l Q\big)_{(ij),(ij)},

the diagonal of the exact layer block :math:`F_l = \sum_{nk} \mathrm{vec}(g_{nk} \bar a_n^\top)
\mathrm{vec}(\cdot)^\top` in that basis. Among all matrices :math:`Q \mathrm{diag}(s) Q^\top`
this is the one closest to :math:`F_l` in Frobenius norm, so EK-FAC's error never exceeds
K-FAC's (George et al., 2018, §3.2), and it equals K-FAC where K-FAC is exact.

:class:`EKFACApproximation` consumes a :class:`natlib.kfac.KFACApproximation` (the running
factors) and the batch's layer inputs and output gradients. As a running estimate,
:meth:`~EKFACApproximation.update` averages the factors and the scalings (projecting each
batch on the current basis), and :meth:`~EKFACApproximation.refresh` recomputes the basis from
the averaged factors; the scalings belong to one basis, so they restart from the last batch
projected on the new one.

Layers that share their weight over :math:`R` positions (``nn.Conv2d``, ``nn.Linear`` on
``(N, ..., d_in)``; :mod:`natlib.factors`) have the per-example gradients
:math:`\sum_r g_{nrk} \bar a_{nr}^\top`; the scalings are their squared projections,
:math:`s_{ij} = \sum_{nk} \big(Q_G^\top (\sum_r g_{nrk} \bar a_{nr}^\top) Q_A\big)_{ij}^2`,
again the diagonal of the exact block in K-FAC's basis (K-FAC-expand's or K-FAC-reduce's).
That needs one gradient per example: a weight-shared layer whose model returns a different
number of output rows than the layer sees examples (the character transformer's
``(N T, V)`` logits) is a ``ValueError``, since the cotangents of the ``T`` rows of one
example are back-propagated together. EK-FAC has no ``unsupported="gradient"`` fallback.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from natlib import costmodel
from natlib.checks import check_choice, check_finite, check_positive, check_unit_interval
from natlib.factors import Approximation, Recorder, factors_of, homogeneous, raw_cotangents
from natlib.interface import Flops, RunningCurvature
from natlib.kfac import KFACApproximation, KFACWatcher
from natlib.layout import LinearLayer, ParamLayout
from natlib.linalg import EigenInverse, eigh
from natlib.losses import FisherKind, likelihood

# layer -> (a_bar (N, R, d_A), g (K, N, R, d_G)); R = 1 for a Linear on (N, d_in)
Samples = dict[str, tuple[Tensor, Tensor]]


def scalings(basis: tuple[Tensor, Tensor], a_bar: Tensor, g: Tensor) -> Tensor:
    r""":math:`s_{ij} = \sum_{nk} \big(Q_G^\top (\sum_r g_{nrk} \bar a_{nr}^\top)
    Q_A\big)_{ij}^2`, ``(d_G, d_A)``, for the basis :math:`(Q_A, Q_G)`, inputs ``a_bar``
    ``(N, R, d_A)`` and gradients ``g`` ``(K, N, R, d_G)`` (or ``(N, d_A)`` and
    ``(K, N, d_G)``). With one position it is
    :math:`\sum_{nk} (Q_G^\top g_{nk})_i^2 (Q_A^\top \bar a_n)_j^2`."""
    QA, QG = basis
    if a_bar.ndim == 3 and a_bar.shape[1] == 1:
        a_bar, g = a_bar[:, 0], g[:, :, 0]
    if a_bar.ndim == 2:
        return torch.einsum("knd,na->da", (g @ QG).square(), (a_bar @ QA).square())
    projected = torch.einsum("knrd,nra->knda", g @ QG, a_bar @ QA)
    return projected.square().sum((0, 1))


def check_examples(layers: tuple[LinearLayer, ...], samples: Samples, rows: int) -> None:
    """Raise ``ValueError`` for a weight-shared layer when the model's output has ``rows``
    rows, not one per example of the layer's input: its per-example gradients are not
    separable then."""
    for layer in layers:
        a_bar = samples[layer.name][0]
        if a_bar.ndim == 3 and a_bar.shape[1] > 1 and a_bar.shape[0] != rows:
            raise ValueError(
                f"layer {layer.name!r} shares its weight over {a_bar.shape[1]} positions of "
                f"{a_bar.shape[0]} examples, but the model returns {rows} output rows; EK-FAC "
                "needs one output row per example for a weight-shared layer (nn.Linear on "
                "(N, ..., d_in), nn.Conv2d), or layers applied to (N, d_in) rows."
            )


class EKFACApproximation(RunningCurvature):
    r""":math:`\mathrm{diag}_l\big((Q_{A,l} \otimes Q_{G,l}) \mathrm{diag}(s_l)
    (Q_{A,l} \otimes Q_{G,l})^\top\big)`, solved exactly in the eigenbasis:
    :math:`V \mapsto Q_G [(Q_G^\top V Q_A) \oslash (S + \lambda)] Q_A^\top`.

    Attributes:
        kfac: the K-FAC statistics (running factors :math:`A, G`).
        basis: ``{layer name: (Q_A, Q_G)}``, from the factors at construction or last refresh.
        scalings: ``{layer name: S}``, ``(d_G, d_A)``.
        samples: ``{layer name: (a_bar, g)}`` of the last batch.
    """

    def __init__(self, kfac: KFACApproximation, samples: Samples) -> None:
        if kfac.fallback:
            raise ValueError(
                f"EK-FAC supports only Kronecker layers, not the identity blocks of "
                f"{[block.name for block in kfac.fallback]} (K-FAC's unsupported='gradient')."
            )
        self.kfac = kfac
        self.layout = kfac.layout
        self.samples = samples
        self.basis: dict[str, tuple[Tensor, Tensor]] = {}
        self.scalings: dict[str, Tensor] = {}
        self._damping: float | None = None
        self._fit_basis()

    @property
    def layers(self) -> tuple[LinearLayer, ...]:
        return self.kfac.layers

    @property
    def kind(self) -> FisherKind:
        return self.kfac.kind

    def _fit_basis(self) -> None:
        """The factors' eigenbases, and the last batch's scalings in them."""
        for layer in self.layers:
            A, G = self.kfac.factors[layer.name]
            QA = eigh(A, f"factor A of layer {layer.name!r}").vectors
            QG = eigh(G, f"factor G of layer {layer.name!r}").vectors
            self.basis[layer.name] = (QA, QG)
            self.scalings[layer.name] = scalings((QA, QG), *self.samples[layer.name])
            check_finite(self.scalings[layer.name], f"the scalings of layer {layer.name!r}")

    @classmethod
    def of_statistics(
        cls,
        kfac: KFACApproximation,
        inputs: dict[str, Tensor],
        gradients: dict[str, Tensor],
        rows: int | None = None,
    ) -> EKFACApproximation:
        """From K-FAC's factors, the layers' input positions ``(N, R, d_in)`` (or ``(N, d_in)``)
        and their output gradients ``(K, N, R, d_out)`` (or ``(K, N, d_out)``; reduction factor
        included, as in K-FAC's :math:`G`); ``rows``, the model's output rows, is checked
        against ``N`` for weight-shared layers (:func:`check_examples`)."""
        samples = {
            layer.name: (homogeneous(inputs[layer.name], layer.bias), gradients[layer.name])
            for layer in kfac.layers
        }
        if rows is not None:
            check_examples(kfac.layers, samples, rows)
        return cls(kfac, samples)

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
        approximation: Approximation = "expand",
    ) -> EKFACApproximation:
        """EK-FAC of every ``nn.Linear`` and ``nn.Conv2d`` layer on the batch (arguments as
        :meth:`natlib.kfac.KFACApproximation.from_batch`; ``approximation`` picks the
        basis of weight-shared layers).

        Raises:
            ValueError: for unsupported layers, losses or ``kind``, missing labels, NaN/Inf,
                or a weight-shared layer without one output row per example.
        """
        lik = likelihood(loss_fn)
        check_choice("approximation", approximation, Approximation)
        layout = ParamLayout.of(model, kronecker=True)
        layers: list[LinearLayer] = list(layout.blocks)  # type: ignore[arg-type]
        recorder = Recorder(layers, approximation)
        try:
            with torch.enable_grad():
                recorder.start()
                raw = model(X)
                recorder.stop()
                cotangents = raw_cotangents(lik, raw, kind, y, mc_samples, generator)
                grads = recorder.output_gradients(raw, cotangents)
        finally:
            recorder.remove()
        A = recorder.input_factors()
        G = factors_of(layers, grads, approximation)
        factors = {layer.name: (A[layer.name], G[layer.name]) for layer in layers}
        kfac = KFACApproximation(
            layout,
            factors,
            X.shape[0],
            cotangents.shape[0],
            kind,
            "exact",
            approximation,
            recorder.positions(),
        )
        rows = lik.output_matrix(raw).shape[0]
        return cls.of_statistics(kfac, recorder.inputs, grads, rows)

    @classmethod
    def watch(
        cls,
        model: nn.Module,
        loss_fn: nn.Module,
        *,
        kind: FisherKind = "exact",
        mc_samples: int = 1,
        generator: torch.Generator | None = None,
        approximation: Approximation = "expand",
    ) -> EKFACWatcher:
        return EKFACWatcher(
            model, loss_fn, kind, mc_samples, generator, "exact", approximation, "error"
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.kfac.dtype

    @property
    def device(self) -> torch.device:
        return self.kfac.device

    # ------------------------------------------------------------------ the matrix

    def _apply(self, v: Tensor, scale: dict[str, Tensor]) -> Tensor:
        r""":math:`V \mapsto Q_G [(Q_G^\top V Q_A) \odot \text{scale}] Q_A^\top` per layer."""
        parts = []
        for layer in self.layers:
            QA, QG = self.basis[layer.name]
            in_basis = EigenInverse(QG, QA, scale[layer.name])  # the map of any scale
            parts.append(layer.flat(in_basis.apply(layer.matrix(v))))
        return torch.cat(parts)

    def matvec(self, v: Tensor) -> Tensor:
        r""":math:`V \mapsto Q_G [(Q_G^\top V Q_A) \odot S] Q_A^\top` layer by layer."""
        self.layout.check_vector(v)
        return self._apply(v, self.scalings)

    def solve(self, v: Tensor, damping: float) -> Tensor:
        r""":math:`V \mapsto Q_G [(Q_G^\top V Q_A) \oslash (S + \lambda)] Q_A^\top`: exact in the
        basis, so any damping costs the same (no refresh needed)."""
        self.layout.check_vector(v)
        check_positive("damping", damping)
        return self._apply(v, {name: 1.0 / (S + damping) for name, S in self.scalings.items()})

    def to_dense(self) -> Tensor:
        blocks = []
        for layer in self.layers:
            QA, QG = self.basis[layer.name]
            Q = torch.kron(QG, QA)  # row-major vec of V: (Q_G (x) Q_A) vec(S-scaled)
            order = layer.permutation(Q.device)
            blocks.append(((Q * self.scalings[layer.name].flatten()) @ Q.T)[order][:, order])
        return torch.block_diag(*blocks)

    # ------------------------------------------------------------------ running estimate

    def update(self, batch: RunningCurvature, decay: float) -> None:
        r"""K-FAC's factors averaged (:meth:`natlib.kfac.KFACApproximation.update`) and
        :math:`S \leftarrow \varepsilon S + (1 - \varepsilon) S_\text{batch}`, with the batch's
        gradients projected on this object's current basis. New tensors replace the old ones,
        so a failure changes nothing."""
        if not isinstance(batch, EKFACApproximation) or batch.settings() != self.settings():
            raise ValueError("update needs an EK-FAC estimate of the same model and settings.")
        check_unit_interval("ema_decay", decay)
        averaged = {}
        for layer in self.layers:
            new = scalings(self.basis[layer.name], *batch.samples[layer.name])
            if decay:
                new = self.scalings[layer.name].mul(decay).add_(new, alpha=1.0 - decay)
            check_finite(new, f"the running scalings of layer {layer.name!r}")
            averaged[layer.name] = new
        self.kfac.update(batch.kfac, decay)  # new factors too, none written in place
        self.scalings, self.samples = averaged, batch.samples

    def refresh(self, damping: float) -> None:
        """Recompute the eigenbases from the averaged factors and re-fit the scalings to the
        last batch in them."""
        check_positive("damping", damping)
        self._fit_basis()
        self._damping = damping

    @property
    def damping(self) -> float | None:
        return self._damping

    # ------------------------------------------------------------------ costs

    @property
    def memory_bytes(self) -> int:
        """K-FAC's factors, the bases, the scalings and the last batch's samples."""
        numel = sum(A.numel() + G.numel() for A, G in self.kfac.factors.values())
        numel += sum(QA.numel() + QG.numel() for QA, QG in self.basis.values())
        numel += sum(S.numel() for S in self.scalings.values())
        numel += sum(a.numel() + g.numel() for a, g in self.samples.values())
        return numel * torch.empty((), dtype=self.dtype).element_size()

    @property
    def flops(self) -> Flops:
        r"""K-FAC's factor counts plus projecting :math:`N` inputs and :math:`NK` gradients on
        the basis (:math:`2Nd_A^2 + 2NKd_G^2`) and the scaling sum (:math:`2NKd_Gd_A`); the
        eigendecompositions; four products per solve."""
        n, k = self.kfac.batch_size, self.kfac.num_cotangents
        update = self.kfac.flops.update
        update += sum(
            costmodel.kronecker_factor_flops(layer.d_a, layer.d_out, n * r, k)
            + 2 * n * k * r * layer.d_out * layer.d_a
            for layer in self.layers
            for r in [self.kfac.positions[layer.name]]
        )
        refresh, solve = costmodel.kronecker_layers_flops(
            [(layer.d_a, layer.d_out) for layer in self.layers], "exact"
        )
        return Flops(update=update, refresh=refresh, solve=solve)

    # ------------------------------------------------------------------ state

    def settings(self) -> dict[str, Any]:
        return {**self.kfac.settings(), "curvature": type(self).__name__}

    def state_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings(),
            "kfac": self.kfac.state_dict(),
            "basis": {name: (QA.clone(), QG.clone()) for name, (QA, QG) in self.basis.items()},
            "scalings": {name: S.clone() for name, S in self.scalings.items()},
            "samples": {name: (a.clone(), g.clone()) for name, (a, g) in self.samples.items()},
            "damping": self._damping,
        }

    @classmethod
    def from_state_dict(
        cls, model: nn.Module, loss_fn: nn.Module, state: dict[str, Any]
    ) -> EKFACApproximation:
        kfac = KFACApproximation.from_state_dict(model, loss_fn, state["kfac"])
        out = cls(kfac, {name: (a.clone(), g.clone()) for name, (a, g) in state["samples"].items()})
        if out.settings() != state["settings"]:
            raise ValueError(
                f"the saved EK-FAC state has settings {state['settings']}, not {out.settings()}."
            )
        out.basis = {name: (QA.clone(), QG.clone()) for name, (QA, QG) in state["basis"].items()}
        out.scalings = {name: S.clone() for name, S in state["scalings"].items()}
        out._damping = state["damping"]
        return out


class EKFACWatcher(KFACWatcher):
    """:class:`natlib.kfac.KFACWatcher` that also hands on the layers' inputs and output
    gradients, for EK-FAC's scalings."""

    def estimate(self) -> EKFACApproximation:
        pending = self._take()
        kfac = self._kfac(pending)
        root = math.sqrt(pending["scale"])  # the loss's own backward carries r, not sqrt(r)
        gradients = {name: g / root for name, g in pending["g"].items()}
        return EKFACApproximation.of_statistics(kfac, pending["a"], gradients, pending["rows"])
