r"""Exact curvature behind the one interface: the Hessian, the GGN and the Fisher of a batch.

Each object is matrix-free first: ``matvec`` is a Hessian-, GGN- or Fisher-vector product
(:mod:`natlib.curvature`), and ``solve`` runs conjugate gradients on it unless the dense
matrix is at hand. ``to_dense`` forms the ``(P, P)`` matrix once and keeps it; afterwards
products and solves use it (a Cholesky factorisation of :math:`C + \lambda I` per damping, or
an LU factorisation for the indefinite Hessian). Models with at most :data:`DENSE_LIMIT`
parameters solve densely from the start.

:class:`Fisher` is also a running estimate: ``update`` averages dense matrices, and its
:class:`FisherWatcher` lets :class:`natlib.optim.NGD` train with the usual loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from natlib import costmodel, curvature
from natlib.checks import (
    check_choice,
    check_finite,
    check_positive,
    check_positive_int,
    check_unit_interval,
)
from natlib.interface import Flops, RunningCurvature, Watcher
from natlib.layout import ParamLayout
from natlib.linalg import conjugate_gradient
from natlib.losses import FisherKind, likelihood

DENSE_LIMIT = 4096  # parameters up to which solve forms the dense matrix
CG_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}  # relative residual of solve


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
        ran, else by conjugate gradients to relative residual :data:`CG_TOLERANCE`.

        Raises:
            ValueError: for a bad ``v`` or ``damping``, or if :math:`C + \lambda I` is not
                positive definite where it must be (name the damping to raise).
            RuntimeError: if conjugate gradients do not converge in ``P`` iterations.
        """
        self.layout.check_vector(v)
        check_positive("damping", damping)
        if self._dense is None and self.layout.numel > DENSE_LIMIT and self._make_product:
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
        factor = self._factor[1]
        if self.positive_semidefinite:
            return torch.cholesky_solve(v.unsqueeze(1), factor).squeeze(1)
        return torch.linalg.lu_solve(*factor, v.unsqueeze(1)).squeeze(1)

    @property
    def damping(self) -> float | None:
        return None if self._factor is None else self._factor[0]

    def refresh(self, damping: float) -> None:
        """Factorise :math:`C + \\lambda I`: Cholesky (PSD matrices) or LU (the Hessian)."""
        check_positive("damping", damping)
        C = self.to_dense().clone()
        C.diagonal().add_(damping)
        if self.positive_semidefinite:
            L, info = torch.linalg.cholesky_ex(C)
            if info.item() != 0:
                raise ValueError(
                    f"the damped {self.what} with damping {damping:g} is not positive definite "
                    "in this precision; raise the damping or use float64."
                )
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
        matrices; the factorisation stays until the next :meth:`refresh`."""
        if type(batch) is not type(self) or batch.settings() != self.settings():
            raise ValueError(f"update needs a {self.what} of the same model and settings.")
        check_unit_interval("ema_decay", decay)
        if decay:
            self.to_dense().mul_(decay).add_(batch.to_dense(), alpha=1.0 - decay)
        else:
            self._dense = batch.to_dense()
        check_finite(self._dense, f"the running {self.what}")
        self._make_product = self._built_product = None
        self.batch_size = batch.batch_size

    @property
    def memory_bytes(self) -> int:
        """The dense matrix and its factorisation where formed; nothing for a product."""
        p = self.layout.numel
        held = (self._dense is not None) + (self._factor is not None)
        return held * p * p * torch.empty((), dtype=self.dtype).element_size()

    @property
    def flops(self) -> Flops:
        """Dense counts: forming :math:`\\sum_{nk} J_n^\\top b b^\\top J_n` (:math:`2NKP^2` for
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
        if kind != "exact":
            raise ValueError(f"the {cls.what} has no Fisher kind; got kind={kind!r}.")
        product = cls._product_of(model, loss_fn, X, y)  # checks the batch now
        dense = lambda: cls._matrix_of(model, loss_fn, X, y)  # noqa: E731
        like = next(model.parameters()).detach()
        return cls(ParamLayout.of(model), lambda: product, dense, like, X.shape[0], {})

    @classmethod
    def watch(cls, model: nn.Module, loss_fn: nn.Module, **options: Any) -> Watcher:
        raise ValueError(
            f"the {cls.what} needs the labels, which a training loop's forward pass does not "
            "show; build it with from_batch, or use natlib.exact.Fisher (kind='exact' equals "
            "the GGN for the supported losses)."
        )


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
