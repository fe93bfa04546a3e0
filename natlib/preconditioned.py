r"""The preconditioned optimiser every natural-gradient method of natlib configures, and a
small training loop (:func:`train`; :func:`train_lbfgs` for ``torch.optim.LBFGS`` on the full
batch, one iteration per step).

:class:`PreconditionedOptimizer` is parametrised by a curvature class of
:mod:`natlib.interface`; it watches the model's forward pass through hooks, so it trains with
the usual loop, and the last forward pass with gradients enabled before ``step()`` supplies the
statistics::

    optimizer.zero_grad()
    loss = loss_fn(model(X), y)
    loss.backward()
    optimizer.step()

Its configurations (K-FAC, NGD, Newton, ...) are in :mod:`natlib.optim`, which re-exports
this module's names.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from natlib import hooks
from natlib.checks import (
    NonFiniteError,
    check_finite,
    check_integer,
    check_non_negative,
    check_positive,
    check_positive_int,
    check_unit_interval,
)
from natlib.interface import Communicator, RunningCurvature
from natlib.layout import ParamLayout
from natlib.losses import FisherKind


class PreconditionedOptimizer(torch.optim.Optimizer):
    r"""Preconditioned gradient descent with a running curvature estimate :math:`C`.

    Step :math:`k`, with gradient :math:`g` (flat, in parameter order):

    1. if :math:`k \bmod T_\text{cov} = 0`: :math:`C \leftarrow \varepsilon C + (1 -
       \varepsilon) C_\text{batch}` (``update``; the first one copies), from the recorded
       forward (and backward) pass;
    2. if :math:`k \bmod T_\text{inv} = 0`: ``refresh`` the inverse for the current damping;
    3. :math:`\Delta = (C + \lambda I)^{-1}(g + \omega\theta)` with the last refreshed inverse
       (weight decay :math:`\omega`);
    4. KL clipping (Ba, Grosse & Martens, 2017): :math:`\nu = \min(1, \sqrt{\kappa /
       (\eta^2 \langle \Delta, g + \omega\theta \rangle)})`;
    5. :math:`m \leftarrow \mu m + \nu \Delta`, :math:`\theta \leftarrow \theta - \eta m`.

    Args:
        model: the network; its forward pass is hooked (hooks hold the optimiser weakly, so a
            copied or pickled model is a plain model).
        loss_fn: the loss the training loop uses (its likelihood drives the Fisher).
        curvature: the :class:`natlib.interface.RunningCurvature` class to estimate.
        lr, damping, momentum, weight_decay: :math:`\eta`, :math:`\lambda`, :math:`\mu`,
            :math:`\omega` (kept in the parameter group, so schedulers can change them).
        T_cov, T_inv: periods of the curvature update and of the refresh.
        ema_decay: :math:`\varepsilon`; 0 keeps only the latest batch.
        kl_clip: :math:`\kappa`, or ``None`` for no clipping.
        kind: the Fisher, ``"exact"``, ``"mc"`` or ``"empirical"``.
        mc_samples: targets drawn per example for ``kind="mc"``.
        seed: seeds the generator for Monte-Carlo targets (saved in ``state_dict``); each
            process of a distributed run seeds it with ``communicator.seed(seed)``.
        communicator: the :class:`natlib.interface.Communicator` hook that shares the curvature
            between processes before each refresh (:mod:`natlib.distributed`); ``None``, the
            single process, communicates nothing.
        options: passed to the curvature class (e.g. K-FAC's ``damping_mode``).

    Raises:
        ValueError: for a non-finite or out-of-range hyper-parameter (at construction and at
            every step), a non-finite gradient (naming the parameter), an unsupported model
            or loss, or a ``state_dict`` saved under other settings.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        curvature: type[RunningCurvature],
        lr: float,
        damping: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        T_cov: int = 1,
        T_inv: int = 1,
        ema_decay: float = 0.0,
        kl_clip: float | None = None,
        kind: FisherKind = "exact",
        mc_samples: int = 1,
        seed: int = 0,
        communicator: Communicator | None = None,
        **options: Any,
    ) -> None:
        defaults = dict(lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay)
        self._check_group(defaults)
        check_positive_int("T_cov", T_cov)
        check_positive_int("T_inv", T_inv)
        check_unit_interval("ema_decay", ema_decay)
        if kl_clip is not None:
            check_positive("kl_clip", kl_clip)
        self.layout = ParamLayout.of(model)
        super().__init__(model.parameters(), defaults)
        self.model, self.loss_fn, self.curvature_class = model, loss_fn, curvature
        self.T_cov, self.T_inv, self.ema_decay, self.kl_clip = T_cov, T_inv, ema_decay, kl_clip
        self.kind, self.mc_samples, self.options = kind, mc_samples, options
        self.steps = 0
        self.curvature: RunningCurvature | None = None
        self.communicator = Communicator() if communicator is None else communicator
        device = next(model.parameters()).device
        self.generator = torch.Generator(device=device).manual_seed(self.communicator.seed(seed))
        # The watcher checks kind and mc_samples.
        self.watcher = curvature.watch(
            model, loss_fn, kind=kind, mc_samples=mc_samples, generator=self.generator, **options
        )
        self._handles = [
            hooks.register(model, self, "_before_forward", pre=True),
            hooks.register(model, self, "_after_forward"),
        ]

    @staticmethod
    def _check_group(group: dict[str, Any]) -> None:
        """The hyper-parameters a scheduler may change, checked at construction and every
        step."""
        check_non_negative("lr", group["lr"])
        check_positive("damping", group["damping"])
        check_unit_interval("momentum", group["momentum"])
        check_non_negative("weight_decay", group["weight_decay"])

    def remove_hooks(self) -> None:
        """Detach the optimiser from the model's forward pass."""
        self.watcher.remove()
        for handle in self._handles:
            handle.remove()

    def _before_forward(self, module: nn.Module, args: tuple) -> None:
        if torch.is_grad_enabled() and self.steps % self.T_cov == 0:
            self.watcher.start(args)

    def _after_forward(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        self.watcher.finish(output)

    def settings(self) -> dict[str, Any]:
        """What the saved state depends on: curvature, kind, its options, parameter shapes."""
        return {
            "curvature": self.curvature_class.__name__,
            "kind": self.kind,
            "mc_samples": self.mc_samples,
            "options": dict(self.options),
            "parameters": [(n, tuple(s)) for n, s in zip(self.layout.names, self.layout.shapes)],
        }

    def _gradient(self, group: dict[str, Any]) -> Tensor:
        """:math:`g + \\omega\\theta`, flat; names the parameter whose gradient is missing or
        not finite."""
        parts = []
        for name, p in zip(self.layout.names, group["params"]):
            if p.grad is None:
                raise RuntimeError(
                    f"parameter {name!r} has no gradient; call loss.backward() before step()."
                )
            check_finite(p.grad, f"the gradient of parameter {name!r}")
            parts.append(p.grad.reshape(-1))
        g = torch.cat(parts)
        if group["weight_decay"]:
            g = g.add(
                torch.cat([p.reshape(-1) for p in group["params"]]), alpha=group["weight_decay"]
            )
        return g

    def _begin_step(
        self, closure: Callable[[], Tensor] | None
    ) -> tuple[Tensor | None, dict[str, Any], Tensor]:
        """Run ``closure`` (if any) with gradients enabled; return its loss, the checked
        parameter group and the flat gradient :math:`g + \\omega\\theta`."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        self._check_group(group)
        return loss, group, self._gradient(group)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One preconditioned step; ``closure`` (optional) re-evaluates the model and returns
        the loss.

        Raises:
            ValueError: for a hyper-parameter of the parameter group that is out of range or
                not finite, a gradient with NaN or Inf (naming the parameter), or a fault in
                the curvature (non-finite factors or direction, a failed decomposition,
                naming the layer); parameters and optimiser state are then unchanged.
            RuntimeError: if a gradient is missing or no forward pass was recorded.
        """
        refresh = self.steps % self.T_inv == 0
        with self.communicator.guard(refresh):  # other processes learn of a failure here
            loss, group, g = self._begin_step(closure)
            # Work on a copy (update and refresh replace tensors, they never write into them)
            # and keep it only once the step is sure to succeed, so a failure changes nothing.
            curvature = copy.copy(self.curvature)
            if self.steps % self.T_cov == 0:
                batch = self.watcher.estimate()
                if curvature is None:
                    curvature = batch
                else:
                    curvature.update(batch, self.ema_decay)
        if refresh:
            self.communicator.reduce_factors(curvature)
            self.communicator.refresh(curvature, group["damping"])
        delta = curvature.solve(g, curvature.damping)  # the last refresh's inverse
        check_finite(delta, "the preconditioned gradient")
        self.curvature = curvature
        lr, mu = group["lr"], group["momentum"]
        nu = 1.0
        if self.kl_clip is not None:
            nu = (self.kl_clip / (lr**2 * (delta @ g))).sqrt().clamp(max=1.0)
        for p, d in zip(group["params"], self.layout.split(delta)):
            if self.kl_clip is not None or mu:
                d = d.mul(nu)
            if mu:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = d.clone()
                else:
                    state["momentum_buffer"].mul_(mu).add_(d)
                d = state["momentum_buffer"]
            p.add_(d, alpha=-lr)
        self.steps += 1
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The optimiser state plus the step counter, the sampling generator's state, the
        settings and the running curvature."""
        state = super().state_dict()
        state["natlib"] = {
            "settings": self.settings(),
            "steps": self.steps,
            "generator": self.generator.get_state(),
            "curvature": None if self.curvature is None else self.curvature.state_dict(),
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`, after checking it was saved under the same settings.

        Raises:
            ValueError: if the state lacks natlib's part or its settings differ (curvature,
                kind, damping mode, parameter shapes); nothing is changed then.
        """
        if "natlib" not in state_dict:
            raise ValueError("this state_dict was not saved by a natlib optimiser.")
        state_dict = dict(state_dict)
        extra = state_dict.pop("natlib")
        if extra["settings"] != self.settings():
            raise ValueError(
                f"the state_dict was saved with settings {extra['settings']}, this optimiser "
                f"has {self.settings()}."
            )
        curvature = None
        if extra["curvature"] is not None:
            curvature = self.curvature_class.from_state_dict(
                self.model, self.loss_fn, extra["curvature"]
            )
        super().load_state_dict(state_dict)
        self.steps = extra["steps"]
        self.generator.set_state(extra["generator"].clone())
        self.curvature = curvature


@dataclass(frozen=True)
class Trace:
    """A training run: full-batch training loss after ``steps[i]`` steps and the optimiser's
    cumulative wall-clock ``seconds[i]`` (evaluations excluded)."""

    steps: list[int]
    losses: list[float]
    seconds: list[float]

    def first_below(self, target: float) -> tuple[int, float] | None:
        """Steps and seconds at the first evaluation with loss at most ``target``."""
        for k, loss, s in zip(self.steps, self.losses, self.seconds):
            if loss <= target:
                return k, s
        return None

    def checkpoint(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        X: Tensor,
        y: Tensor,
        step: int,
        steps: int,
        eval_every: int,
        seconds: float,
        target: float | None = None,
    ) -> bool:
        """Evaluate after ``step`` of ``steps`` steps when it is a multiple of ``eval_every`` or
        the last; whether training stops here (the last step, or :meth:`evaluate` says so)."""
        if step % eval_every == 0 or step == steps:
            return self.evaluate(model, loss_fn, X, y, step, seconds, target) or step == steps
        return False

    def evaluate(
        self, model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor, step: int,
        seconds: float, target: float | None = None,
    ) -> bool:  # fmt: skip
        """Record the full-batch loss after ``step`` steps; whether training should stop (the
        loss is not finite, or at most ``target``)."""
        with torch.no_grad():
            loss = loss_fn(model(X), y).item()
        self.steps.append(step)
        self.losses.append(loss)
        self.seconds.append(seconds)
        return not math.isfinite(loss) or (target is not None and loss <= target)


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    X: Tensor,
    y: Tensor,
    steps: int,
    batch_size: int | None = None,
    eval_every: int = 10,
    seed: int = 0,
    clock: Callable[[], float] = time.perf_counter,
    target: float | None = None,
) -> Trace:
    """Train with mini-batches (reshuffled every epoch; ``None``: full batch) and record the
    full training loss every ``eval_every`` steps, and the optimiser's seconds on ``clock``
    (``time.process_time``: CPU seconds, which other processes do not inflate). Stops early
    when the loss is not finite or a step raises :class:`~natlib.checks.NonFiniteError`
    (recorded as an infinite loss after it), or at the first evaluation at most ``target``
    (if given).

    Raises:
        ValueError: if ``steps`` is negative, ``batch_size`` (when given) or ``eval_every`` is
            not a positive integer, or ``X`` and ``y`` hold different numbers of examples.
    """
    check_integer("steps", steps, 0)
    check_positive_int("eval_every", eval_every)
    if batch_size is not None:
        check_positive_int("batch_size", batch_size)
    n = X.shape[0]
    if y.shape[:1] != (n,):
        raise ValueError(
            f"X of shape {tuple(X.shape)} and y of shape {tuple(y.shape)} hold different "
            "numbers of examples."
        )
    batch_size = batch_size or n
    generator = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    trace = Trace([], [], [])
    elapsed = 0.0
    for k in range(steps + 1):
        if trace.checkpoint(model, loss_fn, X, y, k, steps, eval_every, elapsed, target):
            break
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(n, generator=generator)])
        index, order = order[:batch_size].to(X.device), order[batch_size:]
        start = clock()
        try:
            optimizer.zero_grad()
            loss_fn(model(X[index]), y[index]).backward()
            optimizer.step()
        except NonFiniteError:  # a natlib optimiser met NaN or Inf: the run diverged
            trace.steps.append(k + 1)
            trace.losses.append(math.inf)
            trace.seconds.append(elapsed + clock() - start)
            break
        if X.is_cuda:
            torch.cuda.synchronize(X.device)
        elapsed += clock() - start
    return trace


def train_lbfgs(
    model: nn.Module,
    optimizer: torch.optim.LBFGS,
    loss_fn: nn.Module,
    X: Tensor,
    y: Tensor,
    steps: int,
    eval_every: int = 10,
    clock: Callable[[], float] = time.process_time,
    target: float | None = None,
) -> Trace:
    """``steps`` iterations of ``torch.optim.LBFGS`` (build it with ``max_iter=1``) on the full
    batch, recorded as :func:`train` records a run. Stops at a non-finite loss, or at the
    first evaluation at most ``target`` (if given)."""

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = loss_fn(model(X), y)
        loss.backward()
        return loss

    trace, elapsed = Trace([], [], []), 0.0
    for k in range(steps + 1):
        if trace.checkpoint(model, loss_fn, X, y, k, steps, eval_every, elapsed, target):
            break
        start = clock()
        optimizer.step(closure)
        elapsed += clock() - start
    return trace
