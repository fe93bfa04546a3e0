r"""The interface every curvature object in natlib implements, exact or approximate.

A curvature object :math:`C` (a ``(P, P)`` matrix in ``parameters_to_vector`` order, see
:mod:`natlib.layout`) offers

- ``matvec(v)`` :math:`= Cv` and ``solve(v, damping)`` :math:`= (C + \lambda I)^{-1} v`;
- ``to_dense()``, the ``(P, P)`` matrix (by default from ``P`` products, for small models);
- ``memory_bytes`` and ``flops`` (:class:`Flops`: per ``update``, ``refresh`` and ``solve``);
- ``from_batch(model, loss_fn, X, y, *, kind=...)``, the estimate on one batch, with the Fisher
  spelled one way everywhere: ``kind`` in ``FisherKind`` (``"exact"``, ``"mc"``,
  ``"empirical"``; Martens (2020) calls ``"exact"`` the type-2 Fisher).

Running estimates (:class:`RunningCurvature`) add ``update(batch, decay)``, the exponential
average :math:`C \leftarrow \varepsilon C + (1 - \varepsilon) C_\text{batch}`, ``refresh(damping)``,
the expensive work redone every :math:`T_\text{inv}` steps (decompositions, inverses), and a
:class:`Watcher` that turns a training loop's own forward (and backward) pass into a batch
estimate, so that :class:`natlib.preconditioned.PreconditionedOptimizer` can drive any of them.
``solve`` uses the inverse of the last ``refresh`` and refreshes only when none exists or the
damping changed, so it can be stale on purpose between refreshes.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from natlib.layout import ParamLayout
from natlib.losses import FisherKind


@dataclass(frozen=True)
class Flops:
    """Floating-point operations of the three kinds of work a curvature object does."""

    update: float  # forming one batch's estimate (beyond the forward and backward pass)
    refresh: float  # decompositions and inverses, every T_inv steps
    solve: float  # one (C + lambda I)^{-1} v


class Curvature(ABC):
    """A ``(P, P)`` curvature matrix of a model's loss, in parameter order."""

    layout: ParamLayout

    @abstractmethod
    def matvec(self, v: Tensor) -> Tensor:
        """:math:`Cv` for a flat vector ``v`` of shape ``(P,)``."""

    @abstractmethod
    def solve(self, v: Tensor, damping: float) -> Tensor:
        r""":math:`(C + \lambda I)^{-1} v` for a flat ``v`` and damping :math:`\lambda > 0`."""

    def to_dense(self) -> Tensor:
        """The ``(P, P)`` matrix, one :meth:`matvec` per column (override where cheaper)."""
        eye = torch.eye(self.layout.numel, dtype=self.dtype, device=self.device)
        return torch.stack([self.matvec(e) for e in eye], dim=1)

    @property
    @abstractmethod
    def dtype(self) -> torch.dtype: ...

    @property
    @abstractmethod
    def device(self) -> torch.device: ...

    @property
    @abstractmethod
    def memory_bytes(self) -> int:
        """Bytes this object holds for its matrix (statistics, factors, inverses)."""

    @property
    @abstractmethod
    def flops(self) -> Flops:
        """FLOP counts of :class:`Flops` (from :mod:`natlib.costmodel`)."""

    @classmethod
    @abstractmethod
    def from_batch(
        cls,
        model: nn.Module,
        loss_fn: nn.Module,
        X: Tensor,
        y: Tensor | None = None,
        *,
        kind: FisherKind = "exact",
        **options: Any,
    ) -> Curvature:
        """The estimate on one batch ``(X, y)``."""


