r"""Fidelity against cost: every curvature approximation set beside the exact Fisher, the
table behind ``python -m natlib bench approximations`` (chapter 5).

- :func:`trained_digits_mlp`: the chapter-3 network (tanh 64-20-20-20-20-20-10 by default)
  after :data:`ADAM_STEPS` steps of Adam on the digits, the weights every measurement uses;
- :func:`approximation_rows`: each method of :func:`approximation_methods` on one batch,
  against the exact dense Fisher: relative Frobenius error, cosine of the damped solve with
  the exact damped natural gradient, memory, and (given a clock) median times;
- :func:`wide_cosines`: the cosines alone on a network too large for the dense Fisher, with
  the reference natural gradient from conjugate gradients on Fisher-vector products
  (:meth:`natlib.exact.ExactCurvature.solve`, relative residual
  :data:`natlib.linalg.CG_TOLERANCE`);
- :func:`approximations_benchmark`, :func:`read_record`: the record ``book/data/`` keeps.

Times are CPU seconds of the process on the CPU (:func:`natlib.timing.cpu_clock`), which other
processes on a shared machine do not inflate.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from natlib import curvature, problems, timing
from natlib.adam import AdamPreconditioner
from natlib.approximations import BlockDiagonalFisher, DiagonalFisher
from natlib.ekfac import EKFACApproximation
from natlib.exact import Fisher
from natlib.interface import Curvature, RunningCurvature
from natlib.kfac import KFACApproximation
from natlib.lbfgs import LBFGSOperator
from natlib.linalg import CG_TOLERANCE, conjugate_gradient
from natlib.optim import train
from natlib.shampoo import ShampooPreconditioner

#: The chapter-3 digits network.
DIGITS_SIZES = (64, 20, 20, 20, 20, 20, 10)
#: A network too wide for the dense Fisher (150,794 parameters).
WIDE_SIZES = (64, 256, 256, 256, 10)
#: Adam steps (learning rate 1e-3, batches of 128, seed 0) before measuring, as chapter 3.
ADAM_STEPS = 200
#: Digits training examples in the batch every method is estimated on.
APPROXIMATION_EXAMPLES = 128
#: The damping :math:`\lambda` of every solve.
APPROXIMATION_DAMPING = 1e-3
#: The curvature pairs the L-BFGS operator keeps.
LBFGS_PAIRS = 10
#: The methods :func:`wide_cosines` measures (those that never form a dense layer block).
WIDE_METHODS = (
    "EK-FAC",
    "K-FAC (exact damping)",
    "K-FAC (pi damping)",
    "Shampoo",
    "diagonal Fisher",
    "diagonal empirical Fisher",
    "Adam (first step)",
    f"L-BFGS ({LBFGS_PAIRS} pairs)",
)


@dataclass(frozen=True)
class ApproximationRow:
    """One method's fidelity to the exact Fisher and its cost (seconds are medians, ``nan``
    where not timed)."""

    method: str
    relative_error: float  # ||C - F||_F / ||F||_F
    block_error: float  # the same within the layer blocks: C's and F's block diagonals
    cosine: float  # between (C + lambda I)^{-1} g and (F + lambda I)^{-1} g
    memory_bytes: int
    update_s: float  # the batch estimate, from_batch
    refresh_s: float  # refresh(damping); 0 where there is nothing to redo
    solve_s: float


@dataclass(frozen=True)
class WideCosine:
    """One method's cosine with the conjugate-gradient natural gradient on a wide network."""

    method: str
    cosine: float
    memory_bytes: int


@dataclass(frozen=True)
class ApproximationBenchmark:
    """The fidelity/cost table of every curvature approximation on one batch, and the cosines
    on a wide network."""

    sizes: tuple[int, ...]
    parameters: int
    examples: int
    adam_steps: int
    damping: float
    dtype: str
    rows: list[ApproximationRow]
    wide_sizes: tuple[int, ...] = ()
    wide_parameters: int = 0
    wide_cg_iterations: int = 0
    wide: list[WideCosine] = field(default_factory=list)
    environment: dict[str, object] = field(default_factory=dict)

    def report(self) -> str:
        lines = [
            f"curvature approximations against the exact Fisher, tanh MLP "
            f"{'-'.join(map(str, self.sizes))} ({self.parameters} parameters) after "
            f"{self.adam_steps} Adam steps,",
            f"{self.examples} digits, damping {self.damping:g}, {self.dtype}, on "
            f"{self.environment.get('device')}; times are medians "
            f"({self.environment.get('clock', 'wall clock')})",
            f"  {'method':28s} {'rel. error':>10s} {'in blocks':>10s} {'cosine':>8s} "
            f"{'memory':>10s} {'update':>10s} {'refresh':>10s} {'solve':>10s}",
        ]
        for r in self.rows:
            lines.append(
                f"  {r.method:28s} {r.relative_error:10.4f} {r.block_error:10.4f} {r.cosine:8.4f} "
                f"{r.memory_bytes / 2**10:7.0f} KiB {1e3 * r.update_s:7.2f} ms "
                f"{1e3 * r.refresh_s:7.2f} ms {1e3 * r.solve_s:7.3f} ms"
            )
        if self.wide:
            lines.append(
                f"cosine with the natural gradient by conjugate gradients "
                f"({self.wide_cg_iterations} iterations), tanh MLP "
                f"{'-'.join(map(str, self.wide_sizes))} ({self.wide_parameters} parameters)"
            )
            lines += [f"  {w.method:28s} {w.cosine:8.4f}" for w in self.wide]
        return "\n".join(lines)


