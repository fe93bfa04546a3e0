"""Timing harness and the benchmarks behind ``python -m natlib bench ...``.

Times are medians from ``torch.utils.benchmark`` (which synchronises CUDA), measured in the
same process as the baselines they are compared with.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.utils.benchmark
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from natlib import curvature, kfac, optim, problems, runtime
from natlib.losses import likelihood

DIGITS_SIZES = (64, 20, 20, 20, 20, 20, 10)
CURVATURE_TARGET_S = 10.0


def median_seconds(
    fn: Callable[[], object], min_run_time: float = 1.0, clock: Callable[[], float] | None = None
) -> float:
    """Median wall-clock seconds of ``fn()`` over blocks totalling at least ``min_run_time``.

    Runs with torch's current thread count (``Timer`` would otherwise drop to one thread), so
    the ``threads`` that :func:`environment` records is the count the timing used.

    ``clock`` replaces the wall clock: ``time.process_time`` counts the CPU seconds of the
    (single) timing thread, which other processes on a shared machine do not inflate. It does
    not synchronise CUDA, so use it for CPU work only.
    """
    options = {} if clock is None else {"timer": clock}
    timer = torch.utils.benchmark.Timer(
        stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads(), **options
    )
    return timer.blocked_autorange(min_run_time=min_run_time).median


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak CUDA memory that ``fn()`` allocates above what was allocated before it, in bytes;
    ``None`` off CUDA, where the chapters count bytes analytically instead."""
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, object]:
    """Where a benchmark ran: device name, torch version, CPU threads, Python version."""
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


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


def vmap_einsum_fisher(model: nn.Module, loss_fn: nn.Module, X: Tensor) -> Tensor:
    r"""The straightforward baseline: all Jacobians by ``vmap(jacrev)``, then
    :math:`r \sum_n J_n^\top \Lambda_n J_n` by one ``einsum``."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    lik = likelihood(loss_fn)

    def output(p: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(model, p, (x.unsqueeze(0),))[0]

    jacobians = vmap(jacrev(output), in_dims=(None, 0))(params, X)
    J = torch.cat([j.flatten(2) for j in jacobians.values()], dim=2)  # (N, C, P)
    f = model(X).detach()
    hessians = lik.scale(f) * lik.hessian(f)
    return torch.einsum("nip,nij,njq->pq", J, hessians, J)


def naive_fisher(model: nn.Module, loss_fn: nn.Module, X: Tensor) -> Tensor:
    r""":math:`r \sum_n J_n^\top \Lambda_n J_n` with one autograd call per example and output."""
    params = list(model.parameters())
    lik = likelihood(loss_fn)
    f = model(X).detach()
    r = lik.scale(f)
    size = sum(p.numel() for p in params)
    F = f.new_zeros(size, size)
    for n in range(len(X)):
        out = model(X[n : n + 1])[0]
        rows = [
            torch.cat([g.flatten() for g in torch.autograd.grad(o, params, retain_graph=True)])
            for o in out
        ]
        J = torch.stack(rows)
        F += J.T @ lik.hessian(f[n : n + 1])[0] @ J
    return r * F


def _relative(a: Tensor, b: Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def curvature_benchmark(
    sizes: tuple[int, ...] = DIGITS_SIZES,
    examples: int | None = None,
    naive_examples: int = 64,
    min_run_time: float = 4.0,
) -> CurvatureBenchmark:
    """Time the exact Fisher of a tanh network (default 64-20-20-20-20-20-10) on the digits
    (default all 1,797) in float64 against :func:`vmap_einsum_fisher` and :func:`naive_fisher`.

    The naive loop runs on the first ``naive_examples`` examples and is extrapolated linearly
    (its cost is a sum of identical per-example terms).
    """
    dtype = torch.float64
    device = runtime.device()
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
    natlib_s = median_seconds(lambda: curvature.fisher(model, loss_fn, X), min_run_time)
    einsum_s = median_seconds(lambda: vmap_einsum_fisher(model, loss_fn, X), min_run_time)
    naive_s = median_seconds(lambda: naive_fisher(model, loss_fn, subset), min_run_time)
    return CurvatureBenchmark(
        parameters=sum(p.numel() for p in model.parameters()),
        examples=len(X),
        dtype=str(dtype).removeprefix("torch."),
        natlib_s=natlib_s,
        vmap_einsum_s=einsum_s,
        naive_s=naive_s * len(X) / naive_examples,
        naive_examples=naive_examples,
        max_relative_difference=difference,
        environment=environment(device),
    )


def write_json(record: object, path: Path) -> None:
    """Write a benchmark dataclass as JSON (``book/data/`` holds recorded runs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(record), indent=2) + "\n")


KFAC_WIDTHS = (512, 512, 512, 512, 512)  # four 512 x 512 layers
KFAC_BATCH = 512
KFAC_SETTINGS = ((10, 100), (1, 10))  # (T_cov, T_inv)
KFAC_TARGETS = {(10, 100): 2.0, (1, 10): 4.5}  # K-FAC / SGD step time, Monte-Carlo Fisher
KFAC_FISHERS = ("mc", "empirical")
_NEVER = 2**62  # a period no benchmark reaches


