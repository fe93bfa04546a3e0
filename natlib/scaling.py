r"""How K-FAC's cost grows: a FLOP model of one step, timing sweeps, slope fits and records.

For an MLP of :math:`L` square layers of width :math:`d` trained with batches of :math:`B`
examples, one K-FAC step (Martens & Grosse, 2015, §8) costs, in multiply-add pairs counted as
two floating-point operations (FLOPs):

=====================  =========================================  ==========================
part                   FLOPs                                      runs
=====================  =========================================  ==========================
forward + backward     :math:`6BLd^2`                             every step (SGD's cost)
factors :math:`A, G`   :math:`4BLd^2` (:math:`2Bd^2` each)        every :math:`T_\text{cov}`
sampled backward       :math:`2BLd^2` (Monte-Carlo Fisher)        every :math:`T_\text{cov}`
preconditioning        :math:`4Ld^3` (:math:`G^{-1} V A^{-1}`)    every step
refresh                :math:`2(c + 2)Ld^3`                       every :math:`T_\text{inv}`
=====================  =========================================  ==========================

where :math:`c\,d^3` is the cost of one symmetric eigendecomposition measured in the same
units (about 9 by Golub & Van Loan's count; measured on each machine by
:meth:`LayerSweep.eigh_constant`) and :math:`2d^3` forms a damped inverse from it. The overhead
over SGD is therefore

.. math:: \frac{\text{K-FAC}}{\text{SGD}} = 1 + \frac{1}{T_\text{cov}} + \frac{2d}{3B}
          + \frac{(c + 2)\,d}{3B\,T_\text{inv}} .

Timings use :func:`natlib.bench.median_seconds` (``torch.utils.benchmark``, one CPU thread).
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import median
from typing import Literal

import numpy as np
import torch
from scipy import stats
from torch import Tensor, nn
from tqdm import tqdm

from natlib import bench, problems, runtime
from natlib.kfac import (
    EIGH_FLOPS_PER_CUBE,
    DampedInverse,
    eigh,
    gradient_factor,
    input_factor,
    kfac,
)
from natlib.optim import KFAC

SCHEMA = "natlib.scaling/1"
PIECES = ("factors", "eigh", "cholesky", "precondition")
PIECE_LABELS = {
    "factors": r"factors $A, G$ (fixed $B$)",
    "eigh": "eigendecomposition (one factor)",
    "cholesky": "Cholesky + inverse (one factor)",
    "precondition": r"preconditioning $G^{-1} V A^{-1}$",
}
INVERSE_FLOPS_PER_CUBE = 2  # (Q / lambda) Q^T after the eigendecomposition
ONCE = 2**31 - 1  # an update period that no benchmark reaches: the update runs at step 0 only
DAMPING = 1e-3
LEARNING_RATE = 1e-6  # timing runs must stay finite, not make progress
TIMING_THREADS = 1  # torch.utils.benchmark.Timer's default
PARTS = ("forward_backward", "factors", "precondition", "refresh")
GROUPS = {
    "per-example work": ("forward_backward", "factors"),
    "preconditioning": ("precondition",),
    "refresh": ("refresh",),
}
FactorForm = Literal["full", "blocks", "diagonal", "identity"]


def geometric_widths(low: int, high: int, per_octave: int = 2) -> list[int]:
    """Widths :math:`\\mathrm{round}(\\text{low} \\cdot 2^{k/p})`, ``per_octave`` :math:`= p`,
    up to ``high``."""
    if not 0 < low <= high or per_octave < 1:
        raise ValueError(
            f"need 0 < low <= high and per_octave >= 1, got {low}, {high}, {per_octave}."
        )
    count = math.floor(per_octave * math.log2(high / low) + 1e-9)
    return [round(low * 2 ** (k / per_octave)) for k in range(count + 1)]


# --------------------------------------------------------------------------- the cost model


@dataclass(frozen=True)
class StepCost:
    """FLOPs of one K-FAC step by part, amortised over the update periods (see the module)."""

    forward_backward: float
    factors: float
    sampled_backward: float
    precondition: float
    refresh: float

    @property
    def total(self) -> float:
        return sum(asdict(self).values())

    @property
    def overhead(self) -> float:
        """K-FAC step over SGD step (forward and backward only)."""
        return self.total / self.forward_backward

    def parts(self) -> dict[str, float]:
        """FLOPs by :data:`PARTS` (the sampled backward counts with the factors, as measured)."""
        return {
            "forward_backward": self.forward_backward,
            "factors": self.factors + self.sampled_backward,
            "precondition": self.precondition,
            "refresh": self.refresh,
        }

    def dominant(self) -> str:
        """The most expensive of :data:`GROUPS`."""
        return dominant(self.parts())


def dominant(parts: dict[str, float]) -> str:
    r"""The group of :data:`GROUPS` whose parts cost most: the work that grows with the batch
    (:math:`\propto Bd^2`; forward-backward and factors tie at :math:`T_\text{cov} = 1`), the
    preconditioning, or the refresh."""
    return max(GROUPS, key=lambda group: sum(parts[part] for part in GROUPS[group]))


def step_cost(
    width: float,
    batch: float,
    depth: int = 1,
    T_cov: int = 1,
    T_inv: int = 1,
    eigh_constant: float = EIGH_FLOPS_PER_CUBE,
    fisher: Literal["mc", "empirical"] = "mc",
) -> StepCost:
    r"""The FLOP model of one K-FAC step with factored (``"pi"``) damping.

    :math:`6BLd^2` forward and backward, :math:`(4 + 2[\text{mc}])BLd^2 / T_\text{cov}` for the
    factors and the sampled backward, :math:`4Ld^3` preconditioning, and :math:`2(c + 2)Ld^3 /
    T_\text{inv}` for the eigendecompositions and damped inverses (Martens & Grosse, 2015, §8).
    """
    if fisher not in ("mc", "empirical"):
        raise ValueError(f"fisher {fisher!r} is not supported; use 'mc' or 'empirical'.")
    if min(width, batch, depth, T_cov, T_inv) <= 0:
        raise ValueError("width, batch, depth, T_cov and T_inv must be positive.")
    square, cube = depth * width**2, depth * width**3
    return StepCost(
        forward_backward=6 * batch * square,
        factors=4 * batch * square / T_cov,
        sampled_backward=(2 * batch * square / T_cov) if fisher == "mc" else 0.0,
        precondition=4 * cube,
        refresh=2 * (eigh_constant + INVERSE_FLOPS_PER_CUBE) * cube / T_inv,
    )


@dataclass(frozen=True)
class LayerMemory:
    """Bytes of one ``nn.Linear`` layer's weights, its factors :math:`A, G`, and their damped
    inverses."""

    weights: int
    factors: int
    inverses: int


def layer_memory(d_in: int, d_out: int, element_size: int = 4, bias: bool = True) -> LayerMemory:
    r"""Weights :math:`d_\text{out}(d_\text{in} + [b])` against factors and inverses
    :math:`(d_\text{in} + [b])^2 + d_\text{out}^2` each, times ``element_size`` bytes."""
    d_a = d_in + int(bias)
    factors = (d_a**2 + d_out**2) * element_size
    return LayerMemory(d_out * d_a * element_size, factors, factors)


@dataclass(frozen=True)
class FactorCost:
    """Storage and FLOPs of one side's factor in a chosen form."""

    form: FactorForm
    bytes: int
    refresh_flops: float  # per refresh
    apply_flops: float  # per step, on a (d, other) gradient matrix


