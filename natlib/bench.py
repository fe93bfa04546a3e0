"""The benchmarks behind ``python -m natlib bench curvature|kfac`` (``kfac --model
mlp|cnn|transformer``); ``approximations`` is :mod:`natlib.fidelity`'s.

Times are medians from :mod:`natlib.timing`, measured in the same process as the baselines
they are compared with; the slow per-example references come from :mod:`natlib.reference`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from natlib import curvature, language, problems, runtime, timing
from natlib.factors import Approximation
from natlib.kfac import KFACApproximation
from natlib.optim import KFAC
from natlib.reference import naive_fisher
from natlib.reference import vmap_einsum_fisher as vmap_einsum_fisher

DIGITS_SIZES = (64, 20, 20, 20, 20, 20, 10)
CURVATURE_TARGET_S = 10.0


@dataclass(frozen=True)
class CurvatureBenchmark:
    """Exact-Fisher timings (seconds, medians) for one network and data set."""

    parameters: int
    examples: int
    dtype: str
    natlib_s: float
    vmap_einsum_s: float
    naive_s: float  # extrapolated from ``naive_examples`` to all examples
    naive_examples: int
    max_relative_difference: float  # natlib against both baselines
    environment: dict[str, object] = field(default_factory=dict)

    def report(self) -> str:
        verdict = "PASS" if self.natlib_s <= CURVATURE_TARGET_S else "FAIL"
        return "\n".join(
            [
                f"exact Fisher, {self.parameters} parameters, {self.examples} examples, "
                f"{self.dtype}, {self.environment.get('threads')} threads on "
                f"{self.environment.get('device')}",
                f"  natlib.curvature.fisher        {self.natlib_s:8.2f} s   "
                f"({verdict}: target <= {CURVATURE_TARGET_S:.0f} s)",
                f"  vmap(jacrev) + einsum          {self.vmap_einsum_s:8.2f} s   "
                f"{self.vmap_einsum_s / self.natlib_s:5.1f}x natlib",
                f"  naive per-example autograd     {self.naive_s:8.2f} s   "
                f"{self.naive_s / self.natlib_s:5.1f}x natlib  (timed on "
                f"{self.naive_examples} examples, extrapolated linearly)",
                f"  max relative difference to the baselines: {self.max_relative_difference:.1e}",
            ]
        )


def _relative(a: Tensor, b: Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def curvature_benchmark(
    sizes: tuple[int, ...] = DIGITS_SIZES,
    examples: int | None = None,
    naive_examples: int = 64,
    min_run_time: float = 4.0,
    device: str | torch.device | None = None,
) -> CurvatureBenchmark:
    """Time the exact Fisher of a tanh network (default 64-20-20-20-20-20-10) on the digits
    (default all 1,797) in float64 on ``device`` (default :func:`natlib.runtime.device`)
    against :func:`natlib.reference.vmap_einsum_fisher` and :func:`natlib.reference.naive_fisher`.

    The naive loop runs on the first ``naive_examples`` examples and is extrapolated linearly
    (its cost is a sum of identical per-example terms).
    """
    dtype = torch.float64
    device = timing.resolve_device(device)
    data = problems.digits(dtype=dtype, device=device)
    X = torch.cat([data.X_train, data.X_test])[:examples]
    model = problems.mlp(list(sizes), seed=0).to(dtype=dtype, device=device)
    loss_fn = data.loss_fn
    ours = curvature.fisher(model, loss_fn, X)
    baseline = vmap_einsum_fisher(model, loss_fn, X)
    subset = X[:naive_examples]
    difference = max(
        _relative(ours, baseline),
        _relative(curvature.fisher(model, loss_fn, subset), naive_fisher(model, loss_fn, subset)),
    )
    del ours, baseline
    seconds = timing.median_seconds
    natlib_s = seconds(lambda: curvature.fisher(model, loss_fn, X), min_run_time)
    einsum_s = seconds(lambda: vmap_einsum_fisher(model, loss_fn, X), min_run_time)
    naive_s = seconds(lambda: naive_fisher(model, loss_fn, subset), min_run_time)
    return CurvatureBenchmark(
        parameters=sum(p.numel() for p in model.parameters()),
        examples=len(X),
        dtype=str(dtype).removeprefix("torch."),
        natlib_s=natlib_s,
        vmap_einsum_s=einsum_s,
        naive_s=naive_s * len(X) / naive_examples,
        naive_examples=naive_examples,
        max_relative_difference=difference,
        environment=timing.environment(device),
    )


KFAC_WIDTHS = (512, 512, 512, 512, 512)  # four 512 x 512 layers
KFAC_BATCH = 512
KFAC_SETTINGS = ((10, 100), (1, 10))  # (T_cov, T_inv)
KFAC_TARGETS = {(10, 100): 1.8, (1, 10): 4.0}  # K-FAC / SGD step time, Monte-Carlo Fisher
KFAC_KINDS = ("mc", "empirical")
SHARE_LABELS = {  # KFACBenchmark.shares' names for natlib.costmodel.PARTS
    "forward_backward": "forward/backward/update",
    "factors": "factors",
    "precondition": "preconditioning",
    "refresh": "eigendecompositions",
}


@dataclass(frozen=True)
class KFACBenchmark:
    """K-FAC step times against SGD's (both with momentum 0.9), seconds, medians.

    ``step_s`` is keyed ``"<kind> <T_cov>/<T_inv>"`` and amortised over whole ``T_inv``
    cycles; ``shares`` splits a step into factors, eigendecompositions, preconditioning and
    the work SGD does too (:func:`natlib.timing.amortised_parts`, named by
    ``SHARE_LABELS``); ``factors_s`` times
    :meth:`natlib.kfac.KFACApproximation.from_batch` (forward pass, output-gradient backward
    pass, factor products); ``flop_ratio`` is chapter 4's FLOP model of the same step over
    SGD's (:meth:`natlib.kfac.KFACApproximation.step_cost`), which counts the matrix products
    and decompositions only.
    """

    widths: tuple[int, ...]
    batch: int
    dtype: str
    rounds: int
    sgd_s: float
    step_s: dict[str, float]
    shares: dict[str, dict[str, float]]
    factors_s: dict[str, float]
    flop_ratio: dict[str, float]
    environment: dict[str, object] = field(default_factory=dict)

    def report(self) -> str:
        lines = [
            f"K-FAC step / SGD step, tanh MLP {'-'.join(map(str, self.widths))}, batch "
            f"{self.batch}, {self.dtype}, on {self.environment.get('device')}, "
            f"{_threads(self.environment)}, {self.environment.get('clock')}; medians of "
            f"{self.rounds} interleaved rounds",
            f"  SGD (momentum 0.9)              {1e3 * self.sgd_s:7.1f} ms/step",
        ]
        for key, seconds in self.step_s.items():
            fisher, periods = key.split()
            ratio = seconds / self.sgd_s
            target = KFAC_TARGETS[tuple(map(int, periods.split("/")))]
            verdict = (
                f"   ({'PASS' if ratio <= target else 'FAIL'}: target <= {target}x)"
                if fisher == "mc"
                else ""
            )
            share = self.shares[key]
            lines += [
                f"  K-FAC {fisher:9s} T_cov/T_inv {periods:6s} {1e3 * seconds:7.1f} ms/step "
                f"{ratio:5.2f}x SGD (FLOP model {self.flop_ratio[key]:.2f}x){verdict}",
                "      shares: "
                + ", ".join(f"{part} {value:.0%}" for part, value in share.items()),
            ]
        for fisher, seconds in self.factors_s.items():
            lines.append(
                f"  factors alone ({fisher:9s})       {1e3 * seconds:7.1f} ms      "
                f"{seconds / self.sgd_s:5.2f}x SGD step"
            )
        return "\n".join(lines)


def kfac_benchmark(
    rounds: int = 5,
    widths: tuple[int, ...] = KFAC_WIDTHS,
    batch: int = KFAC_BATCH,
    device: str | torch.device | None = None,
    min_run_time: float = 1.0,
    threads: int = 1,
) -> KFACBenchmark:
    """Time :class:`natlib.optim.KFAC` (factored damping) against ``torch.optim.SGD`` in
    float32 on a tanh MLP with random inputs and cross-entropy on random labels
    (:func:`natlib.timing.random_mlp_problem`), on ``device`` (default
    :func:`natlib.runtime.device`).

    Every configuration keeps its own copy of the model and its optimiser; one round times, in
    turn, ten SGD steps and one full ``T_inv`` cycle of each K-FAC configuration, so that all
    of them see the same machine load. The shares come from :func:`natlib.timing.step_parts`
    (each part timed for ``min_run_time`` seconds). It runs on ``threads`` torch threads; on
    the CPU with one thread it reads the process's CPU clock (:func:`natlib.timing.cpu_clock`),
    which other processes on a shared machine disturb least, and the wall clock otherwise.
    """
    with runtime.threads(threads):
        return _kfac_benchmark(rounds, widths, batch, device, min_run_time)


def _kfac_benchmark(
    rounds: int,
    widths: tuple[int, ...],
    batch: int,
    device: str | torch.device | None,
    min_run_time: float,
) -> KFACBenchmark:
    dtype, device = torch.float32, timing.resolve_device(device)
    model, X, y, loss_fn = timing.random_mlp_problem(
        widths, batch, "cross_entropy", device, dtype, seed=0
    )
    sgd = {"lr": 1e-3, "momentum": 0.9}

    def options(kind: str) -> dict[str, object]:
        return {**sgd, "damping": 1e-3, "kl_clip": 1e-3, "kind": kind, "damping_mode": "pi"}

    makers = {"sgd": (lambda net: torch.optim.SGD(net.parameters(), **sgd), 10)}
    for kind in KFAC_KINDS:
        for T_cov, T_inv in KFAC_SETTINGS:
            makers[f"{kind} {T_cov}/{T_inv}"] = (
                lambda net, kind=kind, T_cov=T_cov, T_inv=T_inv: KFAC(
                    net, loss_fn, T_cov=T_cov, T_inv=T_inv, **options(kind)
                ),
                T_inv,
            )
    clock = timing.cpu_clock(device) if torch.get_num_threads() == 1 else None
    step_s = timing.cycle_step_seconds(model, loss_fn, X, y, makers, rounds, clock)
    sgd_s = step_s.pop("sgd")

    shares, factors_s, flop_ratio = {}, {}, {}
    for kind in KFAC_KINDS:
        parts = timing.step_parts(model, loss_fn, X, y, sgd, options(kind))
        fns = [parts.fns[part] for part in timing.STEP_PARTS]
        seconds = [timing.median_seconds(fn, min_run_time, clock) for fn in fns]
        parts.close()
        estimate = KFACApproximation.from_batch(model, loss_fn, X, y, kind=kind)
        for T_cov, T_inv in KFAC_SETTINGS:
            flop_ratio[f"{kind} {T_cov}/{T_inv}"] = estimate.step_cost(T_cov, T_inv).overhead
            amortised = timing.amortised_parts(*seconds, T_cov, T_inv)
            total = sum(amortised.values())
            shares[f"{kind} {T_cov}/{T_inv}"] = {
                SHARE_LABELS[part]: amortised[part] / total
                for part in ("factors", "refresh", "precondition", "forward_backward")
            }
        factors_s[kind] = timing.median_seconds(
            lambda kind=kind: KFACApproximation.from_batch(model, loss_fn, X, y, kind=kind),
            min_run_time,
            clock,
        )
    return KFACBenchmark(
        widths=tuple(widths),
        batch=batch,
        dtype="float32",
        rounds=rounds,
        sgd_s=sgd_s,
        step_s=step_s,
        shares=shares,
        factors_s=factors_s,
        flop_ratio=flop_ratio,
        environment={
            **timing.environment(device),
            "clock": "wall clock" if clock is None else "CPU time of the process",
        },
    )


Architecture = Literal["cnn", "transformer"]
ARCHITECTURE_BATCH = {"cnn": 256, "transformer": 8}
ARCHITECTURE_PERIODS = (1, 10)  # (T_cov, T_inv)
APPROXIMATIONS = get_args(Approximation)


@dataclass(frozen=True)
class ArchitectureBenchmark:
    """K-FAC step times (Monte-Carlo Fisher, factored damping, T_cov/T_inv = 1/10, amortised
    over a ``T_inv`` cycle) against SGD's, both with momentum 0.9; seconds, medians."""

    model: str
    parameters: int
    batch: int
    positions: int  # tokens per example (transformer) or 8 x 8 pixels (cnn)
    dtype: str
    rounds: int
    sgd_s: float
    step_s: dict[str, float]  # keyed by approximation
    environment: dict[str, object] = field(default_factory=dict)

    def report(self) -> str:
        lines = [
            f"K-FAC step / SGD step, {self.model} ({self.parameters} parameters), batch "
            f"{self.batch} x {self.positions} positions, {self.dtype}, on "
            f"{self.environment.get('device')}, {_threads(self.environment)}, "
            f"{self.environment.get('clock', 'wall clock')}; medians of {self.rounds} "
            "interleaved rounds",
            f"  SGD (momentum 0.9)                  {1e3 * self.sgd_s:8.1f} ms/step",
        ]
        T_cov, T_inv = ARCHITECTURE_PERIODS
        for approximation, seconds in self.step_s.items():
            lines.append(
                f"  K-FAC-{approximation:6s} mc T_cov/T_inv {T_cov}/{T_inv}  "
                f"{1e3 * seconds:8.1f} ms/step {seconds / self.sgd_s:6.2f}x SGD"
            )
        return "\n".join(lines)


