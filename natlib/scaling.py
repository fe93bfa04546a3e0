r"""How K-FAC's cost grows: timing sweeps against width, batch and depth, slope fits, and the
recorded runs in ``book/data/scaling-<device>.json``.

The FLOP model the sweeps are compared with is :mod:`natlib.costmodel`; the clocks, the
problem and the split of a step into its parts are :mod:`natlib.timing`'s. For the chapter,
``step_cost``, ``layer_memory``, ``factor_cost``, ``PARTS``, ``GROUPS`` (and their classes)
of the cost model, ``ONCE`` of the timing harness, and ``geometric_widths``, ``fit_slope`` and
``SlopeFit`` of :mod:`natlib.powerlaw` are re-exported here. Timings run on
``TIMING_THREADS`` thread(s) and, on the CPU, count CPU seconds
(:func:`natlib.timing.cpu_clock`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import median

import torch
from torch import Tensor

from natlib import costmodel, runtime, timing
from natlib.costmodel import GROUPS as GROUPS
from natlib.costmodel import PARTS as PARTS
from natlib.costmodel import FactorCost as FactorCost
from natlib.costmodel import LayerMemory as LayerMemory
from natlib.costmodel import StepCost as StepCost
from natlib.costmodel import dominant as dominant
from natlib.costmodel import factor_cost as factor_cost
from natlib.costmodel import layer_memory as layer_memory
from natlib.costmodel import step_cost as step_cost
from natlib.factors import gradient_factor, input_factor
from natlib.linalg import FactoredInverse, eigh
from natlib.optim import KFAC
from natlib.powerlaw import SlopeFit as SlopeFit
from natlib.powerlaw import fit_slope as fit_slope
from natlib.powerlaw import geometric_widths as geometric_widths
from natlib.timing import ONCE as ONCE

SCHEMA = "natlib.scaling/2"
# (T_cov, T_inv) of the whole cycles timed directly, the check on the composed step times.
CYCLE_PERIODS = ((1, 1), (1, 10), (1, 100), (10, 100))
PIECES = ("factors", "eigh", "cholesky", "precondition")
PIECE_LABELS = {
    "factors": r"factors $A, G$ (fixed $B$)",
    "eigh": "eigendecomposition (one factor)",
    "cholesky": "Cholesky + inverse (one factor)",
    "precondition": r"preconditioning $G^{-1} V A^{-1}$",
}
DAMPING = 1e-3
LEARNING_RATE = 1e-6  # timing runs must stay finite, not make progress
TIMING_THREADS = 1  # torch.utils.benchmark.Timer's default
# The optimiser every sweep times: Monte-Carlo Fisher, factored damping, no momentum.
KFAC_OPTIONS = {"lr": LEARNING_RATE, "damping": DAMPING, "kind": "mc", "damping_mode": "pi"}
SGD_OPTIONS = {"lr": LEARNING_RATE}


def _seconds(fn: Callable[[], object], device: torch.device, min_run_time: float) -> float:
    """:func:`natlib.timing.median_seconds` on :func:`natlib.timing.cpu_clock`."""
    return timing.median_seconds(fn, min_run_time, timing.cpu_clock(device))


# --------------------------------------------------------------------------- per-layer sweep


def layer_pieces(
    width: int, batch: int, device: torch.device, dtype: torch.dtype = torch.float32, seed: int = 0
) -> dict[str, Callable[[], object]]:
    """The pieces of one square layer's K-FAC work, on random inputs of the given width.

    ``factors``: :func:`natlib.factors.input_factor` and :func:`natlib.factors.gradient_factor`
    of a batch; ``eigh``: :func:`natlib.linalg.eigh` of one factor; ``cholesky``: one damped
    inverse by Cholesky; ``precondition``: :meth:`natlib.linalg.FactoredInverse.apply`. A
    square layer's :math:`A` and :math:`G` have the same size, so it pays ``eigh`` or
    ``cholesky`` twice.
    """
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator, dtype=dtype).to(device)

    def factor() -> Tensor:  # full rank, Marchenko-Pastur spectrum: no deflation shortcuts
        M = draw(width, width)
        F = M @ M.T / width
        F.diagonal().add_(DAMPING)
        return F

    def cholesky_inverse(M: Tensor) -> Tensor:
        return torch.cholesky_inverse(torch.linalg.cholesky(M))

    a, g, V, A, G = draw(batch, width), draw(batch, width), draw(width, width), factor(), factor()
    inverse = FactoredInverse(cholesky_inverse(G), cholesky_inverse(A))
    return {
        "factors": lambda: (input_factor(a, bias=False), gradient_factor(g)),
        "eigh": lambda: eigh(A, "A"),
        "cholesky": lambda: cholesky_inverse(A),
        "precondition": lambda: inverse.apply(V),
    }


@dataclass(frozen=True)
class LayerSweep:
    """Median seconds of each piece of :func:`layer_pieces` against the width, at one batch."""

    widths: list[int]
    batch: int
    seconds: dict[str, list[float]]

    def fit(self, piece: str, lower: float | None = None) -> SlopeFit:
        """:func:`~natlib.powerlaw.fit_slope` of one piece's seconds against the width."""
        return fit_slope(self.widths, self.seconds[piece], lower)

    def _upper(self) -> list[tuple[int, dict[str, float]]]:
        top = max(self.widths) / 4
        return [
            (d, {piece: times[i] for piece, times in self.seconds.items()})
            for i, d in enumerate(self.widths)
            if d >= top
        ]

    def flop_rate(self) -> float:
        """Matrix-product FLOP/s: the median of
        :func:`natlib.costmodel.kronecker_solve_flops` (:math:`4d^3`) over
        :math:`t_\\text{precondition}`, over the top two octaves of widths."""
        return median(
            costmodel.kronecker_solve_flops(d, d, "pi") / t["precondition"]
            for d, t in self._upper()
        )

    def eigh_constant(self) -> float:
        r""":math:`c` such that one eigendecomposition costs as long as :math:`c\,d^3` FLOPs of
        matrix products: the median of :math:`t_\text{eigh} R / d^3` over the top two octaves
        (:math:`R` = :meth:`flop_rate`)."""
        rate = self.flop_rate()
        return median(t["eigh"] * rate / d**3 for d, t in self._upper())