def factor_cost(
    d: int,
    other: int,
    form: FactorForm,
    block: int = 1024,
    element_size: int = 4,
    eigh_constant: float = EIGH_FLOPS_PER_CUBE,
) -> FactorCost:
    r"""What a :math:`d \times d` factor costs when kept ``"full"``, as diagonal ``"blocks"`` of
    size ``block``, as its ``"diagonal"``, or dropped (``"identity"``).

    Full: :math:`d^2` entries, :math:`(c + 2)d^3` to refresh, :math:`2d^2 m` to apply to a
    :math:`d \times m` gradient; blocks of size :math:`b`: :math:`db`, :math:`(c + 2)db^2`,
    :math:`2dbm`; diagonal: :math:`d`, :math:`d`, :math:`dm` (the block-wise and diagonal forms
    of large layers in distributed Shampoo, Anil et al., 2020).
    """
    per_cube = eigh_constant + INVERSE_FLOPS_PER_CUBE
    if form == "full":
        return FactorCost(form, d * d * element_size, per_cube * d**3, 2 * d * d * other)
    if form == "blocks":
        sizes = [block] * (d // block) + ([d % block] if d % block else [])
        return FactorCost(
            form,
            sum(s * s for s in sizes) * element_size,
            per_cube * sum(s**3 for s in sizes),
            2 * sum(s * s for s in sizes) * other,
        )
    if form == "diagonal":
        return FactorCost(form, d * element_size, d, d * other)
    if form == "identity":
        return FactorCost(form, 0, 0, 0)
    raise ValueError(f"form {form!r} is not supported; use full, blocks, diagonal or identity.")


# --------------------------------------------------------------------------- the slope fit


@dataclass(frozen=True)
class SlopeFit:
    r"""A least-squares fit :math:`\log y = \text{slope} \cdot \log x + \log \text{scale}` with a
    confidence interval ``(low, high)`` for the slope."""

    slope: float
    low: float
    high: float
    scale: float
    points: int

    def within(self, low: float, high: float) -> bool:
        return low <= self.slope <= high

    def verdict(self, name: str, low: float, high: float) -> str:
        """A line that does not change with timing noise as long as the slope stays inside."""
        return f"{name} slope within [{low}, {high}]: {'yes' if self.within(low, high) else 'no'}"

    def __str__(self) -> str:
        return f"{self.slope:.2f} [{self.low:.2f}, {self.high:.2f}] over {self.points} points"


def fit_slope(
    x: Sequence[float], y: Sequence[float], lower: float | None = None, confidence: float = 0.95
) -> SlopeFit:
    """Fit a power law to the points with ``x >= lower`` (default: the top two octaves,
    ``max(x) / 4``); the interval is Student's t on the slope's standard error."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-d of one length, got {x.shape} and {y.shape}.")
    keep = x >= (x.max() / 4 if lower is None else lower)
    if not (np.all(x[keep] > 0) and np.all(y[keep] > 0)):
        raise ValueError("a log-log fit needs positive x and y.")
    if keep.sum() < 3:
        raise ValueError(f"a slope with an interval needs 3 points or more, got {keep.sum()}.")
    result = stats.linregress(np.log(x[keep]), np.log(y[keep]))
    half = stats.t.ppf(0.5 + confidence / 2, keep.sum() - 2) * result.stderr
    return SlopeFit(
        float(result.slope),
        float(result.slope - half),
        float(result.slope + half),
        float(np.exp(result.intercept)),
        int(keep.sum()),
    )


# --------------------------------------------------------------------------- per-layer sweep


def _seconds(fn: Callable[[], object], device: torch.device, min_run_time: float) -> float:
    """:func:`natlib.bench.median_seconds`; on the CPU in CPU seconds (``time.process_time``)."""
    clock = time.process_time if device.type == "cpu" else None
    return bench.median_seconds(fn, min_run_time, clock)


def layer_pieces(
    width: int, batch: int, device: torch.device, dtype: torch.dtype = torch.float32, seed: int = 0
) -> dict[str, Callable[[], object]]:
    """The pieces of one square layer's K-FAC work, on random inputs of the given width.

    ``factors``: :func:`natlib.kfac.input_factor` and :func:`natlib.kfac.gradient_factor` of a
    batch; ``eigh``: :func:`natlib.kfac.eigh` of one factor; ``cholesky``: one damped inverse by
    Cholesky; ``precondition``: :meth:`natlib.kfac.DampedInverse.apply`. A square layer's
    :math:`A` and :math:`G` have the same size, so it pays ``eigh`` or ``cholesky`` twice.
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
    inverse = DampedInverse(cholesky_inverse(G), cholesky_inverse(A))
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
        """:func:`fit_slope` of one piece's seconds against the width."""
        return fit_slope(self.widths, self.seconds[piece], lower)

    def _upper(self) -> list[tuple[int, dict[str, float]]]:
        top = max(self.widths) / 4
        return [
            (d, {piece: times[i] for piece, times in self.seconds.items()})
            for i, d in enumerate(self.widths)
            if d >= top
        ]

    def flop_rate(self) -> float:
        """Matrix-product FLOP/s: the median of :math:`4d^3 / t_\\text{precondition}` over the
        top two octaves of widths."""
        return median(4 * d**3 / t["precondition"] for d, t in self._upper())

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
    pieces = [layer_pieces(width, batch, device, dtype) for width in widths]
    times: dict[str, list[list[float]]] = {piece: [[] for _ in widths] for piece in PIECES}
    for _ in tqdm(range(rounds), desc="per-layer sweep", disable=not progress):
        for i, fns in enumerate(pieces):
            for piece, fn in fns.items():
                times[piece][i].append(_seconds(fn, device, min_run_time))
    return LayerSweep(
        list(widths), batch, {piece: [median(t) for t in times[piece]] for piece in PIECES}
    )


# --------------------------------------------------------------------------- whole steps


@dataclass(frozen=True)
class StepTimes:
    """Median seconds of whole training steps of an MLP (``depth`` tanh layers of ``width``,
    batch ``batch``, ``MSELoss``) with SGD and with :class:`natlib.optim.KFAC`.

    ``kfac_s``: a K-FAC step that neither updates factors nor refreshes inverses
    (forward, backward, preconditioning); ``kfac_factors_s``: one that updates the factors
    (Monte-Carlo Fisher: plus the sampled backward); ``refresh_s``: eigendecompositions and
    damped inverses of every layer. Peak bytes are measured on CUDA only.
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
        """Amortised seconds by :data:`PARTS`, as differences of the measured steps."""
        return {
            "forward_backward": self.sgd_s,
            "factors": (self.kfac_factors_s - self.kfac_s) / T_cov,
            "precondition": self.kfac_s - self.sgd_s,
            "refresh": self.refresh_s / T_inv,
        }

    def dominant(self, T_cov: int = 1, T_inv: int = 1) -> str:
        """The most expensive of :data:`GROUPS`."""
        return dominant(self.parts(T_cov, T_inv))

    @property
    def precondition_overhead(self) -> float:
        """What preconditioning adds, relative to SGD (the model: :math:`2d/(3B)`)."""
        return self.kfac_s / self.sgd_s - 1


def training_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: nn.Module, X: Tensor, y: Tensor
) -> Callable[[], None]:
    """One step of the usual loop: zero the gradients, forward, backward, ``optimizer.step()``."""

    def step() -> None:
        optimizer.zero_grad()
        loss_fn(model(X), y).backward()
        optimizer.step()

    return step


STEP_PARTS = ("sgd", "kfac", "kfac_factors", "refresh")


def _mlp_problem(
    width: int, batch: int, depth: int, device: torch.device, dtype: torch.dtype, seed: int
) -> tuple[nn.Module, Tensor, Tensor, nn.Module]:
    """A tanh MLP of ``depth`` square layers, a random batch and random targets, ``MSELoss``."""
    generator = torch.Generator().manual_seed(seed)
    model = problems.mlp([width] * (depth + 1), seed=seed).to(device=device, dtype=dtype)
    X, y = (torch.randn(batch, width, generator=generator, dtype=dtype).to(device) for _ in "Xy")
    return model, X, y, nn.MSELoss()


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
    model, X, y, loss_fn = _mlp_problem(width, batch, depth, device, dtype, seed)
    optimizer = KFAC(model, loss_fn, lr=LEARNING_RATE, damping=DAMPING, T_cov=T_cov, T_inv=T_inv)
    step = training_step(model, optimizer, loss_fn, X, y)

    def cycle() -> None:
        for _ in range(T_inv):
            step()

    seconds = _seconds(cycle, device, min_run_time) / T_inv
    optimizer.remove_hooks()
    return seconds


def _step_parts(
    width: int, batch: int, depth: int, device: torch.device, dtype: torch.dtype, seed: int
) -> tuple[dict[str, Callable[[], object]], dict[str, int | None], list[KFAC]]:
    """The functions :func:`step_sweep` times for one MLP (each optimiser on its own copy), the
    peak memory of each one's first step (every update runs), and the K-FAC optimisers."""
    model, X, y, loss_fn = _mlp_problem(width, batch, depth, device, dtype, seed)
    fns: dict[str, Callable[[], object]] = {}
    optimizers = []
    for name, T_cov, T_inv in (("sgd", 0, 0), ("kfac", ONCE, ONCE), ("kfac_factors", 1, ONCE)):
        net = copy.deepcopy(model)
        if name == "sgd":
            optimizer: torch.optim.Optimizer = torch.optim.SGD(net.parameters(), lr=LEARNING_RATE)
        else:
            optimizer = KFAC(
                net, loss_fn, lr=LEARNING_RATE, damping=DAMPING, T_cov=T_cov, T_inv=T_inv
            )
            optimizers.append(optimizer)
        fns[name] = training_step(net, optimizer, loss_fn, X, y)
    peaks = {name: bench.peak_memory_bytes(fn, device) for name, fn in fns.items()}
    mc = torch.Generator(device).manual_seed(seed)
    factors = kfac(model, loss_fn, X, fisher="mc", generator=mc).factors.values()
    fns["refresh"] = lambda: [
        DampedInverse.of(eigh(A, "A"), eigh(G, "G"), DAMPING, "pi") for A, G in factors
    ]
    return fns, peaks, optimizers


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
    built = [_step_parts(*config, device, dtype, seed) for config in configs]
    times = [{part: [] for part in STEP_PARTS} for _ in configs]
    for _ in tqdm(range(rounds), desc="step sweep", disable=not progress):
        for (fns, _, _), record in zip(built, times):
            for part, fn in fns.items():
                record[part].append(_seconds(fn, device, min_run_time))
    for _, _, optimizers in built:
        for optimizer in optimizers:
            optimizer.remove_hooks()
    return [
        StepTimes(
            *config,
            *(median(record[part]) for part in STEP_PARTS),
            peaks["sgd"],
            peaks["kfac_factors"],
        )
        for config, (_, peaks, _), record in zip(configs, built, times)
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

    threads = torch.get_num_threads()
    torch.set_num_threads(TIMING_THREADS)
    try:
        layer = layer_sweep(s.widths, s.batch, device, dtype, s.rounds, s.min_run_time, progress)
        by_width = steps([(d, s.batch, s.depth) for d in s.step_widths])
        by_batch = steps([(s.width, b, s.depth) for b in s.step_batches])
        by_depth = steps([(s.width, s.batch, L) for L in s.depths])
    finally:
        torch.set_num_threads(threads)
    clock = "CPU time of one thread" if device.type == "cpu" else "wall clock"
    return ScalingRecord(
        environment={
            **bench.environment(device),
            "threads": TIMING_THREADS,
            "clock": clock,
            "dtype": str(dtype).removeprefix("torch."),
        },
        settings=s,
        layer=layer,
        by_width=by_width,
        by_batch=by_batch,
        by_depth=by_depth,
    )


def write_record(record: ScalingRecord, path: Path) -> None:
    """Write a record as JSON (:func:`natlib.bench.write_json`)."""
    bench.write_json(record, path)


def read_record(path: Path) -> ScalingRecord:
    """Read a record written by :func:`write_record`.

    Raises:
        ValueError: if the file is not a scaling record of this schema or misses a field.
    """
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ValueError(f"{path} is not a {SCHEMA} record (schema {data.get('schema')!r}).")
    try:
        return ScalingRecord(
            environment=data["environment"],
            settings=Settings(**data["settings"]),
            layer=LayerSweep(**data["layer"]),
            by_width=[StepTimes(**s) for s in data["by_width"]],
            by_batch=[StepTimes(**s) for s in data["by_batch"]],
            by_depth=[StepTimes(**s) for s in data["by_depth"]],
        )
    except (KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a complete {SCHEMA} record: {error}") from None


def benchmark(device: str | torch.device | None = None, full: bool = True) -> ScalingRecord:
    """``python -m natlib bench scaling --device cpu|cuda --out book/data/scaling-<device>.json``:
    :func:`measure` with the full :meth:`Settings.default` ranges and progress bars."""
    device = runtime.device() if device is None else torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asks for a GPU, but torch sees no CUDA device.")
    return measure(Settings.default(device, full), device, progress=True)
