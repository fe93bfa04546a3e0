r"""Exact curvature behind the one interface: the Hessian, the GGN and the Fisher of a batch.

Each object is matrix-free first: ``matvec`` is a Hessian-, GGN- or Fisher-vector product
(:mod:`natlib.curvature`), and ``solve`` runs conjugate gradients on it unless the dense
matrix is at hand. ``to_dense`` forms the ``(P, P)`` matrix once and keeps it; afterwards
products and solves use it (a Cholesky factorisation of :math:`C + \lambda I` per damping, or
an LU factorisation for the indefinite Hessian). Models with at most :data:`DENSE_LIMIT`
parameters solve densely from the start; larger ones stay matrix-free through ``refresh`` and
an ``update`` without averaging, so an optimiser solves them by conjugate gradients.

Each is also a running estimate: ``update`` averages dense matrices. :class:`FisherWatcher`
lets :class:`natlib.optim.NGD` train with the usual loop; the Hessian and the GGN need the
labels, which :class:`LossWatcher` reads from the loss module's call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from natlib import costmodel, curvature, hooks
from natlib.checks import (
    check_choice,
    check_finite,
    check_positive,
    check_positive_int,
    check_tensor,
    check_unit_interval,
    warn_float32_condition,
)
from natlib.interface import Flops, RunningCurvature, Watcher
from natlib.layout import ParamLayout
from natlib.linalg import CG_TOLERANCE, condition_number, conjugate_gradient
from natlib.losses import FisherKind, likelihood

#: Parameters up to which ``solve`` forms the dense matrix; beyond, conjugate gradients.
DENSE_LIMIT = 4096


class ExactCurvature(RunningCurvature):
    """One batch's exact curvature matrix, matrix-free with a dense form on demand."""

    positive_semidefinite: ClassVar[bool] = True
    what: ClassVar[str] = "curvature"

    def __init__(
        self,
        layout: ParamLayout,
        product: Callable[[], Callable[[Tensor], Tensor]] | None,
        dense: Callable[[], Tensor] | Tensor,
        like: Tensor,
        batch_size: int,
        settings: dict[str, Any],
    ) -> None:
        self.layout = layout
        self._make_product = product  # built on first use: it costs a forward pass
        self._built_product: Callable[[Tensor], Tensor] | None = None
        self._dense = dense if isinstance(dense, Tensor) else None
        self._make_dense = None if isinstance(dense, Tensor) else dense
        self._like = like
        self._factor: tuple[float, Tensor] | None = None  # (damping, Cholesky or LU of C + dI)
        self.batch_size = batch_size
        self.num_cotangents = 1  # K of the Gram product, for the flop count
        self._settings = settings

    @property
    def dtype(self) -> torch.dtype:
        return self._like.dtype

    @property
    def device(self) -> torch.device:
        return self._like.device

    @property
    def _matrix_free(self) -> bool:
        """Solves run conjugate gradients on the product: no dense matrix is at hand and the
        model has more than :data:`DENSE_LIMIT` parameters."""
        return self._dense is None and self.layout.numel > DENSE_LIMIT and bool(self._make_product)

    @property
    def _product(self) -> Callable[[Tensor], Tensor] | None:
        if self._built_product is None and self._make_product is not None:
            self._built_product = self._make_product()
        return self._built_product

    def to_dense(self) -> Tensor:
        """The ``(P, P)`` matrix (formed once, then kept)."""
        if self._dense is None:
            self._dense = self._make_dense()
        return self._dense

    def matvec(self, v: Tensor) -> Tensor:
        self.layout.check_vector(v)
        if self._dense is not None or self._make_product is None:
            return self.to_dense() @ v
        return self._product(v)

    def solve(self, v: Tensor, damping: float) -> Tensor:
        r""":math:`(C + \lambda I)^{-1} v`: densely for small models or once :meth:`to_dense`
        ran, else by conjugate gradients to relative residual :data:`natlib.linalg.CG_TOLERANCE`.

        Raises:
            ValueError: for a bad ``v`` or ``damping``, or if :math:`C + \lambda I` is not
                positive definite where it must be (name the damping to raise).
            RuntimeError: if conjugate gradients do not converge in ``P`` iterations.
        """
        self.layout.check_vector(v)
        check_positive("damping", damping)
        if self._matrix_free:
            tol = CG_TOLERANCE.get(v.dtype, 1e-10)
            result = conjugate_gradient(lambda u: self._product(u) + damping * u, v, tol)
            if not result.converged:
                raise RuntimeError(
                    f"conjugate gradients on the damped {self.what} reached relative residual "
                    f"{result.residual:.2e} > {tol:.0e} after {result.iterations} iterations; "
                    "raise the damping."
                )
            return result.x
        if self._factor is None or self._factor[0] != damping:
            self.refresh(damping)
        return self._apply_factor(self._factor[1], v)

    def _apply_factor(self, factor: Any, v: Tensor) -> Tensor:
        r""":math:`(C + \lambda I)^{-1} v` from the factorisation of :meth:`refresh`."""
        if self.positive_semidefinite:
            return torch.cholesky_solve(v.unsqueeze(1), factor).squeeze(1)
        return torch.linalg.lu_solve(*factor, v.unsqueeze(1)).squeeze(1)

    @property
    def damping(self) -> float | None:
        return None if self._factor is None else self._factor[0]

    def refresh(self, damping: float) -> None:
        """Factorise :math:`C + \\lambda I`: Cholesky (PSD matrices) or LU (the Hessian); a
        matrix-free object only records the damping for conjugate gradients.

        Warns (``RuntimeWarning``) when, in float32, the damped matrix has an estimated
        condition number (:func:`natlib.linalg.condition_number`) above 1e6.

        Raises:
            ValueError: if ``damping`` is not a positive finite number, or the damped matrix
                is not positive definite (Cholesky) or singular (LU) in this precision.
        """
        check_positive("damping", damping)
        if self._matrix_free:
            self._factor = (damping, None)
            return
        C = self.to_dense().clone()
        C.diagonal().add_(damping)
        if self.positive_semidefinite:
            L, info = torch.linalg.cholesky_ex(C)
            if info.item() != 0:
                raise ValueError(
                    f"the damped {self.what} with damping {damping:g} is not positive definite "
                    "in this precision; raise the damping or use float64."
                )
            if C.dtype == torch.float32:
                warn_float32_condition(condition_number(C, L), f"damped {self.what}")
            self._factor = (damping, L)
        else:
            LU, pivots, info = torch.linalg.lu_factor_ex(C)
            if info.item() != 0:
                raise ValueError(
                    f"the damped {self.what} with damping {damping:g} is singular; change the "
                    "damping."
                )
            self._factor = (damping, (LU, pivots))

    def update(self, batch: RunningCurvature, decay: float) -> None:
        r""":math:`C \leftarrow \varepsilon C + (1 - \varepsilon) C_\text{batch}` on the dense
        matrices (with :math:`\varepsilon = 0` a matrix-free batch is taken over as it is);
        the factorisation stays until the next :meth:`refresh`. The new matrix replaces the old
        one (it is not written in place), so a failure changes nothing.

        Raises:
            ValueError: if ``batch`` is not of the same class and settings, ``decay`` is
                outside ``[0, 1)``, or the average is not finite.
        """
        if type(batch) is not type(self) or batch.settings() != self.settings():
            raise ValueError(f"update needs a {self.what} of the same model and settings.")
        check_unit_interval("ema_decay", decay)
        if not decay and batch._matrix_free:
            self._make_product, self._built_product = batch._make_product, batch._built_product
            self._dense, self._make_dense = None, batch._make_dense
            self.batch_size = batch.batch_size
            return
        dense = batch.to_dense()
        if decay:
            dense = self.to_dense().mul(decay).add_(dense, alpha=1.0 - decay)
        check_finite(dense, f"the running {self.what}")
        self._dense = dense
        self._make_product = self._built_product = None

    @property
    def memory_bytes(self) -> int:
        """The dense matrix and its factorisation where formed; nothing for a product."""
        p = self.layout.numel
        factorised = self._factor is not None and self._factor[1] is not None
        held = (self._dense is not None) + factorised
        return held * p * p * torch.empty((), dtype=self.dtype).element_size()

    @property
    def flops(self) -> Flops:
        """The dense counts, forming :math:`\\sum_{nk} J_n^\\top b b^\\top J_n` (:math:`2NKP^2` for
        the Gram product, Jacobian rows not counted), factorising, two triangular solves."""
        p = self.layout.numel
        return Flops(
            update=2 * self.batch_size * self.num_cotangents * p * p,
            refresh=costmodel.dense_refresh_flops(p),
            solve=costmodel.dense_solve_flops(p),
        )

    def settings(self) -> dict[str, Any]:
        return {"curvature": type(self).__name__, **self._settings}

    def state_dict(self) -> dict[str, Any]:
        damping, factor = self._factor if self._factor is not None else (None, None)
        return {
            "settings": self.settings(),
            "dense": self.to_dense().clone(),
            "batch": self.batch_size,
            "damping": damping,
            "factor": factor,
        }

    @classmethod
    def from_state_dict(
        cls, model: nn.Module, loss_fn: nn.Module, state: dict[str, Any]
    ) -> ExactCurvature:
        layout = ParamLayout.of(model)
        dense = state["dense"].clone()
        settings = dict(state["settings"])
        settings.pop("curvature")
        out = cls(layout, None, dense, dense, state["batch"], settings)
        if out.settings() != state["settings"] or dense.shape != (layout.numel, layout.numel):
            raise ValueError(
                f"the saved {cls.what} has settings {state['settings']} and shape "
                f"{tuple(dense.shape)}; this model needs {out.settings()} and P = {layout.numel}."
            )
        if state["factor"] is not None:
            out._factor = (state["damping"], state["factor"])
        return out

    @classmethod
    def from_batch(
        cls,
        model: nn.Module,
        loss_fn: nn.Module,
        X: Tensor,
        y: Tensor | None = None,
        *,
        kind: FisherKind = "exact",
    ) -> ExactCurvature:
        """The matrix of the batch ``(X, y)``; the Hessian and the GGN have no ``kind``."""
        cls._check_no_kind(kind)
        product = cls._product_of(model, loss_fn, X, y)  # checks the batch now
        dense = lambda: cls._matrix_of(model, loss_fn, X, y)  # noqa: E731
        like = next(model.parameters()).detach()
        return cls(ParamLayout.of(model), lambda: product, dense, like, X.shape[0], {})

    @classmethod
    def _check_no_kind(cls, kind: str) -> None:
        if kind != "exact":
            raise ValueError(
                f"the {cls.what} has no Fisher kind; got kind={kind!r}, accepted: 'exact'."
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
    ) -> LossWatcher:
        """A :class:`LossWatcher`: the matrix of the recorded pass's inputs and labels
        (``mc_samples`` and ``generator`` are unused)."""
        cls._check_no_kind(kind)
        return LossWatcher(model, loss_fn, cls)


