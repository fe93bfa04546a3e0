r"""Restrictions of the Fisher that never form the ``(P, P)`` matrix: its diagonal and its
layer-wise diagonal blocks.

Both come from the per-cotangent gradients, the rows :math:`m_{nk}^\top = b_{nk}^\top J_n` of
:math:`F = \sum_{nk} m_{nk} m_{nk}^\top` (:func:`natlib.curvature.reduce_cotangent_rows`, a
chunk of examples at a time), with the Fisher ``kind`` chosen by the cotangents
:math:`b_{nk}` (``"exact"``, ``"mc"``, ``"empirical"``; see
:meth:`natlib.losses.Likelihood.fisher_cotangents`):

- :class:`DiagonalFisher`: :math:`\mathrm{diag}\,F = \sum_{nk} m_{nk} \odot m_{nk}`, squared
  per-example (per-cotangent) gradients, :math:`O(P)` memory (Amari, 1998; Martens, 2020, §11
  on why it ignores every interaction between parameters);
- :class:`BlockDiagonalFisher`: :math:`F_{ll} = \sum_{nk} m_{nk,l} m_{nk,l}^\top` for each
  module :math:`l` that owns parameters, dense per layer (Martens & Grosse, 2015, §4, the
  structure K-FAC approximates further).

Both are running estimates (exponential averages of batches) and train with
:class:`natlib.optim.DiagonalNGD` and :class:`natlib.optim.BlockDiagonalNGD` through the dense
Fisher's :class:`natlib.exact.FisherWatcher`.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch
from torch import Tensor, nn

from natlib import costmodel, curvature
from natlib.checks import check_finite, check_positive, check_unit_interval
from natlib.exact import FisherWatcher
from natlib.interface import Flops, RunningCurvature
from natlib.layout import ParamLayout
from natlib.linalg import gram
from natlib.losses import FisherKind


class RowStatistic(RunningCurvature):
    """A Fisher restriction kept as tensors ``statistics`` summed over per-cotangent gradient
    rows; subclasses say which (:meth:`reduce`) and how to multiply and solve with them."""

    what: str = "statistic"

    def __init__(
        self,
        layout: ParamLayout,
        statistics: list[Tensor],
        batch_size: int,
        num_cotangents: int,
        kind: FisherKind,
    ) -> None:
        for tensor in statistics:
            check_finite(tensor, f"the {self.what}")
        self.layout = layout
        self.statistics = statistics
        self.batch_size, self.num_cotangents, self.kind = batch_size, num_cotangents, kind
        self._damping: float | None = None

    @classmethod
    @abstractmethod
    def reduce(cls, layout: ParamLayout, rows: Tensor) -> Tensor:
        """The statistics of a chunk of rows ``(M, P)``, flat (additive over rows)."""

    @classmethod
    @abstractmethod
    def unflatten(cls, layout: ParamLayout, flat: Tensor) -> list[Tensor]:
        """The statistics of :meth:`reduce`'s flat form."""

    @property
    def dtype(self) -> torch.dtype:
        return self.statistics[0].dtype

    @property
    def device(self) -> torch.device:
        return self.statistics[0].device

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
    ) -> RowStatistic:
        """The statistic of the Fisher of ``kind`` on the batch (arguments as
        :meth:`natlib.exact.Fisher.from_batch`)."""
        b = curvature.fisher_cotangents(model, loss_fn, X, y, kind, mc_samples, generator)
        return cls.of_cotangents(model, loss_fn, X, b, kind)

    @classmethod
    def of_cotangents(
        cls, model: nn.Module, loss_fn: nn.Module, X: Tensor, cotangents: Tensor, kind: FisherKind
    ) -> RowStatistic:
        """The statistic of output cotangents ``(N, K, C)``."""
        layout = ParamLayout.of(model)
        flat = curvature.reduce_cotangent_rows(
            model, loss_fn, X, cotangents, lambda rows: cls.reduce(layout, rows)
        )
        return cls(layout, cls.unflatten(layout, flat), X.shape[0], cotangents.shape[1], kind)

    @classmethod
    def watch(
        cls,
        model: nn.Module,
        loss_fn: nn.Module,
        *,
        kind: FisherKind = "exact",
        mc_samples: int = 1,
        generator: torch.Generator | None = None,
    ) -> FisherWatcher:
        return FisherWatcher(model, loss_fn, kind, mc_samples, generator, curvature=cls)

    def update(self, batch: RunningCurvature, decay: float) -> None:
        r""":math:`S \leftarrow \varepsilon S + (1 - \varepsilon) S_\text{batch}` for every
        statistic; the cached factorisation stays until the next
        :meth:`~natlib.interface.RunningCurvature.refresh`."""
        if type(batch) is not type(self) or batch.settings() != self.settings():
            raise ValueError(f"update needs a {self.what} of the same model and settings.")
        check_unit_interval("ema_decay", decay)
        if decay:
            for mine, new in zip(self.statistics, batch.statistics):
                mine.mul_(decay).add_(new, alpha=1.0 - decay)
        else:
            self.statistics = [t.clone() for t in batch.statistics]
        for tensor in self.statistics:
            check_finite(tensor, f"the running {self.what}")
        self.batch_size, self.num_cotangents = batch.batch_size, batch.num_cotangents

    @property
    def damping(self) -> float | None:
        return self._damping

    def _ensure(self, damping: float) -> None:
        check_positive("damping", damping)
        if self._damping != damping:
            self.refresh(damping)

    def settings(self) -> dict[str, Any]:
        return {
            "curvature": type(self).__name__,
            "kind": self.kind,
            "blocks": [(b.name, b.numel) for b in self.layout.blocks],
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings(),
            "statistics": [t.clone() for t in self.statistics],
            "batch": (self.batch_size, self.num_cotangents),
            "damping": self._damping,
        }

    @classmethod
    def from_state_dict(
        cls, model: nn.Module, loss_fn: nn.Module, state: dict[str, Any]
    ) -> RowStatistic:
        layout = ParamLayout.of(model)
        settings = state["settings"]
        out = cls(
            layout, [t.clone() for t in state["statistics"]], *state["batch"], settings["kind"]
        )
        if out.settings() != settings:
            raise ValueError(
                f"the saved {cls.what} has settings {settings}; this model needs {out.settings()}."
            )
        if state["damping"] is not None:
            out.refresh(state["damping"])
        return out


