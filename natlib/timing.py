r"""The timing harness shared by ``python -m natlib bench ...`` and the scaling sweeps.

- :func:`median_seconds`: medians from ``torch.utils.benchmark`` (which synchronises CUDA);
  :func:`cpu_clock` swaps in the process's CPU time on the CPU, which other processes on a
  shared machine do not inflate;
- :func:`interleaved_medians`: many timings in interleaved rounds, so that a burst of load
  hits all of them alike;
- :func:`peak_memory_bytes`, :func:`environment`, :func:`write_json`: what a record holds;
- :func:`random_mlp_problem` and :func:`training_step`: the one problem and the one training
  loop every timing runs;
- :func:`step_parts`: the one way a K-FAC step is split into its parts. Next to an SGD step
  it times a K-FAC step that neither updates the factors nor refreshes the inverses
  (:math:`t_0`: forward, backward, preconditioning), one that updates the factors
  (:math:`t_\text{factors}`) and one refresh on its own (:math:`t_\text{refresh}`);
  :func:`amortised_parts` composes them into a step with periods :math:`T_\text{cov}`,
  :math:`T_\text{inv}`:

  .. math:: t = t_0 + (t_\text{factors} - t_0) / T_\text{cov} + t_\text{refresh} / T_\text{inv}.
"""

from __future__ import annotations

import copy
import json
import platform
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import median
from typing import Any, Literal

import torch
import torch.utils.benchmark
from torch import Tensor, nn
from tqdm import tqdm

from natlib import problems, runtime
from natlib.checks import check_choice, check_positive_int
from natlib.optim import KFAC

TimingLoss = Literal["mse", "cross_entropy"]
#: An update period that no run reaches, so that the update runs at step 0 only.
ONCE = 2**31 - 1
#: The steps :func:`step_parts` times.
STEP_PARTS = ("sgd", "kfac", "kfac_factors", "refresh")


# --------------------------------------------------------------------------- clocks


def median_seconds(
    fn: Callable[[], object], min_run_time: float = 1.0, clock: Callable[[], float] | None = None
) -> float:
    """Median wall-clock seconds of ``fn()`` over blocks totalling at least ``min_run_time``.

    Runs with torch's current thread count (``Timer`` would otherwise drop to one thread), so
    the ``threads`` that :func:`environment` records is the count the timing used.

    ``clock`` replaces the wall clock: ``time.process_time`` counts the CPU seconds of the
    process, which other processes on a shared machine do not inflate (with one thread, the
    seconds of that thread). It does not synchronise CUDA, so use it for CPU work only.
    """
    options = {} if clock is None else {"timer": clock}
    timer = torch.utils.benchmark.Timer(
        stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads(), **options
    )
    return timer.blocked_autorange(min_run_time=min_run_time).median


def cpu_clock(device: torch.device) -> Callable[[], float] | None:
    """``time.process_time`` on the CPU, ``None`` (the synchronising wall clock) elsewhere."""
    return time.process_time if device.type == "cpu" else None


def interleaved_medians(
    timers: Mapping[Hashable, Callable[[], float]],
    rounds: int,
    desc: str | None = None,
) -> dict[Hashable, float]:
    """Call every timer (a function returning seconds) once per round, in turn, ``rounds``
    times, and keep each one's median; ``desc`` shows a progress bar with that title."""
    check_positive_int("rounds", rounds)
    seconds: dict[Hashable, list[float]] = {key: [] for key in timers}
    for _ in tqdm(range(rounds), desc=desc, disable=desc is None):
        for key, timer in timers.items():
            seconds[key].append(timer())
    return {key: median(values) for key, values in seconds.items()}


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak CUDA memory that ``fn()`` allocates above what was allocated before it, in bytes;
    ``None`` off CUDA (``fn`` still runs once), where the chapters count bytes analytically."""
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


# --------------------------------------------------------------------------- records


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device``, or :func:`natlib.runtime.device` for ``None``.

    Raises:
        RuntimeError: if it asks for CUDA and torch sees no CUDA device.
    """
    device = runtime.device() if device is None else torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asks for a GPU, but torch sees no CUDA device.")
    return device


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


def read_json(path: Path, schema: str) -> dict[str, Any]:
    """The JSON object of a record file whose ``"schema"`` field is ``schema``.

    Raises:
        ValueError: if the file is not a JSON object or holds another schema.
    """
    data = json.loads(Path(path).read_text())
    found = data.get("schema") if isinstance(data, dict) else None
    if found != schema:
        raise ValueError(f"{path} is not a {schema} record (schema {found!r}).")
    return data


