r"""Data-parallel K-FAC on ``torch.distributed``: the hooks :class:`natlib.optim.KFAC` calls.

Each process (rank) trains a replica wrapped in ``DistributedDataParallel`` on its share of
every batch; DDP averages the gradients (the concatenated batch's gradient when the shares are
equal, as :func:`shard` makes them up to one example). K-FAC's statistics are local until a
refresh step (:math:`k \bmod T_\text{inv} = 0`), where :class:`DistributedCommunicator`

1. **reduces** the running factors of rank :math:`r` (batch :math:`N_r`, :math:`N = \sum_r
   N_r`) to :math:`A = \sum_r \tfrac{N_r}{N} A_r`, :math:`G = \sum_r \tfrac{N_r}{N} G_r`: one
   ``all_reduce`` of a single flattened bucket holding :math:`N_r` and the upper triangles of
   :math:`N_r A_r` and :math:`N_r G_r`, :math:`1 + \sum_l [d_A(d_A+1) + d_G(d_G+1)]/2`
   numbers (:func:`reduce_elements`). Both factors are means over examples (the cotangents
   carry the loss's :math:`1/N_r`), so this is the factor of the concatenated batch;
2. **shards** the eigendecompositions as KAISA does (Pauloski et al., 2021): layer :math:`l`
   goes to one rank, largest estimated cost :math:`d_A^3 + d_G^3` first, each to the least
   loaded rank (:func:`assign`; Graham's greedy rule, within 4/3 of the best split);
3. **broadcasts** each rank's eigenvalues and eigenvectors in one bucket per rank
   (:func:`broadcast_elements`), from which every rank forms the same damped inverses, so the
   preconditioned gradients, and the parameters, are identical on every rank.

A status exchange (``all_reduce`` of one flag per rank) after the local work of a refresh step
makes a failure on one rank (NaN gradient or factors) an error on every rank rather than a
hang; decompositions that fail are flagged in the broadcast buckets. Monte-Carlo targets are
drawn with the seed ``seed + rank * 2**32`` (:meth:`DistributedCommunicator.seed`). With one
process, :func:`communicator` returns the plain :class:`natlib.interface.Communicator`: the
single-process optimiser, with no distributed call.

Launch with ``torchrun --nproc-per-node 2 script.py`` (``--nnodes``, ``--node-rank`` and
``--rdzv-endpoint`` across machines); in the script::

    device = natlib.distributed.setup()  # gloo on the CPU, nccl on CUDA
    model = problems.mlp([64, 32, 10]).to(device)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = KFAC(
        model, loss_fn, communicator=natlib.distributed.communicator()
    )
    # the usual loop on ddp, each rank on its shard of the batch
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from natlib import runtime
from natlib.interface import Communicator, RunningCurvature
from natlib.kfac import KFACApproximation
from natlib.layout import LinearLayer
from natlib.linalg import Eigen

#: Seconds a collective waits for a missing rank before the process group gives up.
TIMEOUT_S = 300.0


def backend_for(device: torch.device) -> str:
    """``"nccl"`` for a CUDA device, ``"gloo"`` otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def setup(timeout_s: float = TIMEOUT_S) -> torch.device:
    """Join the process group that ``torchrun`` describes (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``) and return this process's device: ``cuda:LOCAL_RANK``
    when :func:`natlib.runtime.device` picks CUDA, else the CPU. The backend follows the
    device (:func:`backend_for`); an initialised group is kept.

    Raises:
        RuntimeError: if torchrun's environment variables are missing, or ``NATLIB_DEVICE``
            asks for CUDA on a machine without it.
    """
    missing = [
        v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ
    ]
    if missing and not dist.is_initialized():
        raise RuntimeError(
            f"natlib.distributed.setup() needs torchrun's environment; {missing} are not set. "
            "Launch with `torchrun --nproc-per-node N script.py`."
        )
    device = runtime.device()
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend_for(device), timeout=timedelta(seconds=timeout_s))
    return device


def communicator() -> Communicator:
    """:class:`DistributedCommunicator` in a process group of two or more ranks; otherwise the
    single-process :class:`natlib.interface.Communicator`, which makes no distributed call."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return DistributedCommunicator()
    return Communicator()


def shard(tensor: Tensor, rank: int, world_size: int) -> Tensor:
    """Rank ``rank``'s contiguous share of a batch (``torch.tensor_split`` along dim 0), so the
    ranks' shards concatenate to the batch."""
    return torch.tensor_split(tensor, world_size)[rank]