def _threads(environment: dict[str, object]) -> str:
    threads = environment.get("threads")
    return f"{threads} thread{'' if threads == 1 else 's'}"


def architecture_problem(
    name: Architecture, batch: int, device: torch.device, **model_options: int
) -> tuple[nn.Module, Tensor, Tensor, nn.Module, int]:
    """``(model, X, y, loss_fn, positions)`` in float32: :func:`natlib.problems.digits_cnn` on
    the first ``batch`` training digits, or :func:`natlib.language.transformer` (default: about
    :math:`10^6` parameters, context 128) on ``batch`` windows of the standard library."""
    if name == "cnn":
        data = problems.digits(dtype=torch.float32, device=device)
        model = problems.digits_cnn(seed=0, **model_options).to(device)
        return model, data.X_train[:batch], data.y_train[:batch], data.loss_fn, 64
    if name != "transformer":
        raise ValueError(f"model {name!r} is not supported; use 'cnn' or 'transformer'.")
    model = language.transformer(seed=0, **model_options).to(device)
    context = model.context
    data = language.stdlib_chars(context, train_chars=(batch + 1) * context, test_chars=1)
    X, y = data.X_train[:batch].to(device), data.y_train[:batch].flatten().to(device)
    return model, X, y, data.loss_fn, context