class DiagonalFisher(RowStatistic):
    r"""The diagonal :math:`d = \mathrm{diag}\,F = \sum_{nk} (b_{nk}^\top J_n)^{\odot 2}` of the
    Fisher of ``kind``: :math:`Cv = d \odot v`, :math:`(C + \lambda I)^{-1} v = v \oslash
    (d + \lambda)`."""

    what = "diagonal Fisher"

    @classmethod
    def reduce(cls, layout: ParamLayout, rows: Tensor) -> Tensor:
        return rows.square().sum(0)

    @classmethod
    def unflatten(cls, layout: ParamLayout, flat: Tensor) -> list[Tensor]:
        return [flat]

    @property
    def diagonal(self) -> Tensor:
        """:math:`\\mathrm{diag}\\,F`, ``(P,)`` in parameter order."""
        return self.statistics[0]

    def matvec(self, v: Tensor) -> Tensor:
        self.layout.check_vector(v)
        return self.diagonal * v

    def to_dense(self) -> Tensor:
        return torch.diag(self.diagonal)

    def solve(self, v: Tensor, damping: float) -> Tensor:
        self.layout.check_vector(v)
        self._ensure(damping)
        return v / (self.diagonal + damping)

    def refresh(self, damping: float) -> None:
        """Nothing to decompose: records the damping."""
        check_positive("damping", damping)
        self._damping = damping

    @property
    def memory_bytes(self) -> int:
        return self.diagonal.numel() * self.diagonal.element_size()

    @property
    def flops(self) -> Flops:
        """Squaring and summing the :math:`NK` rows; adding the damping; one division."""
        p = self.layout.numel
        return Flops(update=2 * self.batch_size * self.num_cotangents * p, refresh=p, solve=p)


class BlockDiagonalFisher(RowStatistic):
    r"""The layer-wise block diagonal :math:`\mathrm{diag}_l(F_{ll})` of the Fisher of ``kind``,
    one dense block per module that owns parameters; solves by a Cholesky factorisation of each
    :math:`F_{ll} + \lambda I`."""

    what = "block-diagonal Fisher"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._cholesky: list[Tensor] = []

    @classmethod
    def reduce(cls, layout: ParamLayout, rows: Tensor) -> Tensor:
        return torch.cat([gram(rows[:, b.slice]).flatten() for b in layout.blocks])

    @classmethod
    def unflatten(cls, layout: ParamLayout, flat: Tensor) -> list[Tensor]:
        sizes = [b.numel for b in layout.blocks]
        parts = flat.split([s * s for s in sizes])
        return [part.view(s, s) for part, s in zip(parts, sizes)]

    @property
    def blocks(self) -> list[Tensor]:
        """:math:`F_{ll}`, one ``(P_l, P_l)`` block per module."""
        return self.statistics

    def matvec(self, v: Tensor) -> Tensor:
        self.layout.check_vector(v)
        return torch.cat([F @ v[b.slice] for F, b in zip(self.blocks, self.layout.blocks)])

    def to_dense(self) -> Tensor:
        return torch.block_diag(*self.blocks)

    def solve(self, v: Tensor, damping: float) -> Tensor:
        self.layout.check_vector(v)
        self._ensure(damping)
        return torch.cat(
            [
                torch.cholesky_solve(v[b.slice].unsqueeze(1), L).squeeze(1)
                for L, b in zip(self._cholesky, self.layout.blocks)
            ]
        )

    def refresh(self, damping: float) -> None:
        """Cholesky-factorise every :math:`F_{ll} + \\lambda I`."""
        check_positive("damping", damping)
        factors = []
        for F, b in zip(self.blocks, self.layout.blocks):
            L, info = torch.linalg.cholesky_ex(
                F + damping * torch.eye(len(F), dtype=F.dtype, device=F.device)
            )
            if info.item() != 0:
                raise ValueError(
                    f"the damped Fisher block of {b.name!r} with damping {damping:g} is not "
                    "positive definite in this precision; raise the damping or use float64."
                )
            factors.append(L)
        self._cholesky, self._damping = factors, damping

    @property
    def memory_bytes(self) -> int:
        numel = sum(F.numel() for F in self.blocks) + sum(L.numel() for L in self._cholesky)
        return numel * torch.empty((), dtype=self.dtype).element_size()

    @property
    def flops(self) -> Flops:
        """Per block of :math:`p_l` parameters: :math:`2NKp_l^2` to form, :math:`p_l^3/3` to
        factorise, :math:`2p_l^2` to solve."""
        sizes = [b.numel for b in self.layout.blocks]
        nk = self.batch_size * self.num_cotangents
        return Flops(
            update=sum(2 * nk * p * p for p in sizes),
            refresh=sum(costmodel.dense_refresh_flops(p) for p in sizes),
            solve=sum(costmodel.dense_solve_flops(p) for p in sizes),
        )
