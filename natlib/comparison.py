r"""Optimisers compared with equal tuning budgets (chapter 5): every method gets the same number
of learning rates on its own grid, every setting runs on the same seeds, and each method is
judged at its best setting by the median over seeds.

- :data:`METHODS`: how each method is built, with every hyper-parameter but the learning rate
  fixed and stated (:func:`settings`);
- :data:`TASKS`: the problems compared (the digits classifier, the digits autoencoder, both
  with tanh MLPs, chapter 5; the digits classifier with the small CNN of
  :func:`natlib.problems.digits_cnn`, chapter 3), each with its network, budget, target loss
  and grids;
- :func:`compare_optimizers`: the grid of methods, learning rates and seeds on one task, as a
  :class:`Comparison`, which picks each method's best learning rate, says whether it is
  interior to the grid, and gives iterations and seconds to a target loss as quartiles over
  seeds. ``python -m natlib bench training [--problem autoencoder]`` records it.

Runs take one torch thread; seconds are those of the optimiser (evaluations excluded) on
``time.process_time``: CPU seconds of the process, which other processes on a shared machine
do not inflate.
"""

from __future__ import annotations

import json
import math
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from natlib import optim, problems, runtime
from natlib.checks import check_choice, check_positive_int
from natlib.exact import DENSE_LIMIT
from natlib.linalg import CG_TOLERANCE
from natlib.losses import FisherKind
from natlib.optim import Trace
from natlib.preconditioned import train_lbfgs
from natlib.timing import environment

#: The schema name written into every comparison record.
SCHEMA = "natlib.comparison/1"

Builder = Callable[[nn.Module, nn.Module, float, int, FisherKind], torch.optim.Optimizer]

_FISHER = {"exact": "exact Fisher", "mc": "Monte-Carlo Fisher (one sampled label per example)"}

#: Every hyper-parameter but the learning rate, as the book states them (``{fisher}``: the
#: Fisher the task uses: exact or Monte-Carlo).
SETTINGS = {
    "exact NGD": "{fisher} of each batch, damping 0.01; dense Cholesky up to "
    f"{DENSE_LIMIT:,} parameters, conjugate gradients to relative residual "
    f"{CG_TOLERANCE[torch.float64]:g} beyond",
    "K-FAC": "{fisher}, damping 0.01 (pi), T_inv = 10, EMA 0.95",
    "EK-FAC": "{fisher}, damping 0.01, T_inv = 10, EMA 0.95",
    "block-diagonal": "{fisher} blocks of each batch, damping 0.01",
    "diagonal Fisher": "{fisher} diagonal, damping 0.01, EMA 0.95",
    "Shampoo": "damping 1e-4 (root), T_inv = 10, EMA 0.99",
    "Adam": "beta = (0.9, 0.999), eps = 1e-8",
    "SGD": "momentum 0.9",
    "L-BFGS": "full batch, history 10, strong Wolfe line search",
}

#: How each method of :data:`SETTINGS` is built for a model, loss, learning rate, seed and
#: Fisher kind (Shampoo, Adam and L-BFGS use the loop's gradient whatever the kind).
METHODS: dict[str, Builder] = {
    "exact NGD": lambda m, f, lr, s, k: optim.NGD(m, f, lr=lr, damping=1e-2, kind=k, seed=s),
    "K-FAC": lambda m, f, lr, s, k: optim.KFAC(m, f, lr=lr, damping=1e-2, kind=k, seed=s),
    "EK-FAC": lambda m, f, lr, s, k: optim.EKFAC(m, f, lr=lr, damping=1e-2, kind=k, seed=s),
    "block-diagonal": lambda m, f, lr, s, k: optim.BlockDiagonalNGD(
        m, f, lr=lr, damping=1e-2, kind=k, seed=s
    ),
    "diagonal Fisher": lambda m, f, lr, s, k: optim.DiagonalNGD(
        m, f, lr=lr, damping=1e-2, kind=k, seed=s
    ),
    "Shampoo": lambda m, f, lr, s, k: optim.Shampoo(m, f, lr=lr),
    "Adam": lambda m, f, lr, s, k: torch.optim.Adam(m.parameters(), lr=lr),
    "SGD": lambda m, f, lr, s, k: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9),
    "L-BFGS": lambda m, f, lr, s, k: torch.optim.LBFGS(
        m.parameters(), lr=lr, max_iter=1, history_size=10, line_search_fn="strong_wolfe"
    ),
}


# The networks a task trains: a tanh MLP (``sizes``: its widths) or the digits CNN
# (``sizes``: its channels).
Network = Literal["mlp", "cnn"]


