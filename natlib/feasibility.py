r"""What a step of Newton, Hessian-free, K-FAC and SGD costs against the parameter count
:math:`P`, and the record ``python -m natlib bench newton`` writes (chapter 6).

The models are tanh MLPs ``[64, w, w, 10]`` (:math:`P = w^2 + 76w + 10`) on a batch of random
inputs with random labels (``CrossEntropyLoss``), float32 on the CPU, one thread, CPU seconds
(:func:`natlib.timing.cpu_clock`). Per step:

- **dense Newton**: forming :math:`H` by :math:`P` Hessian-vector products
  (:func:`natlib.curvature.hessian`), then one LU solve of :math:`(H + \lambda I)d = g`;
  measured to a few thousand parameters only (``dense_widths``) and extrapolated with the
  fitted exponents;
- **Hessian-free**: one gradient plus :math:`k` GGN-vector products
  (``matvec`` of :class:`natlib.exact.GGN`, matrix-free) for :math:`k` CG iterations;
- **K-FAC**: :class:`natlib.optim.KFAC` steps with :math:`T_\text{cov} = 1`,
  :math:`T_\text{inv} = 10`, timed over 10 steps;
- **SGD**: a ``torch.optim.SGD`` step.

Memory is counted, not measured (the CPU has no allocator statistics): see :func:`memory_bytes`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from natlib import costmodel, curvature, runtime, timing
from natlib.exact import GGN
from natlib.optim import KFAC

SCHEMA = "natlib.feasibility/1"
INPUT, CLASSES = 64, 10
DENSE_WIDTHS = (8, 12, 16, 24, 32, 40)  # P = 682 ... 4,650
WIDTHS = (16, 32, 64, 128, 256, 512, 1024)  # P = 1,482 ... 1,126,410
BATCH = 128
DAMPING = 1e-3
MEMORY_LIMIT = 24e9  # bytes: a 24 GB accelerator
METHODS = ("dense Newton", "Hessian-free", "K-FAC", "SGD")


def parameters(width: int) -> int:
    """:math:`P` of the MLP ``[64, w, w, 10]``."""
    return width * width + (INPUT + CLASSES + 2) * width + CLASSES


def sizes(width: int) -> list[int]:
    return [INPUT, width, width, CLASSES]


def memory_bytes(method: str, width: int, batch: int = BATCH, element_size: int = 4) -> float:
    r"""Bytes one step holds, counted: parameters and gradient (:math:`2P`) and the
    activations of the batch (:math:`B \sum_\ell d_\ell`, twice for a linearisation), plus

    - dense Newton: the :math:`P \times P` Hessian, factorised in place;
    - Hessian-free: five CG vectors and the previous direction (:math:`6P`);
    - K-FAC: the factors :math:`A, G` of every layer and their inverses
      (:func:`natlib.costmodel.layer_memory`);
    - SGD: nothing more.
    """
    p = parameters(width)
    layers = list(zip(sizes(width)[:-1], sizes(width)[1:]))
    activations = batch * sum(sizes(width))
    base = 2 * p + activations
    if method == "dense Newton":
        return (base + activations + p * p) * element_size
    if method == "Hessian-free":
        return (base + activations + 6 * p) * element_size
    if method == "K-FAC":
        kfac = sum(costmodel.layer_memory(i, o, element_size).inverses * 2 for i, o in layers)
        return base * element_size + kfac
    if method == "SGD":
        return base * element_size
    raise ValueError(f"method {method!r} is not supported; use one of {METHODS}.")


def largest_fitting(method: str, limit: float = MEMORY_LIMIT) -> int:
    """The largest :math:`P` (over widths of the MLP family) whose step fits in ``limit``
    bytes, by bisection on the width."""
    low, high = 1, 2
    while memory_bytes(method, high) <= limit:
        high *= 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if memory_bytes(method, mid) <= limit else (low, mid)
    return parameters(low)


@dataclass(frozen=True)
class DenseRow:
    """Dense Newton at one width: seconds to form :math:`H` and to solve with it."""

    width: int
    parameters: int
    form_s: float
    solve_s: float


@dataclass(frozen=True)
class MatrixFreeRow:
    """The matrix-free methods at one width: an SGD step, one GGN-vector product, a K-FAC
    step (:math:`T_\\text{inv} = 10`, averaged over 10 steps)."""

    width: int
    parameters: int
    sgd_s: float
    ggn_product_s: float
    kfac_s: float


@dataclass
class NewtonRecord:
    """The record of ``python -m natlib bench newton``; ``digits_step_s`` holds the seconds
    of one step of each training method of chapter 6 on its digits classifier."""

    schema: str
    environment: dict[str, object]
    batch: int
    damping: float
    dense: list[DenseRow]
    matrix_free: list[MatrixFreeRow]
    digits_step_s: dict[str, float] = field(default_factory=dict)

    def report(self) -> str:
        lines = [f"feasibility on {self.environment['device']}, batch {self.batch}, float32"]
        for r in self.dense:
            lines.append(
                f"dense Newton P = {r.parameters:>9,}: form {r.form_s:8.3f} s, "
                f"solve {r.solve_s:8.3f} s"
            )
        for r in self.matrix_free:
            lines.append(
                f"P = {r.parameters:>9,}: SGD {r.sgd_s * 1e3:8.2f} ms, GGN product "
                f"{r.ggn_product_s * 1e3:8.2f} ms, K-FAC {r.kfac_s * 1e3:8.2f} ms"
            )
        for name, s in self.digits_step_s.items():
            lines.append(f"digits classifier, {name}: {s * 1e3:.2f} ms per step")
        return "\n".join(lines)


def _problem(width: int, batch: int, device: torch.device):
    return timing.random_mlp_problem(sizes(width), batch, "cross_entropy", device)


def dense_row(width: int, batch: int, device: torch.device, min_run_time: float) -> DenseRow:
    model, X, y, loss_fn = _problem(width, batch, device)
    clock = timing.cpu_clock(device)
    form = timing.median_seconds(
        lambda: curvature.hessian(model, loss_fn, X, y), min_run_time, clock
    )
    H = curvature.hessian(model, loss_fn, X, y)
    H = H + DAMPING * torch.eye(len(H), dtype=H.dtype, device=H.device)
    g = curvature.flat_gradient(model, loss_fn, X, y)
    solve = timing.median_seconds(lambda: torch.linalg.solve(H, g), min_run_time, clock)
    return DenseRow(width, parameters(width), form, solve)


def matrix_free_row(
    width: int, batch: int, device: torch.device, min_run_time: float
) -> MatrixFreeRow:
    clock = timing.cpu_clock(device)
    model, X, y, loss_fn = _problem(width, batch, device)
    sgd = torch.optim.SGD(model.parameters(), lr=1e-6)
    sgd_s = timing.median_seconds(
        timing.training_step(model, sgd, loss_fn, X, y), min_run_time, clock
    )
    ggn = GGN.from_batch(model, loss_fn, X, y)
    v = torch.randn(parameters(width), generator=torch.Generator().manual_seed(0)).to(X)
    ggn.matvec(v)  # builds the linearisation once, as a CG run does
    product_s = timing.median_seconds(lambda: ggn.matvec(v), min_run_time, clock)
    kfac = KFAC(model, loss_fn, lr=1e-6, damping=DAMPING, T_inv=10)
    kfac_s = (
        timing.median_seconds(
            timing.training_step(model, kfac, loss_fn, X, y, steps=10), min_run_time, clock
        )
        / 10
    )
    kfac.remove_hooks()
    return MatrixFreeRow(width, parameters(width), sgd_s, product_s, kfac_s)


def digits_step_seconds(steps: int = 5) -> dict[str, float]:
    """Median seconds of one step of each of chapter 6's training methods
    (:func:`natlib.tuning.digits_methods`) at their middle grid value, on its digits
    classifier (float64, CPU)."""
    from natlib import secondorder, tuning

    X, y, loss_fn = secondorder.digits_batch()
    seconds = {}
    for method in tuning.digits_methods():
        times = []
        for _ in range(3):
            model = secondorder.digits_model(0)
            optimizer = method.make(model, loss_fn, method.grid[1])
            _, total = tuning.train_losses(
                model, loss_fn, X, y, optimizer, steps, method.closure, time.process_time
            )
            times.append(total / steps)
        seconds[method.name] = sorted(times)[1]
    return seconds


def measure(
    dense_widths: Sequence[int] = DENSE_WIDTHS,
    widths: Sequence[int] = WIDTHS,
    batch: int = BATCH,
    device: str | torch.device | None = "cpu",
    min_run_time: float = 0.5,
    digits: bool = True,
) -> NewtonRecord:
    """Time the four methods on one thread (see the module) and return the record."""
    device = timing.resolve_device(device)
    with runtime.threads(1):
        with runtime.default_dtype(torch.float32):
            dense = [dense_row(w, batch, device, min_run_time) for w in dense_widths]
            free = [matrix_free_row(w, batch, device, min_run_time) for w in widths]
        steps = digits_step_seconds() if digits else {}
        return NewtonRecord(SCHEMA, timing.environment(device), batch, DAMPING, dense, free, steps)


def write_record(record: NewtonRecord, path: Path) -> None:
    timing.write_json(record, path)


def read_record(path: Path) -> NewtonRecord:
    """The record at ``path``.

    Raises:
        ValueError: if it is not a record of this schema.
    """
    data = timing.read_json(path, SCHEMA)
    data["dense"] = [DenseRow(**r) for r in data["dense"]]
    data["matrix_free"] = [MatrixFreeRow(**r) for r in data["matrix_free"]]
    return NewtonRecord(**data)
