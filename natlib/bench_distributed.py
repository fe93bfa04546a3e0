r"""``python -m natlib bench distributed``: K-FAC's inversion phase in 1 and 2 processes, and
its traffic per refresh against model size (``book/data/distributed-<device>.json``).

For tanh MLPs of :data:`DEPTH` square layers of width :math:`d`, each run launches its
processes like ``torchrun`` (:func:`natlib.launch.launch`, one thread each) and times the
inversion phase of a refresh: with one process :meth:`natlib.kfac.KFACApproximation.refresh`,
with two the factor reduce, the shared eigendecompositions and their broadcast
(:class:`natlib.distributed.DistributedCommunicator`), as the slowest rank sees it, on the wall
clock and in CPU time (``time.process_time``, which other processes on a shared machine do not
inflate; communication waits count only as far as gloo spends CPU on them); medians of
:data:`REPEATS`. The numbers each collective carried are counted and set beside
:func:`natlib.distributed.reduce_elements` and :func:`natlib.distributed.broadcast_elements`.
With :math:`L` equal layers on :math:`W` ranks, KAISA's split (Pauloski et al., 2021) gives at
best a speed-up of :math:`L / \lceil L/W \rceil` on the decompositions.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from natlib import distributed, launch, timing
from natlib.kfac import KFACApproximation

SCHEMA = "natlib.distributed/1"
WIDTHS = (128, 256, 512, 1024)
#: Square layers of each benchmarked MLP.
DEPTH = 4
PROCESSES = (1, 2)
#: Timed refreshes per width and process count (the record keeps their median).
REPEATS = 5
DAMPING = 1e-3
#: Seconds a benchmark run may take before its processes are stopped.
TIMEOUT_S = 600.0
#: Who reads the record; written into it so that a re-run keeps the readers in mind.
READERS = "book/04_scaling.ipynb ('Beyond one machine') loads this record"


@dataclass(frozen=True)
class WidthTimes:
    """One width: seconds of the inversion phase per process count (``"1"``, ``"2"``), on the
    wall clock and in CPU time of the busiest rank (which other processes on a shared machine
    do not inflate), and the numbers sent per refresh with two processes, analytic and
    measured."""

    width: int
    parameters: int
    refresh_s: dict[str, float]
    refresh_cpu_s: dict[str, float]
    reduce_analytic: int
    reduce_measured: int
    broadcast_analytic: int
    broadcast_measured: int
    owners: list[int]

    def speedup(self, cpu: bool = False) -> float:
        """:math:`t_1 / t_2`, wall clock or (``cpu``) CPU time."""
        seconds = self.refresh_cpu_s if cpu else self.refresh_s
        return seconds["1"] / seconds["2"]


@dataclass(frozen=True)
class DistributedRecord:
    """The benchmark's record (``book/data/distributed-<device>.json``)."""

    depth: int
    batch_per_width: int
    dtype: str
    repeats: int
    widths: list[WidthTimes]
    environment: dict[str, object] = field(default_factory=dict)
    schema: str = SCHEMA

    def report(self) -> str:
        env = self.environment
        lines = [
            f"K-FAC inversion phase, {self.depth} square tanh layers, {self.dtype}, one thread "
            f"per process on {env.get('device')} (load {env.get('load_average')}); medians of "
            f"{self.repeats}",
            "  width  parameters   wall: 1 process, 2 processes, speed-up   CPU: 1, 2, speed-up"
            "   reduce (analytic/measured)   broadcast (analytic/measured)",
        ]
        for w in self.widths:
            lines.append(
                f"  {w.width:5d}  {w.parameters:10d}  {1e3 * w.refresh_s['1']:8.1f} ms "
                f"{1e3 * w.refresh_s['2']:9.1f} ms  {w.speedup():5.2f}x   "
                f"{1e3 * w.refresh_cpu_s['1']:8.1f} ms {1e3 * w.refresh_cpu_s['2']:8.1f} ms "
                f"{w.speedup(cpu=True):5.2f}x   "
                f"{w.reduce_analytic:9d} / {w.reduce_measured:<9d}   "
                f"{w.broadcast_analytic:10d} / {w.broadcast_measured}"
            )
        return "\n".join(lines)


def _problem(width: int, device: torch.device, rank: int, world: int):
    sizes = (width,) * (DEPTH + 1)
    model, X, y, loss_fn = timing.random_mlp_problem(sizes, 2 * width, "mse", device)
    X, y = distributed.shard(X, rank, world), distributed.shard(y, rank, world)
    curvature = KFACApproximation.from_batch(
        model, loss_fn, X, y, kind="mc", generator=torch.Generator(device).manual_seed(rank)
    )
    return model, curvature


