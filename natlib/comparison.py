r"""Optimisers compared with equal tuning budgets (chapter 5): every method gets the same number
of learning rates on its own grid, every setting runs on the same seeds, and each method is
judged at its best setting by the median over seeds.

- :data:`METHODS`: how each method is built, with every hyper-parameter but the learning rate
  fixed and stated (:data:`SETTINGS`);
- :func:`train_lbfgs`: ``torch.optim.LBFGS`` on the full batch, one iteration per step;
- :func:`compare_optimizers`: the grid of methods, learning rates and seeds on the digits
  classifier (a tanh MLP, or the small CNN of :func:`natlib.problems.digits_cnn` with
  :data:`CNN_GRIDS`, chapter 3), as a :class:`Comparison`, which picks each method's best
  learning rate, says whether it is interior to the grid, and gives iterations and seconds to a
  target loss as quartiles over seeds.

Seconds are those of the optimiser (evaluations excluded) on ``time.process_time``: CPU
seconds of the process, which other processes on a shared machine do not inflate.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from natlib import optim, problems
from natlib.checks import check_choice, check_positive_int
from natlib.optim import Trace
from natlib.timing import environment, read_json

Builder = Callable[[nn.Module, nn.Module, float, int], torch.optim.Optimizer]

#: Every hyper-parameter but the learning rate, as the book states them.
SETTINGS = {
    "exact NGD": "dense exact Fisher of each batch, damping 0.01",
    "K-FAC": "exact Fisher, damping 0.01 (pi), T_inv = 10, EMA 0.95",
    "EK-FAC": "exact Fisher, damping 0.01, T_inv = 10, EMA 0.95",
    "block-diagonal": "exact Fisher blocks of each batch, damping 0.01",
    "diagonal Fisher": "exact Fisher diagonal, damping 0.01, EMA 0.95",
    "Shampoo": "damping 1e-4 (root), T_inv = 10, EMA 0.99",
    "Adam": "beta = (0.9, 0.999), eps = 1e-8",
    "SGD": "momentum 0.9",
    "L-BFGS": "full batch, history 10, strong Wolfe line search",
}

#: How each method of :data:`SETTINGS` is built for a model, loss, learning rate and seed.
METHODS: dict[str, Builder] = {
    "exact NGD": lambda m, f, lr, s: optim.NGD(m, f, lr=lr, damping=1e-2),
    "K-FAC": lambda m, f, lr, s: optim.KFAC(m, f, lr=lr, damping=1e-2, seed=s),
    "EK-FAC": lambda m, f, lr, s: optim.EKFAC(m, f, lr=lr, damping=1e-2, seed=s),
    "block-diagonal": lambda m, f, lr, s: optim.BlockDiagonalNGD(m, f, lr=lr, damping=1e-2),
    "diagonal Fisher": lambda m, f, lr, s: optim.DiagonalNGD(m, f, lr=lr, damping=1e-2),
    "Shampoo": lambda m, f, lr, s: optim.Shampoo(m, f, lr=lr),
    "Adam": lambda m, f, lr, s: torch.optim.Adam(m.parameters(), lr=lr),
    "SGD": lambda m, f, lr, s: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9),
    "L-BFGS": lambda m, f, lr, s: torch.optim.LBFGS(
        m.parameters(), lr=lr, max_iter=1, history_size=10, line_search_fn="strong_wolfe"
    ),
}

#: Learning rates, three per method, a factor of about 3 apart.
GRIDS = {
    "exact NGD": (0.1, 0.3, 1.0),
    "K-FAC": (0.1, 0.3, 1.0),
    "EK-FAC": (0.1, 0.3, 1.0),
    "block-diagonal": (0.1, 0.3, 1.0),
    "diagonal Fisher": (0.03, 0.1, 0.3),
    "Shampoo": (0.01, 0.03, 0.1),
    "Adam": (0.01, 0.03, 0.1),
    "L-BFGS": (0.3, 1.0, 3.0),
}
#: The digits CNN's methods and learning rates (chapter 3), four per method, about 3 apart.
CNN_GRIDS = {
    "SGD": (0.01, 0.03, 0.1, 0.3),
    "Adam": (0.003, 0.01, 0.03, 0.1),
    "K-FAC": (0.003, 0.01, 0.03, 0.1),
}
#: The channels, budget and target loss of the digits CNN's comparison (:func:`compare_cnn`).
CNN_OPTIONS: dict[str, object] = dict(
    model="cnn", sizes=(8, 16), steps=200, target=0.01, eval_every=5, seeds=5
)
#: The models :func:`compare_optimizers` trains.
Model = Literal["mlp", "cnn"]
#: The schema name of :func:`write_record`'s records (records written before it have none).
SCHEMA = "natlib.comparison/1"


def train_lbfgs(
    model: nn.Module,
    optimizer: torch.optim.LBFGS,
    loss_fn: nn.Module,
    X: Tensor,
    y: Tensor,
    steps: int,
    eval_every: int = 10,
    clock: Callable[[], float] = time.process_time,
) -> Trace:
    """``steps`` iterations of ``torch.optim.LBFGS`` (build it with ``max_iter=1``) on the full
    batch, recorded as :func:`natlib.preconditioned.train` records a run. Stops at a non-finite
    loss."""

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = loss_fn(model(X), y)
        loss.backward()
        return loss

    trace, elapsed = Trace([], [], []), 0.0
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
        start = clock()
        optimizer.step(closure)
        elapsed += clock() - start
    return trace


@dataclass(frozen=True)
class Run:
    """One training run: a method at one learning rate and seed."""

    method: str
    lr: float
    seed: int
    steps: list[int]
    losses: list[float]
    seconds: list[float]

    def first_below(self, target: float) -> tuple[int, float] | None:
        """Steps and seconds at the first evaluation with loss at most ``target``."""
        return Trace(self.steps, self.losses, self.seconds).first_below(target)


@dataclass(frozen=True)
class Comparison:
    """Runs of every method over its grid and seeds on one problem; ``sizes`` are the MLP's
    layer widths, or the CNN's channels (``model``)."""

    problem: str
    sizes: tuple[int, ...]
    steps: int
    batch_size: int
    eval_every: int
    seeds: int
    target: float
    grids: dict[str, list[float]]
    settings: dict[str, str]
    runs: list[Run]
    environment: dict[str, object] = field(default_factory=dict)
    model: Model = "mlp"
    schema: str = SCHEMA

    def runs_of(self, method: str, lr: float) -> list[Run]:
        return [r for r in self.runs if r.method == method and r.lr == lr]

    def iterations(self, method: str, lr: float) -> list[float]:
        """Iterations to ``target`` per seed (``inf``: not reached)."""
        hits = [r.first_below(self.target) for r in self.runs_of(method, lr)]
        return [float(h[0]) if h else math.inf for h in hits]

    def seconds(self, method: str, lr: float) -> list[float]:
        """Optimiser seconds to ``target`` per seed (``inf``: not reached)."""
        hits = [r.first_below(self.target) for r in self.runs_of(method, lr)]
        return [h[1] if h else math.inf for h in hits]

    def final_loss(self, method: str, lr: float) -> float:
        """Median over seeds of the last loss (``inf`` for a diverged run)."""
        last = [r.losses[-1] for r in self.runs_of(method, lr)]
        return float(np.median([x if math.isfinite(x) else math.inf for x in last]))

    def best(self, method: str) -> float:
        """The learning rate with the fewest median iterations to the target, ties (and
        settings that do not reach it) broken by the lower median final loss."""
        return min(
            self.grids[method],
            key=lambda lr: (np.median(self.iterations(method, lr)), self.final_loss(method, lr)),
        )

    def interior(self, method: str) -> bool:
        """Whether the best learning rate is neither end of the grid."""
        grid = self.grids[method]
        return self.best(method) not in (grid[0], grid[-1])

    def report(self) -> str:
        """Each method's best learning rate and its median iterations and seconds to the
        target."""
        sizes = "-".join(map(str, self.sizes))
        network = f"tanh MLP {sizes}" if self.model == "mlp" else f"ReLU CNN, channels {sizes}"
        lines = [
            f"digits classifier, {network}, {self.steps} steps of batch {self.batch_size}"
            f"{' (L-BFGS: full batch)' if 'L-BFGS' in self.grids else ''}, {self.seeds} seeds, "
            f"target loss {self.target:g}",
            f"  {'method':16s} {'lr':>6s} {'interior':>9s} {'iterations':>11s} {'CPU s':>8s}",
        ]
        for method in self.grids:
            lr = self.best(method)
            iterations = self.quartiles(self.iterations(method, lr))[1]
            seconds = self.quartiles(self.seconds(method, lr))[1]
            lines.append(
                f"  {method:16s} {lr:6g} {str(self.interior(method)):>9s} "
                f"{iterations:11.0f} {seconds:8.2f}"
            )
        return "\n".join(lines)

    def quartiles(self, values: Sequence[float]) -> tuple[float, float, float]:
        """25th, 50th and 75th percentiles (``inf`` where runs did not reach the target)."""
        with np.errstate(invalid="ignore"):  # inf - inf between two unreached runs
            quartiles = np.percentile(np.array(values, dtype=float), [25, 50, 75])
        low, mid, high = np.nan_to_num(quartiles, nan=math.inf)
        return float(low), float(mid), float(high)