# --------------------------------------------------------------------------- work and traffic


def layer_cost(layer: LinearLayer) -> int:
    r"""The estimated cost of a layer's decompositions, :math:`d_A^3 + d_G^3`."""
    return layer.d_a**3 + layer.d_out**3


def assign(costs: Sequence[float], world_size: int) -> list[int]:
    """The rank of each task: largest cost first, each to the rank with the least total cost
    so far (the lowest rank among equals); Graham's (1969) rule, at most 4/3 of the optimum.

    Raises:
        ValueError: if ``world_size`` is not positive.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size}.")
    loads = [0.0] * world_size
    owners = [0] * len(costs)
    for task in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[task] = rank
        loads[rank] += costs[task]
    return owners


def triangle(d: int) -> int:
    """Entries of a ``d x d`` matrix's upper triangle, diagonal included."""
    return d * (d + 1) // 2


def reduce_elements(layers: Sequence[LinearLayer]) -> int:
    r"""Numbers in the factor bucket: :math:`1 + \sum_l [d_A(d_A+1) + d_G(d_G+1)]/2`."""
    return 1 + sum(triangle(layer.d_a) + triangle(layer.d_out) for layer in layers)


def broadcast_elements(layers: Sequence[LinearLayer], world_size: int) -> int:
    r"""Numbers in the broadcast buckets of one refresh: a flag per rank plus every factor's
    eigenvalues and eigenvectors, :math:`W + \sum_l (d_A + d_A^2 + d_G + d_G^2)`."""
    return world_size + sum(d + d * d for layer in layers for d in (layer.d_a, layer.d_out))


@dataclass(frozen=True)
class Collective:
    """One collective call: ``"status"``, ``"reduce"`` or ``"broadcast"``, and its numbers."""

    operation: str
    elements: int


class RankFailure(RuntimeError):
    """Another rank failed in a step's work, so this one stops too."""


# --------------------------------------------------------------------------- the hook