def trained_digits_mlp(
    sizes: Sequence[int] = DIGITS_SIZES,
    adam_steps: int = ADAM_STEPS,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device | None = None,
) -> tuple[nn.Module, problems.Problem]:
    """A tanh MLP (seed 0) after ``adam_steps`` steps of ``torch.optim.Adam`` (learning rate
    1e-3, batches of 128, seed 0) on the digits training set, as chapter 3 trains it.

    Returns:
        ``(model, digits)``, both in ``dtype`` on ``device``.
    """
    device = timing.resolve_device(device)
    data = problems.digits(dtype=dtype, device=device)
    model = problems.mlp(list(sizes), seed=0, dtype=dtype).to(device)
    if adam_steps:
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        train(model, optimizer, data.loss_fn, data.X_train, data.y_train, adam_steps, 128,
              eval_every=adam_steps, seed=0)  # fmt: skip
    return model, data


def approximation_methods(
    model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor
) -> dict[str, Callable[[], Curvature]]:
    r"""How each method builds its estimate on the batch: the Fisher's own (``kind="exact"``)
    where the method has one, the mini-batch gradient at the data labels for Adam
    (:math:`\beta_2 = 0.999`, first step) and Shampoo (exact damping), and for L-BFGS the
    operator of :data:`LBFGS_PAIRS` pairs along ``torch.optim.LBFGS``'s path from these
    weights (its update is forming the operator from the pairs)."""
    args = (model, loss_fn, X, y)
    pairs = LBFGSOperator.from_batch(*args, iterations=LBFGS_PAIRS, history_size=LBFGS_PAIRS)
    layout, steps, differences = pairs.layout, pairs.steps, pairs.differences
    return {
        "exact Fisher (dense)": lambda: _formed(Fisher.from_batch(*args)),
        "block-diagonal Fisher": lambda: BlockDiagonalFisher.from_batch(*args),
        "EK-FAC": lambda: EKFACApproximation.from_batch(*args),
        "K-FAC (exact damping)": lambda: KFACApproximation.from_batch(*args, damping_mode="exact"),
        "K-FAC (pi damping)": lambda: KFACApproximation.from_batch(*args, damping_mode="pi"),
        "Shampoo": lambda: ShampooPreconditioner.from_batch(*args, damping_mode="exact"),
        "diagonal Fisher": lambda: DiagonalFisher.from_batch(*args),
        "diagonal empirical Fisher": lambda: DiagonalFisher.from_batch(*args, kind="empirical"),
        "Adam (first step)": lambda: AdamPreconditioner.from_batch(*args),
        f"L-BFGS ({LBFGS_PAIRS} pairs)": lambda: LBFGSOperator(layout, steps, differences),
    }


def _formed(fisher: Fisher) -> Fisher:
    fisher.to_dense()
    return fisher


def _cosine(a: Tensor, b: Tensor) -> float:
    return (a @ b / (a.norm() * b.norm())).item()


def approximation_rows(
    model: nn.Module,
    loss_fn: nn.Module,
    X: Tensor,
    y: Tensor,
    damping: float = APPROXIMATION_DAMPING,
    seconds: Callable[[Callable[[], object]], float] | None = None,
) -> list[ApproximationRow]:
    r"""Each method of :func:`approximation_methods` on the batch ``(X, y)`` against the exact
    dense Fisher :math:`F`: relative Frobenius errors (whole and within the layer blocks),
    the cosine of :math:`(C + \lambda I)^{-1} g` with :math:`(F + \lambda I)^{-1} g` for the
    batch gradient :math:`g`, ``memory_bytes`` after a solve, and, when ``seconds`` (a
    function timing a callable) is given, median times of ``from_batch``, ``refresh`` and
    ``solve`` (``nan`` otherwise)."""
    exact = _formed(Fisher.from_batch(model, loss_fn, X, y))
    F = exact.to_dense()
    F_blocks = exact.layout.block_diagonal(F)
    g = curvature.flat_gradient(model, loss_fn, X, y)
    natural = exact.solve(g, damping)
    untimed = float("nan")
    rows = []
    for name, build in approximation_methods(model, loss_fn, X, y).items():
        C = build()
        direction = C.solve(g, damping)
        dense = C.to_dense()
        refresh_s = 0.0 if seconds is not None else untimed
        if seconds is not None and isinstance(C, RunningCurvature):
            refresh_s = seconds(lambda C=C: C.refresh(damping))
        rows.append(
            ApproximationRow(
                method=name,
                relative_error=((dense - F).norm() / F.norm()).item(),
                block_error=(
                    (exact.layout.block_diagonal(dense) - F_blocks).norm() / F_blocks.norm()
                ).item(),
                cosine=_cosine(direction, natural),
                memory_bytes=C.memory_bytes,
                update_s=seconds(build) if seconds else untimed,
                refresh_s=refresh_s,
                solve_s=seconds(lambda C=C: C.solve(g, damping)) if seconds else untimed,
            )
        )
    return rows