@dataclass(frozen=True)
class Task:
    """One problem of the comparison: the data (a function of :mod:`natlib.problems`), the
    network, the budget, the target loss, the methods (the keys of ``grids``) with an equal
    number of learning rates each, the Fisher each Fisher-based method estimates (``kinds``,
    default exact), the methods left out, with the reason, and whether a run stops at its
    first evaluation at or below the target (it saves the time of runs that have answered the
    question)."""

    title: str
    data: str
    sizes: tuple[int, ...]
    steps: int
    batch_size: int
    eval_every: int
    target: float
    grids: dict[str, tuple[float, ...]]
    kinds: dict[str, FisherKind] = field(default_factory=dict)
    left_out: dict[str, str] = field(default_factory=dict)
    stop_at_target: bool = False
    network: Network = "mlp"


#: The compared problems, by the name ``--problem`` takes.
TASKS: dict[str, Task] = {
    "digits": Task(
        title="digits classifier",
        data="digits",
        sizes=(64, 16, 10),
        steps=60,
        batch_size=128,
        eval_every=2,
        target=0.1,
        grids={
            "exact NGD": (0.03, 0.1, 0.3, 1.0, 3.0),
            "K-FAC": (0.03, 0.1, 0.3, 1.0, 3.0),
            "EK-FAC": (0.01, 0.03, 0.1, 0.3, 1.0),
            "block-diagonal": (0.03, 0.1, 0.3, 1.0, 3.0),
            "diagonal Fisher": (0.01, 0.03, 0.1, 0.3, 1.0),
            "Shampoo": (0.01, 0.03, 0.1, 0.3, 1.0),
            "Adam": (0.003, 0.01, 0.03, 0.1, 0.3),
            "L-BFGS": (0.03, 0.1, 0.3, 1.0, 3.0),
        },
    ),
    "autoencoder": Task(
        title="digits autoencoder",
        data="digits_autoencoder",
        sizes=(64, 32, 16, 8, 16, 32, 64),
        steps=300,
        batch_size=128,
        eval_every=5,
        target=0.37,
        grids={
            "exact NGD": (0.1, 0.3, 1.0, 3.0, 10.0),
            "K-FAC": (0.03, 0.1, 0.3, 1.0, 3.0),
            "EK-FAC": (0.03, 0.1, 0.3, 1.0, 3.0),
            "diagonal Fisher": (0.01, 0.03, 0.1, 0.3, 1.0),
            "Shampoo": (0.003, 0.01, 0.03, 0.1, 0.3),
            "Adam": (0.003, 0.01, 0.03, 0.1, 0.3),
            "L-BFGS": (0.003, 0.01, 0.03, 0.1, 0.3),
        },
        kinds={"diagonal Fisher": "mc"},
        left_out={
            "block-diagonal": "it forms its exact layer blocks (up to 2,112 x 2,112) from a "
            "backward pass per output and example, and factorises them, at every step",
        },
        stop_at_target=True,
    ),
    "cnn": Task(
        title="digits classifier",
        data="digits",
        network="cnn",
        sizes=(8, 16),
        steps=200,
        batch_size=128,
        eval_every=5,
        target=0.01,
        grids={
            "SGD": (0.01, 0.03, 0.1, 0.3),
            "Adam": (0.003, 0.01, 0.03, 0.1),
            "K-FAC": (0.003, 0.01, 0.03, 0.1),
        },
    ),
}
GRIDS = TASKS["digits"].grids