def compare_optimizers(
    sizes: Sequence[int] = (64, 16, 10),
    steps: int = 60,
    seeds: int = 5,
    target: float = 0.1,
    batch_size: int = 128,
    eval_every: int = 2,
    methods: Sequence[str] | None = None,
    grids: dict[str, Sequence[float]] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float64,
    model: Model = "mlp",
) -> Comparison:
    """Train a tanh MLP with ``sizes`` (``model="cnn"``: :func:`natlib.problems.digits_cnn`
    with channels ``sizes``), seeded by the run's seed, on the digits classifier with every
    method of ``grids`` (default :data:`GRIDS`) or of ``methods``, at every learning rate of
    its grid and seeds ``0 .. seeds - 1``: mini-batches of ``batch_size`` (L-BFGS: the full
    batch) for ``steps`` steps, the full training loss every ``eval_every`` steps; in ``dtype``
    whatever torch's default."""
    check_positive_int("seeds", seeds)
    check_choice("model", model, Model)
    data = problems.digits(dtype=dtype, device=device)
    grids = {m: list(g) for m, g in (grids or GRIDS).items()}
    chosen = list(methods or grids)
    runs = []
    for method in chosen:
        for lr in grids[method]:
            for seed in range(seeds):
                net = _network(model, sizes, seed, dtype).to(device)
                optimizer = METHODS[method](net, data.loss_fn, lr, seed)
                if method == "L-BFGS":
                    trace = train_lbfgs(net, optimizer, data.loss_fn, data.X_train,
                                        data.y_train, steps, eval_every)  # fmt: skip
                else:
                    trace = optim.train(net, optimizer, data.loss_fn, data.X_train,
                                        data.y_train, steps, batch_size, eval_every, seed,
                                        clock=time.process_time)  # fmt: skip
                runs.append(Run(method, lr, seed, trace.steps, trace.losses, trace.seconds))
    return Comparison(
        problem="digits",
        sizes=tuple(sizes),
        steps=steps,
        batch_size=batch_size,
        eval_every=eval_every,
        seeds=seeds,
        target=target,
        grids={m: grids[m] for m in chosen},
        settings={m: SETTINGS[m] for m in chosen},
        runs=runs,
        environment=environment(torch.device(device))
        | {"clock": "CPU time of the process", "dtype": str(dtype).removeprefix("torch.")},
        model=model,
    )


