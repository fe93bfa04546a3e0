"""Data-parallel K-FAC on the digits, one rank per process:

    torchrun --nproc-per-node 2 scripts/train_distributed.py --steps 50

(gloo on the CPU, nccl with one GPU per rank; add ``--nnodes N --node-rank R
--rdzv-endpoint HOST:PORT`` across machines). Each rank trains on its share of every batch;
rank 0 prints the full training loss, and every rank the same parameters.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from natlib import distributed, problems
from natlib.optim import KFAC


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=256, help="global batch, split over ranks")
    args = parser.parse_args()
    torch.set_default_dtype(torch.float64)
    device = distributed.setup()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    data = problems.digits(device=device)
    model = problems.mlp([64, 32, 32, 10], seed=0).to(device)
    ddp = nn.parallel.DistributedDataParallel(model)
    optimizer = KFAC(
        model, data.loss_fn, lr=0.1, damping=1e-2, T_inv=5, communicator=distributed.communicator()
    )
    generator = torch.Generator().manual_seed(0)  # the same batches on every rank
    for step in range(args.steps + 1):
        if step % 10 == 0 and rank == 0:
            with torch.no_grad():
                loss = data.loss_fn(model(data.X_train), data.y_train).item()
            print(f"step {step:4d}  training loss {loss:.4f}", flush=True)
        if step == args.steps:
            break
        batch = torch.randperm(len(data.X_train), generator=generator)[: args.batch].to(device)
        mine = distributed.shard(batch, rank, world)
        optimizer.zero_grad()
        data.loss_fn(ddp(data.X_train[mine]), data.y_train[mine]).backward()
        optimizer.step()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