class Hessian(ExactCurvature):
    r"""The Hessian :math:`H = \nabla^2_\theta L` (indefinite in general)."""

    positive_semidefinite = False
    what = "Hessian"
    _product_of = staticmethod(curvature.hessian_product)
    _matrix_of = staticmethod(curvature.hessian)


class GGN(ExactCurvature):
    r"""The generalised Gauss-Newton matrix :math:`G = \sum_n J_n^\top (\nabla_f^2 L) J_n`."""

    what = "GGN"
    _product_of = staticmethod(curvature.ggn_product)
    _matrix_of = staticmethod(curvature.ggn)


class Fisher(ExactCurvature):
    r"""The Fisher :math:`F = \sum_{nk} J_n^\top b_{nk} b_{nk}^\top J_n` of ``kind``
    (see :func:`natlib.curvature.fisher`)."""

    what = "Fisher"

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
    ) -> Fisher:
        b = curvature.fisher_cotangents(model, loss_fn, X, y, kind, mc_samples, generator)
        return cls.of_cotangents(model, loss_fn, X, b, kind)

    @classmethod
    def of_cotangents(
        cls, model: nn.Module, loss_fn: nn.Module, X: Tensor, cotangents: Tensor, kind: FisherKind
    ) -> Fisher:
        """The Fisher of output cotangents ``(N, K, C)`` (one draw serves product and dense)."""
        out = cls(
            ParamLayout.of(model),
            lambda: curvature.cotangent_product(model, loss_fn, X, cotangents),
            lambda: curvature.gram_of_cotangents(model, loss_fn, X, cotangents),
            cotangents,
            X.shape[0],
            {"kind": kind},
        )
        out.num_cotangents = cotangents.shape[1]
        return out

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
        return FisherWatcher(model, loss_fn, kind, mc_samples, generator)