class DistributedCommunicator(Communicator):
    """Reduce, shard and broadcast K-FAC's work over the default process group (see the
    module's docstring). ``collectives`` logs every call this object makes.

    Raises:
        RuntimeError: if no process group is initialised (call :func:`setup`).
    """

    def __init__(self) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "no torch.distributed process group; call natlib.distributed.setup() first."
            )
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.collectives: list[Collective] = []
        self._indices: dict[tuple[int, torch.device], tuple[Tensor, Tensor]] = {}

    def seed(self, seed: int) -> int:
        """``seed + rank * 2**32``: a stream per rank, rank 0's the single process's."""
        return seed + (self.rank << 32)

    def _call(self, operation: str, tensor: Tensor, src: int | None = None) -> None:
        self.collectives.append(Collective(operation, tensor.numel()))
        if src is None:
            dist.all_reduce(tensor)
        else:
            dist.broadcast(tensor, src)

    def _status(self, failed: bool, device: torch.device) -> list[int]:
        flags = torch.zeros(self.world_size, device=device)
        flags[self.rank] = float(failed)
        self._call("status", flags)
        return [r for r in range(self.world_size) if flags[r] != 0]

    @contextlib.contextmanager
    def guard(self, collective: bool) -> Iterator[None]:
        """Around the local work of a step: at a refresh step, exchange one flag per rank
        afterwards, and raise :class:`RankFailure` on every rank if another one failed (the
        failing rank raises its own error).

        Raises:
            RankFailure: if another rank's local work raised.
        """
        if not collective:
            yield
            return
        device = torch.device("cuda", torch.cuda.current_device()) if _nccl() else None
        device = device or torch.device("cpu")
        try:
            yield
        except Exception:
            self._status(True, device)
            raise
        failed = self._status(False, device)
        if failed:
            raise RankFailure(
                f"rank {failed[0]} of {self.world_size} failed before K-FAC's factor reduce "
                f"(ranks that failed: {failed}); its own error names the cause. Rank "
                f"{self.rank} stops too."
            )

    def _triu(self, d: int, device: torch.device) -> tuple[Tensor, Tensor]:
        key = (d, device)
        if key not in self._indices:
            self._indices[key] = tuple(torch.triu_indices(d, d, device=device))
        return self._indices[key]

    def reduce_factors(self, curvature: RunningCurvature) -> None:
        r"""Replace the running factors by their batch-weighted mean over the ranks (one
        ``all_reduce`` of the upper triangles, :func:`reduce_elements` numbers).

        Raises:
            TypeError: if ``curvature`` is not a :class:`natlib.kfac.KFACApproximation`.
        """
        kfac = _kfac(curvature)
        weight = float(kfac.batch_size)
        parts = [torch.tensor([weight], dtype=kfac.dtype, device=kfac.device)]
        for layer in kfac.layers:
            for factor in kfac.factors[layer.name]:
                rows, cols = self._triu(factor.shape[0], factor.device)
                parts.append(factor[rows, cols] * weight)
        bucket = torch.cat(parts)
        self._call("reduce", bucket)
        total, offset, factors = bucket[0], 1, {}
        for layer in kfac.layers:
            pair = []
            for d in (layer.d_a, layer.d_out):
                rows, cols = self._triu(d, bucket.device)
                upper = torch.zeros(d, d, dtype=bucket.dtype, device=bucket.device)
                upper[rows, cols] = bucket[offset : offset + triangle(d)] / total
                pair.append(upper + upper.triu(1).T)
                offset += triangle(d)
            factors[layer.name] = tuple(pair)
        kfac.factors = factors

    def owners(self, curvature: RunningCurvature) -> dict[str, int]:
        """The rank that decomposes each layer's factors (:func:`assign` on
        :func:`layer_cost`)."""
        layers = _kfac(curvature).layers
        ranks = assign([layer_cost(layer) for layer in layers], self.world_size)
        return {layer.name: rank for layer, rank in zip(layers, ranks)}

    def refresh(self, curvature: RunningCurvature, damping: float) -> None:
        """Decompose this rank's layers (:meth:`owners`), broadcast every rank's results in
        one bucket per rank, and install the damped inverses of all layers on every rank.

        Raises:
            TypeError: if ``curvature`` is not a :class:`natlib.kfac.KFACApproximation`.
            ValueError: on every rank, if a decomposition failed on any (naming the layer).
        """
        kfac = _kfac(curvature)
        owners = self.owners(kfac)
        names = [layer.name for layer in kfac.layers]
        dims = {layer.name: (layer.d_a, layer.d_out) for layer in kfac.layers}
        eigens: dict[str, tuple[Eigen, Eigen]] = {}
        error: ValueError | None = None
        failures: list[str] = []
        for rank in range(self.world_size):
            layers = [name for name in names if owners[name] == rank]
            size = 1 + sum(d + d * d for name in layers for d in dims[name])
            bucket = torch.zeros(size, dtype=kfac.dtype, device=kfac.device)
            if rank == self.rank:
                error = self._decompose_into(kfac, layers, bucket)
            self._call("broadcast", bucket, src=rank)
            if bucket[0] != 0:
                failures.append(f"{layers[int(bucket[0].item()) - 1]!r} on rank {rank}")
                continue
            offset = 1
            for name in layers:
                pair = []
                for d in dims[name]:
                    values = bucket[offset : offset + d]
                    vectors = bucket[offset + d : offset + d + d * d].view(d, d)
                    pair.append(Eigen(values, vectors))
                    offset += d + d * d
                eigens[name] = tuple(pair)
        if error is not None:
            raise error
        if failures:
            raise ValueError(
                f"the eigendecomposition of layer {', '.join(failures)} failed; rank "
                f"{self.rank} stops too."
            )
        kfac.install(eigens, damping)

    @staticmethod
    def _decompose_into(kfac: KFACApproximation, layers: list[str], bucket: Tensor):
        """Write the decompositions of ``layers`` after the flag ``bucket[0]``; on failure set
        the flag to 1 + the failing layer's index and return the error."""
        offset = 1
        for index, name in enumerate(layers):
            try:
                pair = kfac.decompose([name])[name]
            except ValueError as error:
                bucket.zero_()
                bucket[0] = index + 1
                return error
            for values, vectors in pair:
                d = values.numel()
                bucket[offset : offset + d] = values
                bucket[offset + d : offset + d + d * d] = vectors.reshape(-1)
                offset += d + d * d
        return None


def _nccl() -> bool:
    return dist.get_backend() == "nccl"


def _kfac(curvature: RunningCurvature) -> KFACApproximation:
    if not isinstance(curvature, KFACApproximation):
        raise TypeError(
            "natlib.distributed shares K-FAC's curvature (natlib.kfac.KFACApproximation) only; "
            f"got {type(curvature).__name__}."
        )
    return curvature
