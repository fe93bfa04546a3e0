r"""Equal-budget tuning and seeded training runs, for comparing optimisers (chapter 6).

Every method gets a grid of values of its main hyper-parameter; :func:`tune_and_train` runs
each value once on the first seed, keeps the value with the lowest final loss (and that run),
and trains from the other seeds at that value. :func:`train_losses` is the loop: full batch,
losses after every step, failed or diverging runs ended with ``inf``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

Factory = Callable[[nn.Module, nn.Module, float], torch.optim.Optimizer]


@dataclass(frozen=True)
class Method:
    """A training method: ``make(model, loss_fn, value)`` builds its optimiser with the tuned
    hyper-parameter ``value`` (named ``knob``) from ``grid``; ``closure`` methods
    (``torch.optim.LBFGS``) step with a closure."""

    name: str
    knob: str
    grid: tuple[float, ...]
    make: Factory
    closure: bool = False


@dataclass
class Tuned:
    """One method's tuning (final loss at each grid value on the tuning seed) and its runs
    at the chosen value: ``losses[seed][k]`` the full-batch loss after ``k`` steps."""

    method: str
    knob: str
    grid: list[float]
    grid_losses: list[float]
    value: float
    losses: list[list[float]] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    @property
    def interior(self) -> bool:
        """Whether the chosen value is not at an edge of the grid."""
        return self.grid[0] != self.value != self.grid[-1]


def train_losses(
    model: nn.Module,
    loss_fn: nn.Module,
    X: Tensor,
    y: Tensor,
    optimizer: torch.optim.Optimizer,
    steps: int,
    closure: bool = False,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[list[float], float]:
    """Full-batch losses after 0..``steps`` steps (non-finite losses and failed steps end
    the run, its remaining losses set to ``inf``) and the optimiser's seconds on ``clock``
    (``time.process_time``: CPU seconds, less inflated by other processes)."""
    losses, seconds = [], 0.0
    for k in range(steps + 1):
        with torch.no_grad():
            losses.append(loss_fn(model(X), y).item())
        if k == steps or not math.isfinite(losses[-1]):
            break

        def step_closure() -> Tensor:
            optimizer.zero_grad()
            loss = loss_fn(model(X), y)
            loss.backward()
            return loss

        start = clock()
        try:
            if closure:
                optimizer.step(step_closure)
            else:
                step_closure()
                optimizer.step()
        except (ValueError, RuntimeError, FloatingPointError):
            losses.append(math.inf)
            break
        seconds += clock() - start
    losses += [math.inf] * (steps + 1 - len(losses))
    return [loss if math.isfinite(loss) else math.inf for loss in losses], seconds


def digits_methods() -> list[Method]:
    r"""The methods chapter 6 trains, each with a 3-point grid over its main knob: damped
    Newton, saddle-free Newton and Gauss-Newton (:math:`\eta = 1`, damping tuned),
    Hessian-free (initial Levenberg-Marquardt damping tuned, at most 20 CG iterations),
    K-FAC (:math:`\lambda = 10^{-2}`, :math:`T_\text{inv} = 1`, step size tuned), L-BFGS
    (history 10, no line search, step size tuned) and gradient descent (step size tuned).
    Exact NGD takes the same steps as Gauss-Newton here (the Fisher equals the GGN)."""
    from natlib import optim
    from natlib.hessianfree import HessianFree

    return [
        Method("Newton", "damping", (0.3, 1.0, 3.0), lambda m, f, v: optim.Newton(m, f, damping=v)),
        Method(
            "saddle-free Newton",
            "damping",
            (0.003, 0.01, 0.03),
            lambda m, f, v: optim.SaddleFreeNewton(m, f, damping=v),
        ),
        Method(
            "Gauss-Newton = NGD",
            "damping",
            (0.01, 0.03, 0.1),
            lambda m, f, v: optim.GaussNewton(m, f, damping=v),
        ),
        Method(
            "Hessian-free",
            "damping",
            (0.003, 0.03, 0.3),
            lambda m, f, v: HessianFree(m, f, damping=v, cg_max_iter=20),
        ),
        Method(
            "K-FAC",
            "lr",
            (0.3, 1.0, 3.0),
            lambda m, f, v: optim.KFAC(m, f, lr=v, damping=1e-2, T_inv=1),
        ),
        Method(
            "L-BFGS",
            "lr",
            (0.1, 0.3, 1.0),
            lambda m, f, v: torch.optim.LBFGS(m.parameters(), lr=v, max_iter=1, history_size=10),
            closure=True,
        ),
        Method(
            "gradient descent",
            "lr",
            (1.0, 3.0, 10.0),
            lambda m, f, v: torch.optim.SGD(m.parameters(), lr=v),
        ),
    ]


def tune_and_train(
    methods: Sequence[Method],
    model_for_seed: Callable[[int], nn.Module],
    loss_fn: nn.Module,
    X: Tensor,
    y: Tensor,
    steps: int,
    seeds: Sequence[int],
) -> dict[str, Tuned]:
    """Tune each method on the same budget (one run per grid value, on ``seeds[0]``, by the
    final loss), then train it from every seed at the chosen value."""
    results = {}
    for method in methods:
        runs = []
        for value in method.grid:
            model = model_for_seed(seeds[0])
            optimizer = method.make(model, loss_fn, value)
            runs.append(train_losses(model, loss_fn, X, y, optimizer, steps, method.closure))
        finals = [losses[-1] for losses, _ in runs]
        best = min(range(len(finals)), key=lambda i: finals[i])
        tuned = Tuned(method.name, method.knob, list(method.grid), finals, method.grid[best])
        tuned.losses.append(runs[best][0])  # the tuning seed's run at the chosen value
        tuned.seconds.append(runs[best][1])
        for seed in seeds[1:]:
            model = model_for_seed(seed)
            optimizer = method.make(model, loss_fn, tuned.value)
            losses, seconds = train_losses(model, loss_fn, X, y, optimizer, steps, method.closure)
            tuned.losses.append(losses)
            tuned.seconds.append(seconds)
        results[method.name] = tuned
    return results