class FisherWatcher(Watcher):
    """Keeps the inputs of a training loop's forward pass (and, for ``kind="empirical"``, the
    output gradient of its ``loss.backward()``) and forms the dense Fisher at ``step()`` (or
    another class with :meth:`Fisher.from_batch` and :meth:`Fisher.of_cotangents`)."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        kind: FisherKind,
        mc_samples: int,
        generator: torch.Generator | None,
        curvature: type | None = None,
    ) -> None:
        check_choice("Fisher kind", kind, FisherKind)
        check_positive_int("mc_samples", mc_samples)
        # The class estimated: Fisher, or one with the same from_batch and of_cotangents.
        self.curvature = Fisher if curvature is None else curvature
        self.layout = ParamLayout.of(model)
        self.model, self.loss_fn, self.likelihood = model, loss_fn, likelihood(loss_fn)
        self.kind, self.mc_samples, self.generator = kind, mc_samples, generator
        self._recording: Tensor | None = None  # inputs of the pass being recorded
        self._inputs: Tensor | None = None  # inputs of the last completed pass
        self._output_grad: list[Tensor] = []

    def start(self, inputs: tuple) -> None:
        self._recording, self._inputs, self._output_grad = inputs[0].detach(), None, []

    def finish(self, output: Tensor) -> None:
        if self._recording is None:
            return
        check_tensor("the model output", output)
        self._inputs, self._recording = self._recording, None
        if self.kind == "empirical":
            output.register_hook(lambda g: self._output_grad.append(g.detach()))

    def estimate(self) -> RunningCurvature:
        if self._inputs is None:
            raise RuntimeError("no forward pass was recorded; run the model before step().")
        X, self._inputs = self._inputs, None
        if self.kind != "empirical":
            return self.curvature.from_batch(
                self.model,
                self.loss_fn,
                X,
                kind=self.kind,
                mc_samples=self.mc_samples,
                generator=self.generator,
            )
        if not self._output_grad:
            raise RuntimeError(
                "kind='empirical' needs loss.backward() on the recorded forward pass before step()."
            )
        # The loss's output gradient is r * grad l per example; the cotangent is sqrt(r) grad l.
        gradient = self.likelihood.output_matrix(self._output_grad[0])
        r = self.likelihood.scale(gradient)
        cotangents = (gradient / r**0.5).unsqueeze(1)
        return self.curvature.of_cotangents(self.model, self.loss_fn, X, cotangents, "empirical")

    def remove(self) -> None:
        self._recording = None


@dataclass(frozen=True)
class LabelledBatch:
    """One recorded training pass: the inputs, the targets and the loss value (detached)."""

    X: Tensor
    y: Tensor
    loss: Tensor


class LossWatcher(Watcher):
    """Keeps the inputs of a training loop's forward pass and, from a forward hook on the loss
    module, the targets and value of its next call, ``loss_fn(model(X), y)``; at ``step()``
    forms that batch's matrix of class ``matrix`` (:meth:`ExactCurvature.from_batch`)."""

    def __init__(self, model: nn.Module, loss_fn: nn.Module, matrix: type[ExactCurvature]) -> None:
        self.model, self.loss_fn, self.matrix = model, loss_fn, matrix
        self._recording: Tensor | None = None  # inputs of the pass being recorded
        self._awaiting_loss = False  # the recorded forward pass finished; the loss is next
        self._batch: LabelledBatch | None = None
        self._handle = hooks.register(loss_fn, self, "_loss_called")

    def start(self, inputs: tuple) -> None:
        self._recording, self._awaiting_loss, self._batch = inputs[0].detach(), False, None

    def finish(self, output: Tensor) -> None:
        self._awaiting_loss = self._recording is not None

    def _loss_called(self, module: nn.Module, args: tuple, loss: Tensor) -> None:
        if not self._awaiting_loss or len(args) < 2:
            return
        self._batch = LabelledBatch(self._recording, args[1].detach(), loss.detach())
        self._recording, self._awaiting_loss = None, False

    def batch(self) -> LabelledBatch:
        """The recorded pass (consumed).

        Raises:
            RuntimeError: if no forward pass with gradients enabled was followed by a call of
                the watched loss module with the targets, ``loss_fn(output, y)``.
        """
        if self._batch is None:
            raise RuntimeError(
                f"no labelled pass was recorded for the {self.matrix.what}: call the loss module "
                "given to the optimiser as loss_fn(model(X), y), with gradients enabled, before "
                "step()."
            )
        batch, self._batch = self._batch, None
        return batch

    def estimate(self) -> ExactCurvature:
        batch = self.batch()
        return self.matrix.from_batch(self.model, self.loss_fn, batch.X, batch.y)

    def remove(self) -> None:
        self._handle.remove()
        self._recording, self._awaiting_loss = None, False
