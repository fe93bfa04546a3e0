r"""Optimisers raced at equal CPU time on the character transformer (chapter 3).

Every run trains :func:`natlib.language.transformer` on windows of the standard library's
training text (:func:`natlib.language.stdlib_chars`), drawn at random with the run's seed, and
stops at checkpoints of its own optimiser time: ``time.process_time`` with one torch thread,
the CPU seconds of the process, which the load of other processes on a shared machine does
not inflate. The runs advance in turn, one checkpoint at a time, so that a slow spell of the
machine hits every method and seed alike. At each checkpoint the test loss is evaluated (not
timed) in bits per character, :math:`\ell / \ln 2` for the mean cross-entropy :math:`\ell`.

:func:`run` tunes each method's learning rate in a short race from seed 0 (the same grid size
and time per method), keeps the K-FAC approximation, expand or reduce (Eschenhagen et al.,
2023), whose tuned run ends lower, and races the tuned methods from every seed. The record is a
:class:`Race` (``python -m natlib bench training --problem transformer``); :func:`replay`
re-runs one of its runs to a checkpoint by steps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from natlib import costmodel, language, runtime, timing
from natlib.checks import NonFiniteError, check_positive, check_positive_int
from natlib.kfac import KFACApproximation
from natlib.optim import KFAC
from natlib.problems import Problem

#: The schema name of every race record.
SCHEMA = "natlib.race/1"

Builder = Callable[[nn.Module, nn.Module, float, int], torch.optim.Optimizer]


def _kfac(approximation: str) -> Builder:
    return lambda m, f, damping, s: KFAC(
        m, f, lr=KFAC_LR, momentum=0.9, damping=damping, kind="mc", T_inv=10,
        approximation=approximation, unsupported="gradient", seed=s,
    )  # fmt: skip


#: K-FAC's fixed learning rate; its damping is tuned.
KFAC_LR = 0.1
#: How each method is built for a model, loss, value of its tuned knob (:data:`KNOBS`), seed.
METHODS: dict[str, Builder] = {
    "SGD": lambda m, f, lr, s: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9),
    "AdamW": lambda m, f, lr, s: torch.optim.AdamW(m.parameters(), lr=lr),
    "K-FAC-expand": _kfac("expand"),
    "K-FAC-reduce": _kfac("reduce"),
}
_KFAC = (
    f"learning rate {KFAC_LR}, Monte-Carlo Fisher (one sample), factored damping, momentum "
    "0.9, no KL clipping, T_cov = 1, T_inv = 10, averaging 0.95; LayerNorm and Embedding by "
    "gradient steps"
)
#: Every hyper-parameter but the tuned one, as the book states them.
SETTINGS = {
    "SGD": "momentum 0.9",
    "AdamW": "betas (0.9, 0.999), eps 1e-8, weight decay 0.01",
    "K-FAC-expand": _KFAC,
    "K-FAC-reduce": _KFAC,
}
#: The hyper-parameter each method tunes, the learning rate or K-FAC's damping.
KNOBS = {"SGD": "lr", "AdamW": "lr", "K-FAC-expand": "damping", "K-FAC-reduce": "damping"}
#: Five values per method, about 3 apart.
GRIDS = {
    "SGD": (0.003, 0.01, 0.03, 0.1, 0.3),
    "AdamW": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
    "K-FAC-expand": (0.1, 0.3, 1.0, 3.0, 10.0),
    "K-FAC-reduce": (0.1, 0.3, 1.0, 3.0, 10.0),
}


@dataclass(frozen=True)
class Task:
    """The model (:func:`natlib.language.transformer`'s arguments), the batch of windows per
    step and the characters of training and test text."""

    context: int = 128
    width: int = 144
    layers: int = 4
    heads: int = 4
    batch: int = 8
    train_chars: int = 1_000_000
    test_chars: int = 16_385

    def data(self) -> Problem:
        return language.stdlib_chars(self.context, self.train_chars, self.test_chars)

    def model(self, seed: int) -> nn.Module:
        """The transformer drawn in float32, whatever torch's default dtype."""
        with runtime.default_dtype(torch.float32):
            return language.transformer(
                self.context, self.width, self.layers, self.heads, seed=seed
            )


@dataclass(frozen=True)
class Curve:
    """One run of ``method`` with its knob at ``value``: test bits per character at CPU
    ``seconds`` after ``steps`` steps, one entry per checkpoint (and the start); ``inf`` once
    a run has diverged."""

    method: str
    value: float
    seed: int
    seconds: list[float]
    steps: list[int]
    bits: list[float]


class _Runner:
    """A run in progress: its model, optimiser, batch generator and curve."""

    def __init__(self, task: Task, data: Problem, method: str, value: float, seed: int) -> None:
        self.task, self.data = task, data
        self.model = task.model(seed)
        self.optimizer = METHODS[method](self.model, data.loss_fn, value, seed)
        self.generator = torch.Generator().manual_seed(seed)
        self.curve = Curve(method, value, seed, [], [], [])
        self.elapsed, self.steps, self.alive = 0.0, 0, True

    def step(self) -> None:
        """One timed optimiser step on a random batch (NaN or Inf ends the run)."""
        X, y, loss_fn = self.data.X_train, self.data.y_train, self.data.loss_fn
        index = torch.randint(len(X), (self.task.batch,), generator=self.generator)
        start = time.process_time()
        try:
            self.optimizer.zero_grad()
            loss_fn(self.model(X[index]), y[index].flatten()).backward()
            self.optimizer.step()
        except NonFiniteError:  # the run diverged
            self.alive = False
        self.elapsed += time.process_time() - start
        self.steps += 1

    def advance(self, until: float) -> None:
        """Steps until the optimiser time reaches ``until``."""
        while self.alive and self.elapsed < until:
            self.step()

    def evaluate(self) -> None:
        bits = math.inf
        if self.alive:
            with torch.no_grad():
                logits = self.model(self.data.X_test)
                bits = self.data.loss_fn(logits, self.data.y_test.flatten()).item() / math.log(2)
        self.alive = math.isfinite(bits)
        self.curve.seconds.append(self.elapsed)
        self.curve.steps.append(self.steps)
        self.curve.bits.append(bits if self.alive else math.inf)


def race(
    task: Task,
    entries: Sequence[tuple[str, float, int]],
    checkpoints: Sequence[float],
    data: Problem | None = None,
    desc: str | None = None,
) -> list[Curve]:
    """Train every ``(method, value, seed)`` of ``entries`` to each of the CPU-time
    ``checkpoints`` in turn, all runs to one checkpoint before any goes on to the next, with one
    torch thread; ``desc`` shows a progress bar with that title."""
    from tqdm.auto import tqdm

    data = data or task.data()
    with runtime.threads(1):
        runners = [_Runner(task, data, *entry) for entry in entries]
        for runner in runners:
            runner.evaluate()
        for until in tqdm(checkpoints, desc=desc, disable=desc is None):
            for runner in runners:
                runner.advance(until)
                runner.evaluate()
    return [runner.curve for runner in runners]


def replay(
    curve: Curve, checkpoint: int, task: Task = Task(), data: Problem | None = None
) -> float:
    """Test bits per character of ``curve``'s run (method, value, seed) re-run, on one thread,
    for the number of steps it had taken at ``checkpoint``: the steps, unlike the CPU seconds,
    are the same on every run."""
    with runtime.threads(1):
        runner = _Runner(task, data or task.data(), curve.method, curve.value, curve.seed)
        while runner.alive and runner.steps < curve.steps[checkpoint]:
            runner.step()
        runner.evaluate()
    return runner.curve.bits[-1]


@dataclass(frozen=True)
class Race:
    """A recorded race: the tuning runs (seed 0, ``tuning_checkpoints``) of every method of
    ``grids`` and the runs of the tuned ``methods`` from every seed (``checkpoints``)."""

    task: dict[str, int]
    parameters: int
    test_characters: int
    seeds: int
    tuning_checkpoints: list[float]
    checkpoints: list[float]
    knobs: dict[str, str]
    grids: dict[str, list[float]]
    settings: dict[str, str]
    methods: list[str]
    tuning: list[Curve]
    curves: list[Curve]
    environment: dict[str, object] = field(default_factory=dict)
    schema: str = SCHEMA

    def tuning_bits(self, method: str) -> list[float]:
        """Final test bits per character of the tuning runs, along the method's grid."""
        final = {c.value: c.bits[-1] for c in self.tuning if c.method == method}
        return [final[value] for value in self.grids[method]]

    def best(self, method: str) -> float:
        """The value of the method's knob whose tuning run ends lowest."""
        bits = self.tuning_bits(method)
        return self.grids[method][int(np.argmin(bits))]

    def interior(self, method: str) -> bool:
        """Whether the best value is neither end of its grid."""
        return self.best(method) not in (self.grids[method][0], self.grids[method][-1])

    def kfac(self) -> str:
        """The K-FAC approximation whose tuned run ends lower."""
        return min(
            (m for m in self.grids if m.startswith("K-FAC")),
            key=lambda m: min(self.tuning_bits(m)),
        )

    def bits(self, method: str) -> np.ndarray:
        """Test bits per character of the raced runs, ``(seeds, checkpoints + 1)``."""
        return np.array([c.bits for c in self.curves if c.method == method], dtype=float)

    def seconds(self, method: str) -> np.ndarray:
        """The runs' CPU seconds at each evaluation, ``(seeds, checkpoints + 1)``: each
        checkpoint overshot by at most one step."""
        return np.array([c.seconds for c in self.curves if c.method == method], dtype=float)

    def steps(self, method: str) -> np.ndarray:
        """Steps taken by each evaluation, ``(seeds, checkpoints + 1)``."""
        return np.array([c.steps for c in self.curves if c.method == method], dtype=float)

    def quartiles(self, method: str) -> np.ndarray:
        """25th, 50th and 75th percentiles over seeds at each evaluation, ``(3, evals)``."""
        return np.percentile(self.bits(method), [25, 50, 75], axis=0)

    def step_seconds(self, method: str, tuning: bool = False) -> float:
        """Median CPU seconds per step over the whole race, of the raced runs (over seeds) or
        of the tuning runs (over the grid; ``tuning=True``)."""
        curves = [c for c in (self.tuning if tuning else self.curves) if c.method == method]
        return float(np.median([c.seconds[-1] / c.steps[-1] for c in curves]))

    def report(self) -> str:
        t = self.task
        lines = [
            f"character transformer ({self.parameters} parameters, {t['layers']} layers, "
            f"width {t['width']}, context {t['context']}), batch {t['batch']}, "
            f"{self.seeds} seeds, {self.checkpoints[-1]:g} CPU s each, one thread",
            f"  {'method':13s} {'tuned':>13s} {'interior':>8s} {'tuning':>7s} "
            f"{'bits/char':>9s} {'steps':>6s} {'ms/step':>8s}",
        ]
        for method in self.grids:
            tuned = f"{self.knobs[method]} {self.best(method):g}"
            bits = min(self.tuning_bits(method))
            raced = ""
            if method in self.methods:
                raced = (
                    f"{self.quartiles(method)[1, -1]:9.3f} "
                    f"{np.median(self.steps(method)[:, -1]):6.0f} "
                    f"{1e3 * self.step_seconds(method):8.1f}"
                )
            lines.append(
                f"  {method:13s} {tuned:>13s} {str(self.interior(method)):>8s} {bits:7.3f} {raced}"
            )
        return "\n".join(lines)


def run(
    task: Task = Task(),
    seeds: int = 3,
    budget_s: float = 60.0,
    tuning_s: float = 10.0,
    evaluations: int = 8,
    grids: dict[str, Sequence[float]] | None = None,
    progress: bool = False,
) -> Race:
    """Tune every method of ``grids`` (default :data:`GRIDS`, over its :data:`KNOBS`) on a race
    of ``tuning_s`` CPU seconds from seed 0, then race SGD, AdamW and the better K-FAC
    approximation, each at its best value, for ``budget_s`` seconds from seeds
    ``0 .. seeds - 1``, evaluated ``evaluations`` times at equal intervals (the tuning race
    twice)."""
    check_positive_int("seeds", seeds)
    check_positive_int("evaluations", evaluations)
    for name, value in (("budget_s", budget_s), ("tuning_s", tuning_s)):
        check_positive(name, value)
    grids = {m: list(g) for m, g in (grids or GRIDS).items()}
    data = task.data()

    def points(total: float, evaluations: int = evaluations) -> list[float]:
        return [total * (j + 1) / evaluations for j in range(evaluations)]

    entries = [(m, lr, 0) for m in grids for lr in grids[m]]
    tuning = race(task, entries, points(tuning_s, 2), data, "tuning" if progress else None)
    record = Race(
        task=asdict(task),
        parameters=sum(p.numel() for p in task.model(0).parameters()),
        test_characters=data.y_test.numel(),
        seeds=seeds,
        tuning_checkpoints=points(tuning_s, 2),
        checkpoints=points(budget_s),
        knobs={m: KNOBS[m] for m in grids},
        grids=grids,
        settings={m: SETTINGS[m] for m in grids},
        methods=[m for m in grids if not m.startswith("K-FAC")],
        tuning=tuning,
        curves=[],
        environment=timing.environment(torch.device("cpu"))
        | {"threads": 1, "clock": "CPU time of the process (time.process_time), one thread"},
    )
    methods = record.methods + [record.kfac()]
    entries = [(m, record.best(m), seed) for seed in range(seeds) for m in methods]
    curves = race(task, entries, points(budget_s), data, "race" if progress else None)
    return replace(record, methods=methods, curves=curves)


def step_cost(
    task: Task = Task(), approximation: str = "expand", T_inv: int = 10
) -> costmodel.StepCost:
    """Chapter 4's cost model of one K-FAC step on ``task`` (Monte-Carlo Fisher, factors every
    step): :meth:`natlib.kfac.KFACApproximation.step_cost` of a K-FAC estimate on one batch of
    random characters."""
    model = task.model(0)
    generator = torch.Generator().manual_seed(0)
    X = torch.randint(language.VOCABULARY_SIZE, (task.batch, task.context), generator=generator)
    kfac = KFACApproximation.from_batch(
        model, nn.CrossEntropyLoss(), X, X.flatten(), kind="mc", approximation=approximation,
        unsupported="gradient", generator=generator,
    )  # fmt: skip
    return kfac.step_cost(1, T_inv)


def write_record(record: Race, path: Path) -> None:
    """Write a :class:`Race` as JSON (``inf`` as ``Infinity``)."""
    timing.write_json(record, path)


def read_record(path: Path) -> Race:
    """A :class:`Race` from :func:`write_record`'s JSON.

    Raises:
        ValueError: if the file holds another schema or misses or adds a field.
    """
    data = timing.read_json(path, SCHEMA)
    try:
        data["tuning"] = [Curve(**c) for c in data["tuning"]]
        data["curves"] = [Curve(**c) for c in data["curves"]]
        return Race(**data)
    except (KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a complete {SCHEMA} record: {error!r}") from None
