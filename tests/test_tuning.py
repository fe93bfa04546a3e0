"""Equal-budget tuning: the same number of runs per method, the tuning run reused, failed
runs ended with inf."""

import math

import torch
from torch import nn

from natlib import problems, tuning


def test_tuning_gives_every_method_the_same_budget_and_reuses_the_tuning_run():
    X, y, loss_fn = torch.randn(20, 3), torch.randint(2, (20,)), nn.CrossEntropyLoss()
    methods = [
        tuning.Method(
            "gd", "lr", (0.01, 0.1, 1.0), lambda m, f, v: torch.optim.SGD(m.parameters(), lr=v)
        ),
        tuning.Method(
            "lbfgs",
            "lr",
            (0.1, 1.0, 1e9),
            lambda m, f, v: torch.optim.LBFGS(m.parameters(), lr=v, max_iter=1),
            closure=True,
        ),
    ]
    out = tuning.tune_and_train(
        methods, lambda s: problems.mlp([3, 2], seed=s), loss_fn, X, y, 5, [0, 1, 2]
    )
    for tuned in out.values():
        assert len(tuned.grid_losses) == 3 and len(tuned.losses) == 3
        assert all(len(run) == 6 for run in tuned.losses)
        assert tuned.losses[0][-1] == min(tuned.grid_losses)
    assert out["gd"].value == 1.0 and not out["gd"].interior


def test_a_failed_step_ends_the_run_with_infinite_losses():
    class Failing(torch.optim.SGD):
        def step(self, closure=None):
            raise FloatingPointError("diverged")

    model = problems.mlp([3, 2], seed=0)
    X, y = torch.randn(5, 3), torch.randint(2, (5,))
    losses, _ = tuning.train_losses(
        model, nn.CrossEntropyLoss(), X, y, Failing(model.parameters(), lr=0.1), 3
    )
    assert math.isfinite(losses[0]) and all(math.isinf(v) for v in losses[1:])
    assert len(losses) == 4


def test_digits_methods_have_three_point_grids():
    methods = tuning.digits_methods()
    assert len(methods) == 7 and all(len(m.grid) == 3 for m in methods)
