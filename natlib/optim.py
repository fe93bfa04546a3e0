r"""Natural-gradient optimisers as ``torch.optim.Optimizer`` classes, and a small training loop.

Both optimisers watch the model's forward pass through hooks, so they train with the usual
loop; the last forward pass with gradients enabled before ``step()`` supplies the statistics::

    optimizer.zero_grad()
    loss = loss_fn(model(X), y)
    loss.backward()
    optimizer.step()
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from natlib.curvature import fisher as dense_fisher
from natlib.kfac import (
    DAMPING_MODES,
    FISHERS,
    LIKELIHOOD_KIND,
    DampedInverse,
    DampingMode,
    Fisher,
    LinearLayer,
    Recorder,
    check_damping,
    check_finite,
    eigh,
    gradient_factor,
    linear_layers,
)
from natlib.losses import likelihood


def _check_unit(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must lie in [0, 1), got {value!r}.")


def _check_period(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


class KFAC(torch.optim.Optimizer):
    r"""K-FAC (Martens & Grosse, 2015) for models whose parameters all sit in ``nn.Linear``.

    Step :math:`k`, for every layer with gradient matrix :math:`V = [dW \mid db]`:

    1. if :math:`k \bmod T_\text{cov} = 0`: :math:`A \leftarrow \varepsilon A + (1-\varepsilon)
       A_\text{batch}`, likewise :math:`G` (the first update copies), from the recorded
       forward pass (``fisher="mc"``/``"type-2"``: one extra backward pass of sampled or
       factored output cotangents at forward time; ``"empirical"``: the loss's own backward);
    2. if :math:`k \bmod T_\text{inv} = 0`: eigendecompose :math:`A, G` (float32 retried in
       float64) and form the damped inverse (:class:`natlib.kfac.DampedInverse`);
    3. :math:`\Delta = (A \otimes G + \lambda I)^{-1}(V + \omega [W \mid b])` (weight decay
       :math:`\omega`);
    4. KL clipping (Ba, Grosse & Martens, 2017): :math:`\nu = \min(1, \sqrt{\kappa / (\eta^2
       \sum_l \langle \Delta_l, V_l \rangle)})`;
    5. :math:`m \leftarrow \mu m + \nu \Delta`, :math:`[W \mid b] \leftarrow [W \mid b] - \eta m`.

    Args:
        model: the network; its forward pass is hooked.
        loss_fn: the loss the training loop uses (its likelihood drives ``"mc"`` sampling).
        lr, damping, momentum, weight_decay: :math:`\eta`, :math:`\lambda`, :math:`\mu`,
            :math:`\omega` (kept in the parameter group, so schedulers can change them).
        T_cov, T_inv: periods of the factor and inverse updates.
        ema_decay: :math:`\varepsilon`; 0 keeps only the latest batch.
        kl_clip: :math:`\kappa`, or ``None`` for no clipping.
        fisher: ``"mc"``, ``"type-2"`` or ``"empirical"`` (see :func:`natlib.kfac.kfac`).
        damping_mode: ``"pi"`` (factored, two products per layer and step) or ``"exact"``.
        seed: seeds the generator for Monte-Carlo targets (saved in ``state_dict``).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        lr: float = 0.01,
        damping: float = 1e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        T_cov: int = 1,
        T_inv: int = 10,
        ema_decay: float = 0.95,
        kl_clip: float | None = None,
        fisher: Fisher = "mc",
        mc_samples: int = 1,
        damping_mode: DampingMode = "pi",
        seed: int = 0,
    ) -> None:
        if not lr >= 0:
            raise ValueError(f"lr must be non-negative, got {lr!r}.")
        check_damping(damping)
        _check_unit("momentum", momentum)
        _check_unit("ema_decay", ema_decay)
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be non-negative, got {weight_decay!r}.")
        _check_period("T_cov", T_cov)
        _check_period("T_inv", T_inv)
        _check_period("mc_samples", mc_samples)
        if kl_clip is not None and not kl_clip > 0:
            raise ValueError(f"kl_clip must be positive or None, got {kl_clip!r}.")
        if fisher not in FISHERS:
            raise ValueError(f"fisher {fisher!r} is not supported; use one of {FISHERS}.")
        if damping_mode not in DAMPING_MODES:
            raise ValueError(
                f"damping mode {damping_mode!r} is not supported; use one of {DAMPING_MODES}."
            )
        self.layers = linear_layers(model)
        defaults = dict(lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay)
        super().__init__(model.parameters(), defaults)
        self.likelihood = likelihood(loss_fn)
        self.T_cov, self.T_inv, self.ema_decay, self.kl_clip = T_cov, T_inv, ema_decay, kl_clip
        self.fisher, self.mc_samples, self.damping_mode = fisher, mc_samples, damping_mode
        self.steps = 0
        device = next(model.parameters()).device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self._recorder = Recorder(self.layers)
        self._pending: dict[str, Any] | None = None
        self._handles = [
            model.register_forward_pre_hook(self._before_forward),
            model.register_forward_hook(self._after_forward),
        ]

    def remove_hooks(self) -> None:
        """Detach the optimiser from the model's forward pass."""
        self._recorder.remove()
        for handle in self._handles:
            handle.remove()

    def _before_forward(self, module: nn.Module, args: tuple) -> None:
        if torch.is_grad_enabled() and self.steps % self.T_cov == 0:
            self._recorder.start()

    def _after_forward(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        recorder = self._recorder
        if not recorder.active:
            return
        recorder.stop()
        f = self.likelihood.output_matrix(output.detach())
        pending: dict[str, Any] = {"A": recorder.input_factors(), "G": {}}
        if self.fisher == "empirical":
            # G from the loss's own backward: its output gradient is r * grad l, so divide by r.
            r = self.likelihood.scale(f)
            for layer in self.layers:
                recorder.outputs[layer.name].register_hook(self._keep_gradient(layer, r, pending))
        else:
            b = self.likelihood.fisher_cotangents(
                f, LIKELIHOOD_KIND[self.fisher], None, self.mc_samples, self.generator
            )
            cotangents = b.reshape(b.shape[0], *output.shape)
            pending["G"] = recorder.gradient_factors(output, cotangents, retain_graph=True)
        recorder.outputs = {}
        self._pending = pending

    @staticmethod
    def _keep_gradient(
        layer: LinearLayer, r: float, pending: dict[str, Any]
    ) -> Callable[[Tensor], None]:
        def hook(grad: Tensor) -> None:
            pending["G"][layer.name] = gradient_factor(grad.detach()).div_(r)

        return hook

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One K-FAC step; ``closure`` (optional) re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        if self.steps % self.T_cov == 0:
            self._update_factors()
        if self.steps % self.T_inv == 0:
            self._update_inverses(group["damping"])
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        directions, inner = [], 0.0
        for layer in self.layers:
            weight, bias = layer.module.weight, layer.module.bias
            if weight.grad is None or (bias is not None and bias.grad is None):
                raise RuntimeError(
                    f"layer {layer.name!r} has no gradient; call loss.backward() before step()."
                )
            V = layer.join(weight.grad, None if bias is None else bias.grad)
            if wd:
                V = V.add(layer.join(weight, bias), alpha=wd)
            state = self.state[weight]
            delta = DampedInverse(state["inv_left"], state["inv_right"], state.get("inv_scale"))
            directions.append(delta.apply(V))
            if self.kl_clip is not None:
                inner = inner + (directions[-1] * V).sum()
        nu = 1.0
        if self.kl_clip is not None:
            nu = (self.kl_clip / (lr**2 * inner)).sqrt().clamp(max=1.0)
        for layer, delta in zip(self.layers, directions):
            state = self.state[layer.module.weight]
            if mu:
                buffer = state.get("momentum_buffer")
                if buffer is None:
                    state["momentum_buffer"] = buffer = delta.mul_(nu)
                else:
                    buffer.mul_(mu).add_(delta.mul_(nu))
                delta = buffer
            elif self.kl_clip is not None:
                delta = delta.mul_(nu)
            for p, d in zip(layer.module.parameters(), layer.split(delta)):
                p.add_(d, alpha=-lr)
        self.steps += 1
        return loss

    def _update_factors(self) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            raise RuntimeError(
                "no forward pass was recorded for this factor update; run the model on the "
                "batch with gradients enabled (and backward the loss) before step()."
            )
        eps = self.ema_decay
        for layer in self.layers:
            name = layer.name
            if name not in pending["G"]:
                raise RuntimeError(
                    f"layer {name!r} got no output gradient; fisher='empirical' needs "
                    "loss.backward() on the recorded forward pass before step()."
                )
            state = self.state[layer.module.weight]
            for key, new in (("A", pending["A"][name]), ("G", pending["G"][name])):
                check_finite(new, f"factor {key} of layer {name!r}")
                if key in state and eps:
                    state[key].mul_(eps).add_(new, alpha=1.0 - eps)
                else:
                    state[key] = new

    def _update_inverses(self, damping: float) -> None:
        check_damping(damping)
        for layer in self.layers:
            state = self.state[layer.module.weight]
            eigen_a = eigh(state["A"], f"factor A of layer {layer.name!r}")
            eigen_g = eigh(state["G"], f"factor G of layer {layer.name!r}")
            inverse = DampedInverse.of(eigen_a, eigen_g, damping, self.damping_mode)
            state["inv_left"], state["inv_right"] = inverse.left, inverse.right
            if inverse.scale is not None:
                state["inv_scale"] = inverse.scale

    def state_dict(self) -> dict[str, Any]:
        """The optimiser state plus the step counter and the sampling generator's state."""
        state = super().state_dict()
        state["kfac"] = {"steps": self.steps, "generator": self.generator.get_state()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("kfac")
        super().load_state_dict(state_dict)
        self.steps = extra["steps"]
        self.generator.set_state(extra["generator"].clone())


class NGD(torch.optim.Optimizer):
    r"""Damped natural gradient descent with the dense Fisher of the recorded batch:
    :math:`\theta \leftarrow \theta - \eta\,(F + \lambda I)^{-1} \nabla_\theta L` (Amari, 1998),
    :math:`F` from :func:`natlib.curvature.fisher`. Cubic in the parameter count: for small
    models only.

    Args:
        kind: ``"exact"`` or ``"mc"`` (one sampled target per example).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        lr: float = 1.0,
        damping: float = 1e-3,
        kind: Literal["exact", "mc"] = "exact",
        seed: int = 0,
    ) -> None:
        check_damping(damping)
        if kind not in ("exact", "mc"):
            raise ValueError(f"kind {kind!r} is not supported; use 'exact' or 'mc'.")
        super().__init__(model.parameters(), dict(lr=lr, damping=damping))
        self.model, self.loss_fn, self.kind = model, loss_fn, kind
        device = next(model.parameters()).device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self._inputs: Tensor | None = None
        self._handle = model.register_forward_pre_hook(self._keep_inputs)

    def _keep_inputs(self, module: nn.Module, args: tuple) -> None:
        if torch.is_grad_enabled():
            self._inputs = args[0].detach()

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._inputs is None:
            raise RuntimeError("no forward pass was recorded; run the model before step().")
        group = self.param_groups[0]
        params = group["params"]
        with torch.enable_grad():
            F = dense_fisher(
                self.model, self.loss_fn, self._inputs, kind=self.kind, generator=self.generator
            )
        g = torch.cat([p.grad.flatten() for p in params])
        F.diagonal().add_(group["damping"])
        step = torch.cholesky_solve(g.unsqueeze(1), torch.linalg.cholesky(F)).squeeze(1)
        for p, d in zip(params, step.split([p.numel() for p in params])):
            p.add_(d.view_as(p), alpha=-group["lr"])
        return loss


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
) -> Trace:
    """Train with mini-batches (reshuffled every epoch; ``None``: full batch) and record the
    full training loss every ``eval_every`` steps. Stops early when the loss is not finite."""
    n = X.shape[0]
    batch_size = batch_size or n
    generator = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    trace = Trace([], [], [])
    elapsed = 0.0
    for k in range(steps + 1):
        if k % eval_every == 0 or k == steps:
            with torch.no_grad():
                loss = loss_fn(model(X), y).item()
            trace.steps.append(k)
            trace.losses.append(loss)
            trace.seconds.append(elapsed)
            if not math.isfinite(loss):
                break
        if k == steps:
            break
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(n, generator=generator)])
        index, order = order[:batch_size].to(X.device), order[batch_size:]
        start = time.perf_counter()
        optimizer.zero_grad()
        loss_fn(model(X[index]), y[index]).backward()
        optimizer.step()
        if X.is_cuda:
            torch.cuda.synchronize(X.device)
        elapsed += time.perf_counter() - start
    return trace