class Watcher(ABC):
    """Hooks that record one forward (and backward) pass of a training loop and turn it into a
    batch estimate. The optimiser calls :meth:`start` before the forward pass it wants,
    :meth:`finish` with the model's output after it, and :meth:`estimate` at ``step()``."""

    @abstractmethod
    def start(self, inputs: tuple) -> None:
        """Record the forward pass about to run on ``inputs`` (the model's positional
        arguments)."""

    @abstractmethod
    def finish(self, output: Tensor) -> None:
        """The recorded forward pass produced ``output`` (still attached to the graph)."""

    @abstractmethod
    def estimate(self) -> RunningCurvature:
        """The batch estimate of the recorded pass (after ``loss.backward()``).

        Raises:
            RuntimeError: if nothing was recorded, or a backward pass it needs is missing.
        """

    @abstractmethod
    def remove(self) -> None:
        """Remove every hook."""


class RunningCurvature(Curvature):
    """A curvature estimate that is averaged over batches and refreshed periodically."""

    @abstractmethod
    def update(self, batch: RunningCurvature, decay: float) -> None:
        r""":math:`C \leftarrow \varepsilon C + (1 - \varepsilon) C_\text{batch}`,
        :math:`\varepsilon` = ``decay`` in ``[0, 1)``.

        It replaces attributes rather than writing into their tensors or containers, so a
        shallow ``copy.copy`` can be updated while the original stays as it was.
        """

    @abstractmethod
    def refresh(self, damping: float) -> None:
        """Redo the expensive work (decompositions, damped inverses) for ``damping``;
        replaces attributes like :meth:`update`."""

    @property
    @abstractmethod
    def damping(self) -> float | None:
        """The damping of the last :meth:`~natlib.interface.RunningCurvature.refresh`
        (``None`` before the first): ``solve`` with it uses the cached inverse, however
        stale."""

    @classmethod
    @abstractmethod
    def watch(
        cls,
        model: nn.Module,
        loss_fn: nn.Module,
        *,
        kind: FisherKind,
        mc_samples: int,
        generator: torch.Generator | None,
        **options: Any,
    ) -> Watcher:
        """A :class:`~natlib.interface.Watcher` on ``model`` whose estimates are of this class."""

    @abstractmethod
    def settings(self) -> dict[str, Any]:
        """What a saved state depends on (kind, modes, shapes), compared on load."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """The tensors of the running estimate and its cached inverse."""

    @classmethod
    @abstractmethod
    def from_state_dict(
        cls, model: nn.Module, loss_fn: nn.Module, state: dict[str, Any]
    ) -> RunningCurvature:
        """The estimate saved by :meth:`state_dict` (with :meth:`settings` under
        ``"settings"``), for ``model``."""


class Communicator:
    r"""The hook through which :class:`natlib.preconditioned.PreconditionedOptimizer` shares its
    curvature between processes; this base class is the single process, which shares nothing.

    At a refresh step (:math:`k \bmod T_\text{inv} = 0`) the optimiser calls, in order,

    1. :meth:`guard` around its local work (gradient, factor update): a subclass tells the other
       processes when that work raises, so that none waits for it;
    2. :meth:`reduce_factors` on the running estimate: a subclass replaces the local statistics
       by their average over the processes;
    3. :meth:`refresh`: a subclass shares the decompositions out and broadcasts the results,
       so that every process holds the same damped inverse.

    :mod:`natlib.distributed` implements them on ``torch.distributed``; the curvature classes
    never import it.
    """

    rank: int = 0
    world_size: int = 1

    def seed(self, seed: int) -> int:
        """The seed of this process's Monte-Carlo generator: ``seed`` itself here."""
        return seed

    def guard(self, collective: bool) -> contextlib.AbstractContextManager[None]:
        """A context around the optimiser's local work before a step's collectives (only
        when ``collective``); here it does nothing."""
        return contextlib.nullcontext()

    def reduce_factors(self, curvature: RunningCurvature) -> None:
        """Make ``curvature``'s running statistics those of all processes; nothing here."""

    def refresh(self, curvature: RunningCurvature, damping: float) -> None:
        """``curvature.refresh(damping)``, split across processes in a subclass."""
        curvature.refresh(damping)
