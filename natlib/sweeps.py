"""Tuning sweeps that compare optimisers fairly, and their JSON records.

Every method gets a grid of hyper-parameters of the same size (an equal tuning budget), every
setting runs with several seeds, and a method's best setting is the one with the lowest median
final training loss. :class:`SweepRecord` answers the questions a comparison must answer:
medians and quartiles over seeds, the best setting, and whether it sits at an edge of its
grid. ``python -m natlib bench sweep --problem kfac-ngd|autoencoder --out
book/data/sweep-<problem>-<device>.json`` runs a sweep (:data:`PROBLEMS`) and records it.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from natlib import problems, runtime, timing
from natlib.checks import check_positive_int
from natlib.optim import KFAC, NGD, train

#: The schema name written into every sweep record.
SCHEMA = "natlib.sweep/1"

Setting = dict[str, float]


@dataclass(frozen=True)
class SweepProblem:
    """One comparison: a data set, a network, a training budget and a grid per method.

    ``grids[method]`` maps each tuned hyper-parameter to its values; ``fixed`` states the
    hyper-parameters that are not tuned (the record keeps both).
    """

    name: str
    data: str
    sizes: list[int]
    steps: int
    batch: int
    eval_every: int
    grids: dict[str, dict[str, list[float]]]
    fixed: dict[str, str]


#: The recorded comparisons, by the name ``--problem`` takes.
PROBLEMS: dict[str, SweepProblem] = {
    "kfac-ngd": SweepProblem(
        name="kfac-ngd",
        data="digits",
        sizes=[64, 10, 10],
        steps=100,
        batch=128,
        eval_every=10,
        grids={
            method: {"damping": [0.01, 0.03, 0.1, 0.3], "lr": [0.25, 0.5, 1.0, 2.0, 4.0]}
            for method in ("exact NGD", "K-FAC, exact damping", "K-FAC, pi-damping")
        },
        fixed={
            "exact NGD": "exact Fisher of each mini-batch, solved by Cholesky",
            "K-FAC, exact damping": "exact (type-2) factors of each mini-batch, "
            "T_cov = T_inv = 1, no averaging, damping of A ⊗ G + λI",
            "K-FAC, pi-damping": "as above, factored damping (π)",
        },
    ),
    "autoencoder": SweepProblem(
        name="autoencoder",
        data="digits_autoencoder",
        sizes=[64, 32, 16, 8, 16, 32, 64],
        steps=600,
        batch=512,
        eval_every=10,
        grids={
            "SGD + momentum": {"lr": [1.0, 3.0, 10.0]},
            "Adam": {"lr": [0.01, 0.03, 0.1]},
            "K-FAC": {"lr": [0.1, 0.3, 1.0]},
        },
        fixed={
            "SGD + momentum": "momentum 0.9",
            "Adam": "betas (0.9, 0.999), eps 1e-8",
            "K-FAC": "Monte-Carlo Fisher, factored damping 0.01, momentum 0.5, "
            "T_cov = 1, T_inv = 10, averaging 0.95",
        },
    ),
}


def _optimizer(
    method: str, model: nn.Module, loss_fn: nn.Module, setting: Setting, seed: int
) -> torch.optim.Optimizer:
    lr = setting["lr"]
    if method == "SGD + momentum":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    if method == "Adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    if method == "K-FAC":
        return KFAC(
            model, loss_fn, lr=lr, damping=1e-2, momentum=0.5, T_inv=10, kind="mc", seed=seed
        )
    if method == "exact NGD":
        return NGD(model, loss_fn, lr=lr, damping=setting["damping"])
    mode = "exact" if method == "K-FAC, exact damping" else "pi"
    return KFAC(
        model,
        loss_fn,
        lr=lr,
        damping=setting["damping"],
        T_inv=1,
        ema_decay=0.0,
        kind="exact",
        damping_mode=mode,
    )


def settings(grid: dict[str, list[float]]) -> list[Setting]:
    """Every point of a grid, as ``{name: value}``, the last name varying fastest."""
    names = list(grid)
    return [dict(zip(names, values)) for values in itertools.product(*grid.values())]


def run_one(
    problem: SweepProblem,
    method: str,
    setting: Setting,
    seed: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float64,
) -> Any:
    """Train ``method`` with ``setting`` from the initialisation of ``seed``; a
    :class:`natlib.preconditioned.Trace`. Seed ``s`` fixes the initial weights, the mini-batch order
    and K-FAC's sampled targets, the same for every method. The run does not depend on the
    caller's default dtype: it runs under torch's default, float32, with the data and the
    model (drawn in float32, then cast) in ``dtype``."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        data = getattr(problems, problem.data)(dtype=dtype, device=device)
        y = data.X_train if problem.data == "digits_autoencoder" else data.y_train
        model = problems.mlp(problem.sizes, seed=seed).to(device=device, dtype=dtype)
        optimizer = _optimizer(method, model, data.loss_fn, setting, seed)
        return train(
            model,
            optimizer,
            data.loss_fn,
            data.X_train,
            y,
            problem.steps,
            batch_size=problem.batch,
            eval_every=problem.eval_every,
            seed=seed,
        )
    finally:
        torch.set_default_dtype(previous)