def layer_sweep(
    widths: Sequence[int],
    batch: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    rounds: int = 3,
    min_run_time: float = 0.05,
    progress: bool = False,
) -> LayerSweep:
    """Time every piece at every width, ``rounds`` times in interleaved order (so that a burst
    of load on a shared machine hits every width alike), and keep the median per width."""
    timers = {
        (piece, i): (lambda fn=fn: _seconds(fn, device, min_run_time))
        for i, width in enumerate(widths)
        for piece, fn in layer_pieces(width, batch, device, dtype).items()
    }
    seconds = timing.interleaved_medians(timers, rounds, "per-layer sweep" if progress else None)
    return LayerSweep(
        list(widths),
        batch,
        {piece: [seconds[piece, i] for i in range(len(widths))] for piece in PIECES},
    )


# --------------------------------------------------------------------------- whole steps


@dataclass(frozen=True)
class StepTimes:
    """Median seconds of whole training steps of an MLP (``depth`` tanh layers of ``width``,
    batch ``batch``, ``MSELoss``) with SGD and with :class:`natlib.optim.KFAC` (Monte-Carlo
    Fisher, factored damping), split by :func:`natlib.timing.step_parts`.

    ``kfac_s``: a K-FAC step that neither updates factors nor refreshes inverses
    (forward, backward, preconditioning); ``kfac_factors_s``: one that updates the factors
    (plus the sampled backward); ``refresh_s``: eigendecompositions and damped inverses of
    every layer. Peak bytes are measured on CUDA only.
    """

    width: int
    batch: int
    depth: int
    sgd_s: float
    kfac_s: float
    kfac_factors_s: float
    refresh_s: float
    sgd_peak_bytes: int | None = None
    kfac_peak_bytes: int | None = None

    def step_seconds(self, T_cov: int = 1, T_inv: int = 1) -> float:
        """Amortised K-FAC step: :math:`t_0 + (t_\\text{factors} - t_0)/T_\\text{cov} +
        t_\\text{refresh}/T_\\text{inv}`."""
        return sum(self.parts(T_cov, T_inv).values())

    def overhead(self, T_cov: int = 1, T_inv: int = 1) -> float:
        """K-FAC step over SGD step."""
        return self.step_seconds(T_cov, T_inv) / self.sgd_s

    def parts(self, T_cov: int = 1, T_inv: int = 1) -> dict[str, float]:
        """Amortised seconds by :data:`natlib.costmodel.PARTS`
        (:func:`natlib.timing.amortised_parts`)."""
        return timing.amortised_parts(
            self.sgd_s, self.kfac_s, self.kfac_factors_s, self.refresh_s, T_cov, T_inv
        )

    def dominant(self, T_cov: int = 1, T_inv: int = 1) -> str:
        """The most expensive of :data:`natlib.costmodel.GROUPS`."""
        return dominant(self.parts(T_cov, T_inv))

    @property
    def precondition_overhead(self) -> float:
        """The preconditioning's time relative to an SGD step, which the model puts at
        :math:`2d/(3B)`."""
        return self.kfac_s / self.sgd_s - 1


