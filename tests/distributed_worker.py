"""One rank of the distributed tests: ``python tests/distributed_worker.py SCENARIO OUTDIR``
under torchrun's environment (:func:`natlib.launch.launch` sets it).

Scenarios: ``suite`` (the exact, empirical and Monte-Carlo runs, with checkpoints half way),
``resume`` (the runs again from those checkpoints), ``fail-factors`` and ``fail-eigh`` (rank 1
fails at a refresh step). Each rank writes ``OUTDIR/<scenario>-rank<r>.pt``. The settings and
the training loop live here so the tests' single-process references run the same code.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from natlib import distributed, problems
from natlib.kfac import KFACApproximation
from natlib.optim import KFAC

BATCH = 64
STEPS = 6
CHECKPOINT = 3  # the suite saves the state after this many steps
SIZES = [64, 24, 16, 10]
#: The runs: kind, damping mode and Monte-Carlo samples.
RUNS = {
    "exact": dict(kind="exact", damping_mode="exact"),
    "empirical": dict(kind="empirical", damping_mode="pi"),
    "mc": dict(kind="mc", damping_mode="pi", mc_samples=32),
}


def data() -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    problem = problems.digits(dtype=torch.float64)
    return problem.X_train, problem.y_train, problem.loss_fn


def optimizer_for(model: nn.Module, loss_fn: nn.Module, run: str, communicator=None) -> KFAC:
    return KFAC(
        model,
        loss_fn,
        lr=0.1,
        damping=1e-2,
        momentum=0.5,
        T_inv=2,
        ema_decay=0.9,
        communicator=communicator,
        **RUNS[run],
    )


def train(net, optimizer, loss_fn, X, y, steps: range, rank: int = 0, world: int = 1) -> None:
    """Steps ``steps`` of the loop on batch k = examples ``[kB, (k+1)B)``, rank ``rank``'s
    shard of it (``net`` may be the DDP wrapper)."""
    for k in steps:
        index = distributed.shard(torch.arange(k * BATCH, (k + 1) * BATCH), rank, world)
        optimizer.zero_grad()
        loss_fn(net(X[index]), y[index]).backward()
        optimizer.step()


def model() -> nn.Module:
    return problems.mlp(SIZES, seed=0).to(torch.float64)


def main(scenario: str, out: Path) -> None:
    torch.set_default_dtype(torch.float64)
    device = distributed.setup(timeout_s=60.0)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    X, y, loss_fn = data()
    X, y = X.to(device), y.to(device)
    results: dict[str, object] = {}
    for run in RUNS if scenario in ("suite", "resume") else ["exact"]:
        net = model().to(device)
        ddp = nn.parallel.DistributedDataParallel(net)
        communicator = distributed.communicator()
        optimizer = optimizer_for(net, loss_fn, run, communicator)
        checkpoint = out / f"{run}-rank{rank}.pt"
        if scenario == "resume":
            state = torch.load(checkpoint, weights_only=False)
            net.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            train(ddp, optimizer, loss_fn, X, y, range(CHECKPOINT, STEPS), rank, world)
        elif scenario == "suite":
            factors = {}
            for k in range(STEPS):
                if k == CHECKPOINT:
                    state = {"model": net.state_dict(), "optimizer": optimizer.state_dict()}
                    torch.save(state, checkpoint)
                communicator.collectives.clear()
                train(ddp, optimizer, loss_fn, X, y, range(k, k + 1), rank, world)
                results[f"{run}-collectives-{k}"] = list(communicator.collectives)
                factors[k] = {
                    n: (A.cpu(), G.cpu()) for n, (A, G) in optimizer.curvature.factors.items()
                }
            results[f"{run}-factors"] = factors  # after each step; reduced at refresh steps
            results[f"{run}-owners"] = communicator.owners(optimizer.curvature)
            results[f"{run}-seed"] = optimizer.generator.initial_seed()
        else:
            fail(scenario, rank, optimizer)
            train(ddp, optimizer, loss_fn, X, y, range(STEPS), rank, world)
        results[run] = torch.nn.utils.parameters_to_vector(net.parameters()).detach().cpu()
    torch.save(results, out / f"{scenario}-rank{rank}.pt")
    torch.distributed.destroy_process_group()


def fail(scenario: str, rank: int, optimizer: KFAC) -> None:
    """Make rank 1 fail at step 2, a refresh step: NaN in its factors, or a decomposition
    that raises."""
    if rank != 1:
        return
    if scenario == "fail-factors":
        estimate = optimizer.watcher.estimate

        def poisoned():
            if optimizer.steps == 2:
                pending = optimizer.watcher._pending
                next(iter(pending["A"].values())).fill_(float("nan"))
            return estimate()

        optimizer.watcher.estimate = poisoned
    elif scenario == "fail-eigh":
        decompose = KFACApproximation.decompose

        def failing(self, names):
            if optimizer.steps == 2:
                raise ValueError(
                    f"the eigendecomposition of factor A of layer {names[0]!r} failed."
                )
            return decompose(self, names)

        KFACApproximation.decompose = failing


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