@dataclass(frozen=True)
class SweepRecord:
    """A recorded sweep: every run's training-loss curve (``inf`` after a divergence)."""

    problem: dict[str, Any]
    seeds: int
    steps: list[int]
    runs: list[dict[str, Any]]
    environment: dict[str, Any]
    schema: str = field(default=SCHEMA)

    @property
    def grids(self) -> dict[str, dict[str, list[float]]]:
        return self.problem["grids"]

    @property
    def methods(self) -> list[str]:
        return list(self.grids)

    def losses(self, method: str, setting: Setting) -> np.ndarray:
        """Training losses, shape ``(seeds, evaluations)``."""
        rows = [r["losses"] for r in self.runs if r["method"] == method and r["setting"] == setting]
        if len(rows) != self.seeds:
            raise KeyError(f"no complete runs of {method} with {setting} in this record.")
        return np.array(rows, dtype=float)

    def final(self, method: str, setting: Setting) -> np.ndarray:
        """Final training losses over seeds (``inf`` for a diverged run)."""
        return self.losses(method, setting)[:, -1]

    def median_final(self, method: str, setting: Setting) -> float:
        return float(np.median(self.final(method, setting)))

    def best(self, method: str) -> Setting:
        """The setting with the lowest median final loss."""
        return min(settings(self.grids[method]), key=lambda s: self.median_final(method, s))

    def edges(self, method: str) -> list[str]:
        """The hyper-parameters whose best value is the first or last of its grid."""
        best = self.best(method)
        return [
            name
            for name, values in self.grids[method].items()
            if len(values) > 1 and best[name] in (values[0], values[-1])
        ]

    def quartiles(self, method: str, setting: Setting, axis: int = 0) -> np.ndarray:
        """25th, 50th and 75th percentiles over seeds of every evaluation, ``(3, evals)``."""
        return np.percentile(self.losses(method, setting), [25, 50, 75], axis=axis)

    def first_below(self, method: str, setting: Setting, target: float) -> np.ndarray:
        """For each seed, the first evaluated step with loss at most ``target`` (``inf``:
        never)."""
        steps = np.array(self.steps, dtype=float)
        hits = self.losses(method, setting) <= target
        return np.where(hits.any(1), steps[hits.argmax(1)], np.inf)


def run(
    problem: SweepProblem | str,
    seeds: int = 5,
    device: torch.device | str | None = None,
    progress: bool = False,
    methods: Iterable[str] | None = None,
) -> SweepRecord:
    """Run every method on every point of its grid with seeds ``0 .. seeds - 1`` (float64,
    one CPU thread on a CPU, so that a run is reproduced exactly by :func:`run_one`)."""
    if isinstance(problem, str):
        if problem not in PROBLEMS:
            raise ValueError(f"problem {problem!r} is not supported; use one of {list(PROBLEMS)}.")
        problem = PROBLEMS[problem]
    check_positive_int("seeds", seeds)
    device = timing.resolve_device(device)
    methods = list(methods or problem.grids)
    jobs = [
        (m, s, seed) for m in methods for s in settings(problem.grids[m]) for seed in range(seeds)
    ]
    with runtime.threads(1):
        if progress:
            from tqdm.auto import tqdm

            jobs = tqdm(jobs, desc=f"sweep {problem.name}")
        runs, steps = [], None
        for method, setting, seed in jobs:
            trace = run_one(problem, method, setting, seed, device)
            full = _padded(trace.steps, trace.losses, problem)
            steps = steps or full[0]
            runs.append(
                dict(
                    method=method,
                    setting=setting,
                    seed=seed,
                    losses=full[1],
                    seconds=trace.seconds[-1],
                )
            )
        environment = timing.environment(device)
    grids = {m: problem.grids[m] for m in methods}
    return SweepRecord(
        problem={**asdict(problem), "grids": grids},
        seeds=seeds,
        steps=steps,
        runs=runs,
        environment={**environment, "dtype": "float64"},
    )


def _padded(
    steps: list[int], losses: list[float], problem: SweepProblem
) -> tuple[list[int], list[float]]:
    """A diverged run's curve continued with ``inf`` to the full evaluation grid."""
    full = list(range(0, problem.steps, problem.eval_every)) + [problem.steps]
    full = sorted(set(full))
    values = [x if math.isfinite(x) else math.inf for x in losses]
    return full, values + [math.inf] * (len(full) - len(values))


def write_record(record: SweepRecord, path: Path) -> None:
    """Write a sweep as JSON (``inf`` as ``Infinity``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(record), indent=1) + "\n")


def read_record(path: Path) -> SweepRecord:
    """Read a sweep written by :func:`write_record`.

    Raises:
        ValueError: if the file is not a sweep record of this schema or misses a field.
    """
    data = timing.read_json(path, SCHEMA)
    try:
        return SweepRecord(**data)
    except TypeError as error:
        raise ValueError(f"{path} is not a complete {SCHEMA} record: {error}") from None


def benchmark(problem: str, device: str | torch.device | None = None) -> SweepReport:
    """``python -m natlib bench sweep --problem <name>``: the sweep with 5 seeds and a
    progress bar, as a record with a ``report()``."""
    return SweepReport(run(problem, seeds=5, device=device, progress=True))


class SweepReport:
    """A :class:`SweepRecord` with the ``report()`` the command line prints."""

    def __init__(self, record: SweepRecord):
        self.record = record

    def report(self) -> str:
        r = self.record
        lines = [f"sweep {r.problem['name']}, {r.seeds} seeds, on {r.environment['device']}"]
        for method in r.methods:
            best = r.best(method)
            edge = r.edges(method)
            where = f" (at the edge in {', '.join(edge)})" if edge else " (interior)"
            lines.append(
                f"  {method}: best {best}, median final loss "
                f"{r.median_final(method, best):.4f}{where}"
            )
        return "\n".join(lines)