def wide_cosines(
    model: nn.Module,
    loss_fn: nn.Module,
    X: Tensor,
    y: Tensor,
    damping: float = APPROXIMATION_DAMPING,
) -> tuple[list[WideCosine], int]:
    r"""The cosine of each of :data:`WIDE_METHODS` with :math:`(F + \lambda I)^{-1} g`, where
    the reference is conjugate gradients on exact Fisher-vector products (the dense Fisher is
    never formed), and the number of CG iterations it took.

    Raises:
        RuntimeError: if conjugate gradients do not reach their tolerance.
    """
    g = curvature.flat_gradient(model, loss_fn, X, y)
    product = curvature.fisher_product(model, loss_fn, X)
    tolerance = CG_TOLERANCE[g.dtype]
    result = conjugate_gradient(lambda v: product(v) + damping * v, g, tolerance)
    if not result.converged:
        raise RuntimeError(
            f"conjugate gradients reached relative residual {result.residual:.1e} > "
            f"{tolerance:.0e}; raise the damping."
        )
    natural = result.x
    methods = approximation_methods(model, loss_fn, X, y)
    rows = []
    for name in WIDE_METHODS:
        C = methods[name]()
        rows.append(WideCosine(name, _cosine(C.solve(g, damping), natural), C.memory_bytes))
    return rows, result.iterations


def approximations_benchmark(
    sizes: tuple[int, ...] = DIGITS_SIZES,
    examples: int = APPROXIMATION_EXAMPLES,
    damping: float = APPROXIMATION_DAMPING,
    adam_steps: int = ADAM_STEPS,
    wide_sizes: tuple[int, ...] | None = WIDE_SIZES,
    min_run_time: float = 0.05,
    device: str | torch.device | None = None,
) -> ApproximationBenchmark:
    r""":func:`approximation_rows`, timed, on :func:`trained_digits_mlp` and the first
    ``examples`` digits of the training set, in float64, and :func:`wide_cosines` on the same
    recipe with ``wide_sizes`` (``None``: skip). Times are medians over blocks of at least
    ``min_run_time`` seconds on :func:`natlib.timing.cpu_clock`."""
    dtype, device = torch.float64, timing.resolve_device(device)
    model, data = trained_digits_mlp(sizes, adam_steps, dtype, device)
    X, y = data.X_train[:examples], data.y_train[:examples]
    clock = timing.cpu_clock(device)  # CPU seconds: other processes do not inflate them

    def seconds(fn: Callable[[], object]) -> float:
        return timing.median_seconds(fn, min_run_time, clock)

    rows = approximation_rows(model, data.loss_fn, X, y, damping, seconds)
    wide, wide_parameters, iterations = [], 0, 0
    if wide_sizes is not None:
        wide_model, _ = trained_digits_mlp(wide_sizes, adam_steps, dtype, device)
        wide, iterations = wide_cosines(wide_model, data.loss_fn, X, y, damping)
        wide_parameters = sum(p.numel() for p in wide_model.parameters())
    environment = timing.environment(device)
    environment["clock"] = "CPU time of the process" if clock else "wall clock"
    return ApproximationBenchmark(
        sizes=tuple(sizes),
        parameters=sum(p.numel() for p in model.parameters()),
        examples=len(X),
        adam_steps=adam_steps,
        damping=damping,
        dtype="float64",
        rows=rows,
        wide_sizes=tuple(wide_sizes or ()),
        wide_parameters=wide_parameters,
        wide_cg_iterations=iterations,
        wide=wide,
        environment=environment,
    )


def read_record(path: Path) -> ApproximationBenchmark:
    """An :class:`ApproximationBenchmark` written by ``python -m natlib bench approximations
    --out PATH``."""
    data = json.loads(Path(path).read_text())
    data["rows"] = [ApproximationRow(**row) for row in data["rows"]]
    data["wide"] = [WideCosine(**row) for row in data.get("wide", [])]
    data["sizes"], data["wide_sizes"] = tuple(data["sizes"]), tuple(data.get("wide_sizes", ()))
    return ApproximationBenchmark(**data)