@dataclass(frozen=True)
class KFACBenchmark:
    """K-FAC step times against SGD's (both with momentum 0.9), seconds, medians.

    ``step_s`` is keyed ``"<fisher> <T_cov>/<T_inv>"`` and amortised over whole ``T_inv``
    cycles; ``shares`` splits a step into factors, eigendecompositions, preconditioning and
    the work SGD does too, from separately timed steps that do only part of the extra work;
    ``factors_s`` times :func:`natlib.kfac.kfac` (forward pass, output-gradient backward
    pass, factor products).
    """

    widths: tuple[int, ...]
    batch: int
    dtype: str
    rounds: int
    sgd_s: float
    step_s: dict[str, float]
    shares: dict[str, dict[str, float]]
    factors_s: dict[str, float]
    environment: dict[str, object] = field(default_factory=dict)

    def report(self) -> str:
        lines = [
            f"K-FAC step / SGD step, tanh MLP {'-'.join(map(str, self.widths))}, batch "
            f"{self.batch}, {self.dtype}, on {self.environment.get('device')}; medians of "
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
                f"{ratio:5.2f}x SGD{verdict}",
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
    rounds: int = 3,
    widths: tuple[int, ...] = KFAC_WIDTHS,
    batch: int = KFAC_BATCH,
) -> KFACBenchmark:
    """Time :class:`natlib.optim.KFAC` against ``torch.optim.SGD`` in float32 on a tanh MLP
    with random inputs and cross-entropy on random labels.

    Every configuration keeps its own model and optimiser; one round times, in turn, ten SGD
    steps and one full ``T_inv`` cycle of each K-FAC configuration, so that all of them see
    the same machine load.
    """
    dtype, device = torch.float32, runtime.device()
    generator = torch.Generator().manual_seed(0)
    X = torch.randn(batch, widths[0], generator=generator).to(dtype=dtype, device=device)
    y = torch.randint(widths[-1], (batch,), generator=generator).to(device)
    loss_fn = nn.CrossEntropyLoss()

    def steps(make_optimizer: Callable[[nn.Module], torch.optim.Optimizer], n: int):
        model = problems.mlp(widths, seed=0).to(dtype=dtype, device=device)
        optimizer = make_optimizer(model)

        def run() -> None:
            for _ in range(n):
                optimizer.zero_grad()
                loss_fn(model(X), y).backward()
                optimizer.step()

        return run

    def kfac_steps(fisher: str, T_cov: int, T_inv: int, n: int):
        options = dict(lr=1e-3, damping=1e-3, momentum=0.9, kl_clip=1e-3, fisher=fisher)
        options |= dict(T_cov=T_cov, T_inv=T_inv)
        return steps(lambda model: optim.KFAC(model, loss_fn, **options), n)

    def sgd_optimizer(model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    cycles = {"sgd": (steps(sgd_optimizer, 10), 10)}
    for fisher in KFAC_FISHERS:
        for T_cov, T_inv in KFAC_SETTINGS:
            cycles[f"{fisher} {T_cov}/{T_inv}"] = (kfac_steps(fisher, T_cov, T_inv, T_inv), T_inv)
    times: dict[str, list[float]] = {key: [] for key in cycles}
    for run, _ in cycles.values():
        run()  # warm-up, and the first factor and inverse update
    for _ in range(rounds):
        for key, (run, n) in cycles.items():
            times[key].append(median_seconds(run, min_run_time=0.0) / n)
    step_s = {key: float(torch.tensor(t).median()) for key, t in times.items()}
    sgd_s = step_s.pop("sgd")

    shares, factors_s = {}, {}
    for fisher in KFAC_FISHERS:
        part = {"sgd": median_seconds(steps(sgd_optimizer, 1), min_run_time=1.0)}
        for name, T_cov, T_inv in (("plain", _NEVER, _NEVER), ("cov", 1, _NEVER), ("inv", 1, 1)):
            run = kfac_steps(fisher, T_cov, T_inv, 1)
            run()
            part[name] = median_seconds(run, min_run_time=1.0)
        for T_cov, T_inv in KFAC_SETTINGS:
            seconds = {
                "factors": (part["cov"] - part["plain"]) / T_cov,
                "eigendecompositions": (part["inv"] - part["cov"]) / T_inv,
                "preconditioning": part["plain"] - part["sgd"],
                "forward/backward/update": part["sgd"],
            }
            total = sum(seconds.values())
            shares[f"{fisher} {T_cov}/{T_inv}"] = {k: v / total for k, v in seconds.items()}
        model = problems.mlp(widths, seed=0).to(dtype=dtype, device=device)
        factors_s[fisher] = median_seconds(
            lambda model=model, fisher=fisher: kfac.kfac(model, loss_fn, X, y, fisher=fisher),
            min_run_time=1.0,
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
        environment=environment(device),
    )