def settings(method: str, kind: FisherKind = "exact") -> str:
    """Every hyper-parameter of ``method`` but the learning rate, for the Fisher ``kind``."""
    return SETTINGS[method].format(fisher=_FISHER[kind])


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
    """Runs of every method over its grid and seeds on one task of :data:`TASKS` (``problem``
    names it); ``left_out`` gives each method not run and why."""

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
    left_out: dict[str, str] = field(default_factory=dict)
    stop_at_target: bool = False
    model: Network = "mlp"
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
        model = f"tanh MLP {sizes}" if self.model == "mlp" else f"ReLU CNN, channels {sizes}"
        lines = [
            f"{TASKS[self.problem].title}, {model}, {self.steps} steps of batch "
            f"{self.batch_size}{' (L-BFGS: full batch)' if 'L-BFGS' in self.grids else ''}, "
            f"{self.seeds} seeds, target loss {self.target:g}",
            f"  {'method':16s} {'lr':>6s} {'interior':>9s} {'iterations':>11s} {'CPU s':>8s}",
        ]
        for method in self.grids:
            iterations, seconds = self.at_best(method)
            lines.append(
                f"  {method:16s} {self.best(method):6g} {str(self.interior(method)):>9s} "
                f"{iterations[1]:11.0f} {seconds[1]:8.2f}"
            )
        lines += [f"  left out: {method}: {why}" for method, why in self.left_out.items()]
        return "\n".join(lines)

    def at_best(self, method: str) -> tuple[tuple[float, float, float], ...]:
        """Quartiles over seeds of the iterations and of the seconds to the target, at the
        best learning rate."""
        lr = self.best(method)
        return self.quartiles(self.iterations(method, lr)), self.quartiles(self.seconds(method, lr))

    def reached(self, method: str) -> int:
        """How many seeds reach the target at the best learning rate."""
        return sum(math.isfinite(k) for k in self.iterations(method, self.best(method)))

    def grid_table(self) -> str:
        """Each method's grid with its best learning rate (marked at an edge), and its other
        hyper-parameters, for a 78-column page."""
        lines = [f"{'method':16s} {'learning rates':>26s}  {'best':>5s}"]
        for method, grid in self.grids.items():
            edge = "" if self.interior(method) else " (edge)"
            values = " ".join(f"{v:g}" for v in grid)
            lines += [f"{method:16s} {values:>26s}  {self.best(method):5g}{edge}"]
            lines += textwrap.wrap(self.settings[method], 76, initial_indent="  ",
                                   subsequent_indent="  ")  # fmt: skip
        return "\n".join(lines)

    def target_table(self) -> str:
        """Median [quartiles] over seeds of the iterations and CPU seconds to the target at
        each method's best learning rate, and how many seeds reach it."""
        lines = [
            f"to training loss {self.target:g}: median [quartiles] over {self.seeds} seeds",
            f"{'method':16s} {'reached':>7s} {'iterations':>16s} {'CPU seconds':>22s}",
        ]
        for method in self.grids:
            (i0, i1, i2), (s0, s1, s2) = self.at_best(method)
            lines.append(
                f"{method:16s} {self.reached(method):4d}/{self.seeds:<2d} "
                f"{i1:5.0f} [{i0:3.0f}, {i2:3.0f}]  {s1:8.2f} [{s0:5.2f}, {s2:5.2f}]"
            )
        return "\n".join(lines)

    def quartiles(self, values: Sequence[float]) -> tuple[float, float, float]:
        """25th, 50th and 75th percentiles (``inf`` where runs did not reach the target): an
        unreached run counts as larger than any reached one, and a percentile that falls on
        or next to one is ``inf``."""
        big = np.finfo(float).max / 4  # stands for inf: interpolating with inf gives nan
        finite = np.minimum(np.array(values, dtype=float), big)
        quartiles = np.percentile(finite, [25, 50, 75])
        low, mid, high = np.where(quartiles > big / 2**20, math.inf, quartiles)
        return float(low), float(mid), float(high)


def compare_optimizers(
    problem: str = "digits",
    *,
    seeds: int = 5,
    steps: int | None = None,
    methods: Sequence[str] | None = None,
    grids: dict[str, Sequence[float]] | None = None,
    sizes: Sequence[int] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float64,
) -> Comparison:
    """Train the task ``problem`` of :data:`TASKS` with every method it runs (or ``methods``),
    at every learning rate of its grid (or of ``grids``) and seeds ``0 .. seeds - 1``: the
    task's :func:`network` of its sizes (or ``sizes``) seeded by the run's seed, mini-batches
    of the task's size (L-BFGS: the full batch) for its steps (or ``steps``), the full
    training loss at every evaluation; in ``dtype`` whatever torch's default.

    Raises:
        ValueError: for an unknown task or method, a method the task leaves out, or a
            non-positive number of seeds.
    """
    if problem not in TASKS:
        raise ValueError(f"problem {problem!r} is not supported; use one of {list(TASKS)}.")
    check_positive_int("seeds", seeds)
    task = TASKS[problem]
    runnable = [m for m in task.grids if m not in task.left_out]
    chosen = list(methods or grids or runnable)
    for method in set(chosen) - set(runnable):
        why = task.left_out.get(method, "it is not a method of this comparison")
        raise ValueError(f"{problem}: method {method!r} is not run: {why}; use {runnable}.")
    grids = {m: list((grids or task.grids)[m]) for m in chosen}
    sizes, steps = tuple(sizes or task.sizes), task.steps if steps is None else steps
    data = getattr(problems, task.data)(dtype=dtype, device=device)
    with runtime.threads(1):  # CPU seconds of one thread, reproducible bit for bit
        runs = _runs(task, grids, sizes, steps, seeds, data, dtype, device)
        where = environment(torch.device(device))
        left_out = _left_out(task, data, dtype, device, seeds) if methods is None else task.left_out
    return Comparison(
        problem=problem,
        sizes=sizes,
        steps=steps,
        batch_size=task.batch_size,
        eval_every=task.eval_every,
        seeds=seeds,
        target=task.target,
        grids=grids,
        settings={m: settings(m, task.kinds.get(m, "exact")) for m in chosen},
        runs=runs,
        environment=where
        | {"clock": "CPU time of the process", "dtype": str(dtype).removeprefix("torch.")},
        left_out=dict(left_out),
        stop_at_target=task.stop_at_target,
        model=task.network,
    )