def write_json(record: object, path: Path) -> None:
    """Write a record dataclass as JSON, creating the folder (``book/data/`` holds recorded
    runs)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(record), indent=2) + "\n")


# --------------------------------------------------------------------------- the problem


def random_mlp_problem(
    sizes: Sequence[int],
    batch: int,
    loss: TimingLoss,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> tuple[nn.Module, Tensor, Tensor, nn.Module]:
    """A tanh MLP (:func:`natlib.problems.mlp` with ``sizes``), a batch of standard normal
    inputs, and random targets: standard normal for ``"mse"`` (``MSELoss``), uniform labels
    for ``"cross_entropy"`` (``CrossEntropyLoss``). Timings need shapes, not learning.

    Returns:
        ``(model, X, y, loss_fn)`` on ``device`` in ``dtype``.
    """
    check_choice("loss", loss, TimingLoss)
    check_positive_int("batch", batch)
    generator = torch.Generator().manual_seed(seed)
    model = problems.mlp(list(sizes), seed=seed).to(device=device, dtype=dtype)
    X = torch.randn(batch, sizes[0], generator=generator, dtype=dtype).to(device)
    if loss == "mse":
        y = torch.randn(batch, sizes[-1], generator=generator, dtype=dtype).to(device)
        return model, X, y, nn.MSELoss()
    y = torch.randint(sizes[-1], (batch,), generator=generator).to(device)
    return model, X, y, nn.CrossEntropyLoss()


def training_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    X: Tensor,
    y: Tensor,
    steps: int = 1,
) -> Callable[[], None]:
    """``steps`` steps of the usual loop: zero the gradients, forward, backward,
    ``optimizer.step()``."""
    check_positive_int("steps", steps)

    def run() -> None:
        for _ in range(steps):
            optimizer.zero_grad()
            loss_fn(model(X), y).backward()
            optimizer.step()

    return run


# --------------------------------------------------------------------------- the splitter


def cycle_step_seconds(
    model: nn.Module,
    loss_fn: nn.Module,
    X: Tensor,
    y: Tensor,
    makers: dict[str, tuple[Callable[[nn.Module], torch.optim.Optimizer], int]],
    rounds: int,
    clock: Callable[[], float] | None = None,
) -> dict[str, float]:
    """Seconds per step of each ``(make optimiser, steps per cycle)``, each on its own copy of
    ``model``: a warm-up cycle, then medians of ``rounds`` interleaved rounds of one cycle, on
    ``clock`` (:func:`median_seconds`; :func:`cpu_clock` for CPU seconds)."""
    cycles = {}
    for key, (make, steps) in makers.items():
        net = copy.deepcopy(model)
        cycles[key] = (training_step(net, make(net), loss_fn, X, y, steps), steps)
    for run, _ in cycles.values():
        run()  # warm-up, and the first factor and inverse update
    return interleaved_medians(
        {
            key: (lambda run=run, n=n: median_seconds(run, 0.0, clock) / n)
            for key, (run, n) in cycles.items()
        },
        rounds,
    )


@dataclass
class StepParts:
    """The functions :func:`step_parts` builds, keyed by :data:`STEP_PARTS`, the peak memory
    of each step's first call (every update runs in it; ``None`` off CUDA), and the K-FAC
    optimisers, whose hooks :meth:`close` removes."""

    fns: dict[str, Callable[[], object]]
    peaks: dict[str, int | None]
    optimizers: list[KFAC]

    def close(self) -> None:
        """Detach the K-FAC optimisers from their models."""
        for optimizer in self.optimizers:
            optimizer.remove_hooks()


def step_parts(
    model: nn.Module,
    loss_fn: nn.Module,
    X: Tensor,
    y: Tensor,
    sgd: Mapping[str, Any],
    kfac: Mapping[str, Any],
) -> StepParts:
    """The parts of a K-FAC step, each on its own copy of ``model``.

    ``"sgd"``: a ``torch.optim.SGD(**sgd)`` step; ``"kfac"``: a :class:`natlib.optim.KFAC`
    ``(**kfac)`` step with ``T_cov = T_inv =`` :data:`ONCE` (forward, backward,
    preconditioning); ``"kfac_factors"``: one with ``T_cov = 1`` (plus the factor update and,
    for the Monte-Carlo Fisher, the sampled backward); ``"refresh"``: the eigendecompositions
    and damped inverses of every layer, as the optimiser refreshes them every ``T_inv`` steps.
    Each step has run once when this returns (so ``"refresh"`` has factors to work on).
    """
    device = next(model.parameters()).device
    fns: dict[str, Callable[[], object]] = {}
    optimizers: list[KFAC] = []
    for name, T_cov in (("sgd", None), ("kfac", ONCE), ("kfac_factors", 1)):
        net = copy.deepcopy(model)
        if T_cov is None:
            optimizer: torch.optim.Optimizer = torch.optim.SGD(net.parameters(), **sgd)
        else:
            optimizer = KFAC(net, loss_fn, **{**kfac, "T_cov": T_cov, "T_inv": ONCE})
            optimizers.append(optimizer)
        fns[name] = training_step(net, optimizer, loss_fn, X, y)
    peaks = {name: peak_memory_bytes(fn, device) for name, fn in fns.items()}
    plain = optimizers[0]
    damping = plain.param_groups[0]["damping"]
    fns["refresh"] = lambda: plain.curvature.refresh(damping)
    return StepParts(fns, peaks, optimizers)


def amortised_parts(
    sgd_s: float, kfac_s: float, kfac_factors_s: float, refresh_s: float, T_cov: int, T_inv: int
) -> dict[str, float]:
    """Seconds per step by :data:`natlib.costmodel.PARTS`, as differences of the timed
    :func:`step_parts`: forward and backward (the SGD step), factors
    :math:`(t_\\text{factors} - t_0) / T_\\text{cov}`, preconditioning :math:`t_0 -
    t_\\text{SGD}`, refresh :math:`t_\\text{refresh} / T_\\text{inv}`."""
    return {
        "forward_backward": sgd_s,
        "factors": (kfac_factors_s - kfac_s) / T_cov,
        "precondition": kfac_s - sgd_s,
        "refresh": refresh_s / T_inv,
    }
