"""The timing harness: clocks, interleaving, the problem, the training loop and the step split."""

import json
import math
import time

import pytest
import torch
from torch import nn

from natlib import costmodel, timing
from natlib.checks import check_positive_int

CPU = torch.device("cpu")
KFAC_OPTIONS = {"lr": 1e-6, "damping": 1e-3, "kind": "mc", "damping_mode": "pi"}


def test_clocks_and_memory_probe():
    calls = []
    assert timing.peak_memory_bytes(lambda: calls.append(1), CPU) is None and calls == [1]
    assert timing.cpu_clock(CPU) is time.process_time
    assert timing.cpu_clock(torch.device("cuda")) is None
    spent = timing.median_seconds(lambda: sum(range(1000)), 0.01, clock=timing.cpu_clock(CPU))
    assert 0 < spent < 1 and math.isfinite(spent)


def test_interleaved_medians_take_turns():
    order = []
    values = {"a": iter([3.0, 1.0, 2.0]), "b": iter([5.0, 4.0, 6.0])}

    def timer(key):
        return lambda: order.append(key) or next(values[key])

    medians = timing.interleaved_medians({"a": timer("a"), "b": timer("b")}, rounds=3)
    assert order == ["a", "b"] * 3
    assert medians == {"a": 2.0, "b": 5.0}
    with pytest.raises(ValueError, match="rounds"):
        timing.interleaved_medians({}, rounds=0)


def test_environment_and_json(tmp_path):
    env = timing.environment(CPU)
    assert set(env) == {"device", "torch", "threads", "python"}
    assert env["threads"] == torch.get_num_threads()
    path = tmp_path / "new" / "folder" / "record.json"
    timing.write_json(costmodel.LayerMemory(1, 2, 3), path)
    assert json.loads(path.read_text()) == {"weights": 1, "factors": 2, "inverses": 3}


def test_resolve_device():
    assert timing.resolve_device("cpu") == CPU
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        timing.resolve_device("cuda")


def test_random_mlp_problem():
    model, X, y, loss_fn = timing.random_mlp_problem([4, 6, 3], 5, "mse", CPU, torch.float64)
    assert isinstance(loss_fn, nn.MSELoss) and y.shape == (5, 3) and y.dtype == torch.float64
    assert X.shape == (5, 4) and model(X).shape == (5, 3)
    again = timing.random_mlp_problem([4, 6, 3], 5, "mse", CPU, torch.float64)
    assert torch.equal(X, again[1]) and torch.equal(y, again[2])
    _, X, y, loss_fn = timing.random_mlp_problem([4, 3], 7, "cross_entropy", CPU)
    assert isinstance(loss_fn, nn.CrossEntropyLoss) and y.shape == (7,) and y.max() < 3
    assert X.dtype == torch.float32
    with pytest.raises(ValueError, match="loss 'hinge'"):
        timing.random_mlp_problem([4, 3], 7, "hinge", CPU)


def test_training_step_runs_the_usual_loop():
    model, X, y, loss_fn = timing.random_mlp_problem([4, 3], 8, "mse", CPU)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    steps = []
    optimizer.register_step_post_hook(lambda *args: steps.append(1))
    before = loss_fn(model(X), y).item()
    timing.training_step(model, optimizer, loss_fn, X, y, steps=3)()
    assert len(steps) == 3 and loss_fn(model(X), y).item() < before
    with pytest.raises(ValueError, match="steps"):
        timing.training_step(model, optimizer, loss_fn, X, y, steps=0)


def test_once_is_a_period_no_run_reaches():
    check_positive_int("T_inv", timing.ONCE)
    assert timing.ONCE > 10**9


def test_step_parts_split_the_work():
    model, X, y, loss_fn = timing.random_mlp_problem([6, 6, 6], 16, "mse", CPU)
    parts = timing.step_parts(model, loss_fn, X, y, {"lr": 1e-6}, KFAC_OPTIONS)
    assert tuple(parts.fns) == timing.STEP_PARTS
    assert parts.peaks == {"sgd": None, "kfac": None, "kfac_factors": None}  # CUDA only
    plain, factors = parts.optimizers
    assert (plain.T_cov, plain.T_inv) == (timing.ONCE, timing.ONCE)
    assert (factors.T_cov, factors.T_inv) == (1, timing.ONCE)
    assert plain.kind == "mc" and plain.options == {
        "damping_mode": "pi",
        "approximation": "expand",
        "unsupported": "error",
    }
    kept = {name: A.clone() for name, (A, _) in plain.curvature.factors.items()}
    running = {name: A.clone() for name, (A, _) in factors.curvature.factors.items()}
    for fn in parts.fns.values():
        fn()
    # the plain step keeps the factors of step 0; the factor step averages in new ones
    for name, (A, _) in plain.curvature.factors.items():
        assert torch.equal(A, kept[name])
    assert any(
        not torch.equal(A, running[name]) for name, (A, _) in factors.curvature.factors.items()
    )
    assert plain.curvature.eigen  # the refresh ran on the plain optimiser's factors
    parts.close()
    assert all(p.grad is None for p in model.parameters())  # every part ran on a copy


def test_amortised_parts():
    parts = timing.amortised_parts(1.0, 1.5, 3.5, 10.0, T_cov=2, T_inv=5)
    assert parts == {"forward_backward": 1.0, "factors": 1.0, "precondition": 0.5, "refresh": 2.0}
    assert tuple(parts) == costmodel.PARTS