def _runs(
    task: Task,
    grids: dict[str, list[float]],
    sizes: tuple[int, ...],
    steps: int,
    seeds: int,
    data: problems.Problem,
    dtype: torch.dtype,
    device: str | torch.device,
) -> list[Run]:
    """Every method of ``grids`` at each of its learning rates and seeds on ``task``."""
    target = task.target if task.stop_at_target else None
    runs = []
    for method in grids:
        kind = task.kinds.get(method, "exact")
        for lr in grids[method]:
            for seed in range(seeds):
                model = network(task.network, sizes, seed, dtype).to(device)
                optimizer = METHODS[method](model, data.loss_fn, lr, seed, kind)
                if method == "L-BFGS":
                    trace = train_lbfgs(model, optimizer, data.loss_fn, data.X_train,
                                        data.y_train, steps, task.eval_every,
                                        target=target)  # fmt: skip
                else:
                    trace = optim.train(model, optimizer, data.loss_fn, data.X_train,
                                        data.y_train, steps, task.batch_size, task.eval_every,
                                        seed, clock=time.process_time, target=target)  # fmt: skip
                runs.append(Run(method, lr, seed, trace.steps, trace.losses, trace.seconds))
    return runs


def network(kind: Network, sizes: Sequence[int], seed: int, dtype: torch.dtype) -> nn.Module:
    """The tanh MLP of widths ``sizes`` drawn in ``dtype``, or the digits CNN of channels
    ``sizes`` drawn in float32 whatever torch's default (as the command line draws it), then
    cast to ``dtype``."""
    check_choice("network", kind, Network)
    if kind == "mlp":
        return problems.mlp(list(sizes), seed=seed, dtype=dtype)
    with runtime.default_dtype(torch.float32):
        return problems.digits_cnn(tuple(sizes), seed=seed).to(dtype)


def _left_out(
    task: Task, data: problems.Problem, dtype: torch.dtype, device, seeds: int
) -> dict[str, str]:
    """Each method the task leaves out, with its reason, the CPU seconds of one step (seed 0;
    the learning rate does not change the cost) and what a grid as long as the task's other
    grids, over ``seeds`` seeds, would have cost."""
    rates = len(next(iter(task.grids.values())))
    reasons = {}
    for method, why in task.left_out.items():
        model = network(task.network, task.sizes, 0, dtype).to(device)
        optimizer = METHODS[method](model, data.loss_fn, 0.3, 0, task.kinds.get(method, "exact"))
        trace = optim.train(model, optimizer, data.loss_fn, data.X_train, data.y_train, 1,
                            task.batch_size, clock=time.process_time)  # fmt: skip
        hours = trace.seconds[-1] * task.steps * rates * seeds / 3600
        reasons[method] = (
            f"{why}; one step took {trace.seconds[-1]:.1f} CPU s here, so its grid of {rates} "
            f"learning rates and {seeds} seeds would take about {hours:.0f} CPU hours"
        )
    return reasons


def write_record(comparison: Comparison, path: Path) -> None:
    """Write a :class:`Comparison` as JSON (``book/data/`` keeps recorded runs)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(comparison)) + "\n")


def read_record(path: Path) -> Comparison:
    """A :class:`Comparison` from :func:`write_record`'s JSON.

    Raises:
        ValueError: if the file is not a comparison record of schema :data:`SCHEMA` (an older
            record, another benchmark's record), or misses or adds fields.
    """
    data = json.loads(Path(path).read_text())
    found = data.get("schema") if isinstance(data, dict) else None
    if found != SCHEMA:
        raise ValueError(
            f"{path} is not a training-comparison record of schema {SCHEMA!r} (its schema is "
            f"{found!r}); write it with python -m natlib bench training --out {path}."
        )
    known = {f.name for f in fields(Comparison)}
    required = {
        f.name for f in fields(Comparison) if f.default is MISSING and f.default_factory is MISSING
    }
    missing, unknown = sorted(required - set(data)), sorted(set(data) - known)
    if missing or unknown:
        raise ValueError(
            f"{path} does not hold a comparison record: missing fields {missing}, unknown "
            f"fields {unknown}."
        )
    data["runs"] = [Run(**run) for run in data["runs"]]
    data["sizes"] = tuple(data["sizes"])
    return Comparison(**data)