def compare_cnn(**options: object) -> Comparison:
    """:func:`compare_optimizers` on the digits CNN (chapter 3): :data:`CNN_OPTIONS` and
    :data:`CNN_GRIDS`, which ``options`` override."""
    return compare_optimizers(**(CNN_OPTIONS | {"grids": CNN_GRIDS} | options))


def _network(model: Model, sizes: Sequence[int], seed: int, dtype: torch.dtype) -> nn.Module:
    """The MLP drawn in ``dtype``; the CNN drawn in float32 whatever torch's default (as the
    command line draws it), then cast."""
    if model == "mlp":
        return problems.mlp(list(sizes), seed=seed, dtype=dtype)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        return problems.digits_cnn(tuple(sizes), seed=seed).to(dtype)
    finally:
        torch.set_default_dtype(previous)


def write_record(comparison: Comparison, path: Path) -> None:
    """Write a :class:`Comparison` as JSON (``book/data/`` keeps recorded runs)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(comparison)) + "\n")


def read_record(path: Path) -> Comparison:
    """A :class:`Comparison` from :func:`write_record`'s JSON (:data:`SCHEMA`, or none for
    records written before it).

    Raises:
        ValueError: if the file holds another schema or misses or adds a field.
    """
    data = read_json(path, SCHEMA, legacy=True)
    try:
        data["runs"] = [Run(**run) for run in data["runs"]]
        data["sizes"] = tuple(data["sizes"])
        return Comparison(**data)
    except (KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a complete {SCHEMA} record: {error!r}") from None