def _problem(
    width: int, batch: int, depth: int, device: torch.device, dtype: torch.dtype, seed: int
):
    return timing.random_mlp_problem([width] * (depth + 1), batch, "mse", device, dtype, seed)


def cycle_seconds(
    width: int,
    batch: int,
    depth: int,
    T_cov: int,
    T_inv: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    min_run_time: float = 0.01,
    seed: int = 0,
) -> float:
    """Seconds per K-FAC step measured directly over whole cycles of ``T_inv`` steps, each with
    one refresh and ``T_inv / T_cov`` factor updates (the check on
    :meth:`StepTimes.step_seconds`, which composes the same from its parts)."""
    model, X, y, loss_fn = _problem(width, batch, depth, device, dtype, seed)
    optimizer = KFAC(model, loss_fn, T_cov=T_cov, T_inv=T_inv, **KFAC_OPTIONS)
    cycle = timing.training_step(model, optimizer, loss_fn, X, y, steps=T_inv)
    seconds = _seconds(cycle, device, min_run_time) / T_inv
    optimizer.remove_hooks()
    return seconds


@dataclass(frozen=True)
class CycleCheck:
    """A K-FAC step's seconds at ``(T_cov, T_inv)`` timed over whole cycles
    (:func:`cycle_seconds`), beside the same step composed from its parts
    (:meth:`StepTimes.step_seconds`)."""

    T_cov: int
    T_inv: int
    seconds: float

    def disagreement(self, times: StepTimes) -> float:
        """:math:`|t_\\text{composed} / t_\\text{direct} - 1|`."""
        return abs(times.step_seconds(self.T_cov, self.T_inv) / self.seconds - 1)