def worker(widths: list[int], repeats: int, out: Path) -> None:
    """One rank: time the inversion phase at each width and, on rank 0, write the numbers."""
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", 1))
    device = distributed.setup() if world > 1 else timing.resolve_device(None)
    rank = torch.distributed.get_rank() if world > 1 else 0
    communicator = distributed.communicator()
    rows = []
    for width in widths:
        model, curvature = _problem(width, device, rank, world)
        seconds, cpu_seconds = [], []
        for _ in range(repeats + 1):  # the first is a warm-up
            work = copy.copy(curvature)
            if world > 1:
                torch.distributed.barrier()
                communicator.collectives.clear()
            start, cpu_start = time.perf_counter(), time.process_time()
            communicator.reduce_factors(work)
            communicator.refresh(work, DAMPING)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = torch.tensor(
                [time.perf_counter() - start, time.process_time() - cpu_start], dtype=torch.float64
            )
            if world > 1:
                torch.distributed.all_reduce(elapsed, torch.distributed.ReduceOp.MAX)
            seconds.append(elapsed[0].item())
            cpu_seconds.append(elapsed[1].item())
        calls = getattr(communicator, "collectives", [])
        rows.append(
            {
                "width": width,
                "parameters": sum(p.numel() for p in model.parameters()),
                "seconds": statistics.median(seconds[1:]),
                "cpu_seconds": statistics.median(cpu_seconds[1:]),
                "reduce": sum(c.elements for c in calls if c.operation == "reduce"),
                "broadcast": sum(c.elements for c in calls if c.operation == "broadcast"),
                "owners": list(getattr(communicator, "owners", lambda c: {})(curvature).values()),
                "reduce_analytic": distributed.reduce_elements(curvature.layers),
                "broadcast_analytic": distributed.broadcast_elements(curvature.layers, world),
            }
        )
    if rank == 0:
        out.write_text(json.dumps(rows))
    if world > 1:
        torch.distributed.destroy_process_group()


def read_record(path: Path) -> DistributedRecord:
    """Read a record written by ``python -m natlib bench distributed --out ...``.

    Raises:
        ValueError: if the file is not a record of this schema or misses a field.
    """
    data = timing.read_json(path, SCHEMA)
    try:
        rows = [WidthTimes(**row) for row in data.pop("widths")]
        return DistributedRecord(widths=rows, **data)
    except (KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a complete {SCHEMA} record: {error}") from None


def benchmark(
    device: str | torch.device | None = None,
    widths: tuple[int, ...] = WIDTHS,
    repeats: int = REPEATS,
) -> DistributedRecord:
    """Run :func:`worker` in 1 and 2 processes on ``device`` and collect the record.

    Raises:
        RuntimeError: if a run fails or passes :data:`TIMEOUT_S` (with the ranks' errors), or
            two processes on CUDA find fewer than two GPUs.
    """
    device = timing.resolve_device(device)
    if device.type == "cuda" and torch.cuda.device_count() < max(PROCESSES):
        raise RuntimeError("two processes on CUDA need two GPUs; this machine has fewer.")
    env = dict(os.environ, NATLIB_DEVICE=device.type, OMP_NUM_THREADS="1")
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    measured = {}
    with tempfile.TemporaryDirectory() as folder:
        for processes in PROCESSES:
            out = Path(folder) / f"{processes}.json"
            argv = ["-m", "natlib.bench_distributed", str(out), str(repeats), *map(str, widths)]
            results = launch.launch(argv, processes, TIMEOUT_S, env)
            if any(r.returncode != 0 for r in results):
                errors = "\n".join(f"rank {r.rank}: {r.stderr[-2000:]}" for r in results)
                raise RuntimeError(f"the {processes}-process run failed:\n{errors}")
            measured[processes] = json.loads(out.read_text())
    rows = [
        WidthTimes(
            width=one["width"],
            parameters=one["parameters"],
            refresh_s={"1": one["seconds"], "2": two["seconds"]},
            refresh_cpu_s={"1": one["cpu_seconds"], "2": two["cpu_seconds"]},
            reduce_analytic=two["reduce_analytic"],
            reduce_measured=two["reduce"],
            broadcast_analytic=two["broadcast_analytic"],
            broadcast_measured=two["broadcast"],
            owners=two["owners"],
        )
        for one, two in zip(measured[1], measured[2])
    ]
    environment = timing.environment(device) | {
        "threads": 1,
        "processes": list(PROCESSES),
        "load_average": round(os.getloadavg()[0], 2),
        "readers": READERS,
    }
    return DistributedRecord(DEPTH, 2, "float32", repeats, rows, environment)


if __name__ == "__main__":
    worker([int(w) for w in sys.argv[3:]], int(sys.argv[2]), Path(sys.argv[1]))