def architecture_benchmark(
    name: Architecture,
    rounds: int = 5,
    batch: int | None = None,
    device: str | torch.device | None = None,
    **model_options: int,
) -> ArchitectureBenchmark:
    """Time :class:`natlib.optim.KFAC` with K-FAC-expand and K-FAC-reduce against
    ``torch.optim.SGD`` on the CNN or the transformer of :func:`architecture_problem`
    (``unsupported="gradient"``: LayerNorm and Embedding take gradient steps), like
    :func:`kfac_benchmark`: one model copy per configuration, interleaved rounds.

    On the CPU it times with one torch thread on the process's CPU seconds
    (:func:`natlib.timing.cpu_clock`): with several threads on a loaded machine, wall-clock
    step times swing by several times between rounds (a descheduled thread stalls a
    parallel matrix product), enough to rank K-FAC's step below SGD's.
    """
    device = timing.resolve_device(device)
    with runtime.threads(1):
        return _architecture_benchmark(name, rounds, batch, device, **model_options)


def _architecture_benchmark(
    name: Architecture, rounds: int, batch: int | None, device: torch.device, **model_options: int
) -> ArchitectureBenchmark:
    batch = batch or ARCHITECTURE_BATCH[name]
    model, X, y, loss_fn, positions = architecture_problem(name, batch, device, **model_options)
    sgd = {"lr": 1e-3, "momentum": 0.9}
    T_cov, T_inv = ARCHITECTURE_PERIODS
    kfac = {**sgd, "damping": 1e-3, "kl_clip": 1e-3, "kind": "mc", "T_cov": T_cov}
    makers = {"sgd": (lambda net: torch.optim.SGD(net.parameters(), **sgd), T_inv)}
    for approximation in APPROXIMATIONS:
        makers[approximation] = (
            lambda net, approximation=approximation: KFAC(
                net,
                loss_fn,
                T_inv=T_inv,
                approximation=approximation,
                unsupported="gradient",
                **kfac,
            ),
            T_inv,
        )
    clock = timing.cpu_clock(device)
    step_s = timing.cycle_step_seconds(model, loss_fn, X, y, makers, rounds, clock)
    return ArchitectureBenchmark(
        model=name,
        parameters=sum(p.numel() for p in model.parameters()),
        batch=batch,
        positions=positions,
        dtype="float32",
        rounds=rounds,
        sgd_s=step_s.pop("sgd"),
        step_s=step_s,
        environment=timing.environment(device)
        | {"clock": "CPU time of the process" if clock else "wall clock"},
    )