def step_sweep(
    configs: Sequence[tuple[int, int, int]],
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    rounds: int = 3,
    min_run_time: float = 0.05,
    progress: bool = False,
    seed: int = 0,
) -> list[StepTimes]:
    """:class:`StepTimes` for each ``(width, batch, depth)``, timed in interleaved rounds."""
    built = []
    for config in configs:
        model, X, y, loss_fn = _problem(*config, device, dtype, seed)
        built.append(timing.step_parts(model, loss_fn, X, y, SGD_OPTIONS, KFAC_OPTIONS))
    timers = {
        (i, part): (lambda fn=fn: _seconds(fn, device, min_run_time))
        for i, parts in enumerate(built)
        for part, fn in parts.fns.items()
    }
    try:
        seconds = timing.interleaved_medians(timers, rounds, "step sweep" if progress else None)
    finally:
        for parts in built:
            parts.close()
    return [
        StepTimes(
            *config,
            *(seconds[i, part] for part in timing.STEP_PARTS),
            parts.peaks["sgd"],
            parts.peaks["kfac_factors"],
        )
        for i, (config, parts) in enumerate(zip(configs, built))
    ]


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Settings:
    """What :func:`measure` sweeps: the per-layer widths at one batch, and whole steps against
    width (at ``depth``, ``batch``), batch (at ``width``, ``depth``) and depth."""

    widths: list[int]
    batch: int
    rounds: int
    step_widths: list[int]
    step_batches: list[int]
    width: int
    depths: list[int]
    depth: int
    min_run_time: float

    @classmethod
    def default(cls, device: torch.device, full: bool = False) -> Settings:
        """The chapter's ranges: per-layer widths from 64 to 2,048 on the CPU (4,096 with
        ``full``) or to 16,384 on a GPU (4,096 without ``full``); whole steps up to a quarter of
        that, against batch and depth at an eighth."""
        gpu = device.type == "cuda"
        top = (16384 if full else 4096) if gpu else (4096 if full else 2048)
        return cls(
            widths=geometric_widths(64, top),
            batch=256,
            rounds=5 if full and not gpu else 3,
            step_widths=geometric_widths(64, top // 4, 1),
            step_batches=geometric_widths(16, 4096 if gpu or full else 1024, 1),
            width=top // 8,
            depths=[1, 2, 4, 8],
            depth=2,
            min_run_time=0.1 if full else 0.01,
        )


@dataclass(frozen=True)
class ScalingRecord:
    """Everything :func:`measure` timed, with where it ran (``book/data/scaling-<device>.json``)."""

    environment: dict[str, object]
    settings: Settings
    layer: LayerSweep
    by_width: list[StepTimes]
    by_batch: list[StepTimes]
    by_depth: list[StepTimes]
    cycles: list[CycleCheck]  # at the widest step of ``by_width``
    schema: str = SCHEMA

    def report(self) -> str:
        env = self.environment
        lines = [
            f"K-FAC scaling on {env['device']} ({env['dtype']}, torch {env['torch']}, "
            f"{env['threads']} timing thread(s))",
            f"  matrix products: {self.layer.flop_rate() / 1e9:.1f} GFLOP/s; an eigendecomposition "
            f"costs c = {self.layer.eigh_constant():.1f} d^3 of them",
        ]
        lines += [f"  {piece:13s} slope {self.layer.fit(piece)}" for piece in PIECES]
        lines += [
            f"  K-FAC/SGD at d={s.width}, B={s.batch}, L={s.depth}: {s.overhead(1, 1):.2f} "
            f"(T_inv=1), {s.overhead(1, 10):.2f} (T_inv=10), {s.overhead(10, 100):.2f} "
            "(T_cov=10, T_inv=100)"
            for s in self.by_width + self.by_batch
        ]
        widest = self.by_width[-1]
        lines += [
            f"  whole cycles at d={widest.width}, T_cov={c.T_cov}, T_inv={c.T_inv}: composed parts "
            f"off by {c.disagreement(widest):.0%}"
            for c in self.cycles
        ]
        return "\n".join(lines)


def measure(
    settings: Settings,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> ScalingRecord:
    """Run every sweep of ``settings`` on ``device``, setup included on ``TIMING_THREADS``
    threads (more threads than free cores slow a shared machine's linear algebra badly)."""
    s = settings

    def steps(configs: list[tuple[int, int, int]]) -> list[StepTimes]:
        return step_sweep(configs, device, dtype, s.rounds, s.min_run_time, progress)

    with runtime.threads(TIMING_THREADS):
        layer = layer_sweep(s.widths, s.batch, device, dtype, s.rounds, s.min_run_time, progress)
        by_width = steps([(d, s.batch, s.depth) for d in s.step_widths])
        by_batch = steps([(s.width, b, s.depth) for b in s.step_batches])
        by_depth = steps([(s.width, s.batch, L) for L in s.depths])
        widest = by_width[-1]
        cycles = [
            CycleCheck(
                T_cov,
                T_inv,
                cycle_seconds(
                    widest.width,
                    widest.batch,
                    widest.depth,
                    T_cov,
                    T_inv,
                    device,
                    dtype,
                    s.min_run_time,
                ),
            )
            for T_cov, T_inv in CYCLE_PERIODS
        ]
    clock = "CPU time of one thread" if device.type == "cpu" else "wall clock"
    return ScalingRecord(
        environment={
            **timing.environment(device),
            "threads": TIMING_THREADS,
            "clock": clock,
            "dtype": str(dtype).removeprefix("torch."),
        },
        settings=s,
        layer=layer,
        by_width=by_width,
        by_batch=by_batch,
        by_depth=by_depth,
        cycles=cycles,
    )


def write_record(record: ScalingRecord, path: Path) -> None:
    """Write a record as JSON (:func:`natlib.timing.write_json`)."""
    timing.write_json(record, path)


def read_record(path: Path) -> ScalingRecord:
    """Read a record written by :func:`write_record`.

    Raises:
        ValueError: if the file is not a scaling record of this schema or misses a field.
    """
    data = timing.read_json(path, SCHEMA)
    try:
        return ScalingRecord(
            environment=data["environment"],
            settings=Settings(**data["settings"]),
            layer=LayerSweep(**data["layer"]),
            by_width=[StepTimes(**s) for s in data["by_width"]],
            by_batch=[StepTimes(**s) for s in data["by_batch"]],
            by_depth=[StepTimes(**s) for s in data["by_depth"]],
            cycles=[CycleCheck(**c) for c in data["cycles"]],
        )
    except (KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a complete {SCHEMA} record: {error}") from None


def benchmark(device: str | torch.device | None = None, full: bool = True) -> ScalingRecord:
    """``python -m natlib bench scaling --device cpu|cuda --out book/data/scaling-<device>.json``:
    :func:`measure` with the full :meth:`Settings.default` ranges and progress bars."""
    device = timing.resolve_device(device)
    return measure(Settings.default(device, full), device, progress=True)
