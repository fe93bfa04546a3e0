"""natlib.hooks: a model with a natlib optimiser attached stays a plain model when copied."""

import copy
import pickle

import torch
from torch import nn

from natlib import problems
from natlib.optim import KFAC, NGD


def test_copied_and_pickled_models_work_as_plain_models() -> None:
    for make in (KFAC, NGD):
        model = problems.mlp([3, 4, 2], seed=0)
        optimizer = make(model, nn.MSELoss(), lr=0.1, damping=0.1)
        X, y = torch.randn(5, 3), torch.zeros(5, 2)
        for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            with torch.no_grad():
                assert torch.equal(twin(X), model(X))
            nn.MSELoss()(twin(X), y).backward()  # records nothing for the original optimiser
        optimizer.zero_grad()
        nn.MSELoss()(model(X), y).backward()
        optimizer.step()  # the original still trains
        assert optimizer.steps == 1


def test_hooks_do_not_keep_the_optimiser_alive() -> None:
    model = problems.mlp([3, 2], seed=0)
    optimizer = KFAC(model, nn.MSELoss())
    del optimizer
    model(torch.randn(2, 3)).sum().backward()  # hooks of a collected optimiser do nothing
