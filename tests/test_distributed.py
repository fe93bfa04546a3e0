"""Data-parallel K-FAC (natlib.distributed): two gloo processes on 127.0.0.1 against one
process on the concatenated batch, the work split and traffic, failure and resume.

The two-process runs are launched once per module (``natlib.launch``, bounded in time) by
``tests/distributed_worker.py``; ``NATLIB_DEVICE=cuda`` on a machine with two GPUs runs them
with nccl instead.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from pathlib import Path

import distributed_worker as worker
import pytest
import torch
from helpers import checkout_env

from natlib import distributed, launch
from natlib.interface import Communicator
from natlib.kfac import KFACApproximation
from natlib.layout import ParamLayout

WORKER = str(Path(__file__).resolve().parent / "distributed_worker.py")
TIMEOUT_S = 120.0
WORLD = 2


def _launch(scenario: str, out: Path) -> tuple[list[launch.RankResult], float]:
    env = checkout_env()
    env["PYTHONPATH"] = os.pathsep.join([str(Path(WORKER).parent), env["PYTHONPATH"]])
    env.setdefault("OMP_NUM_THREADS", "1")
    start = time.monotonic()
    results = launch.launch([WORKER, scenario, str(out)], WORLD, TIMEOUT_S, env, grace_s=20.0)
    return results, time.monotonic() - start


def _outputs(results: list[launch.RankResult]) -> str:
    return "\n".join(f"--- rank {r.rank} ({r.returncode}):\n{r.stderr[-3000:]}" for r in results)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each rank's results of the suite and of the resumed runs."""
    if os.environ.get("NATLIB_DEVICE", "").startswith("cuda") and torch.cuda.device_count() < 2:
        pytest.skip("the nccl run needs two GPUs")
    out = tmp_path_factory.mktemp("distributed")
    loaded = {}
    for scenario in ("suite", "resume"):
        results, seconds = _launch(scenario, out)
        print(f"{scenario}: {seconds:.1f} s")
        assert all(r.returncode == 0 for r in results), _outputs(results)
        loaded[scenario] = [
            torch.load(out / f"{scenario}-rank{r}.pt", weights_only=False) for r in range(WORLD)
        ]
    return loaded


@functools.cache
def single_process(run: str, steps: int = worker.STEPS) -> tuple[torch.Tensor, KFACApproximation]:
    """The same run in one process on the concatenated batches: parameters and curvature
    after ``steps`` steps."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        X, y, loss_fn = worker.data()
        net = worker.model()
        optimizer = worker.optimizer_for(net, loss_fn, run)
        worker.train(net, optimizer, loss_fn, X, y, range(steps))
        return torch.nn.utils.parameters_to_vector(net.parameters()).detach(), optimizer.curvature
    finally:
        torch.set_default_dtype(previous)


@pytest.mark.parametrize("run", ["exact", "empirical"])
def test_two_processes_equal_one_on_the_concatenated_batch(runs, run):
    suite = runs["suite"]
    assert torch.equal(suite[0][run], suite[1][run]), "the ranks' parameters differ"
    expected = single_process(run)[0]
    error = (suite[0][run] - expected).abs().max().item()
    assert error <= 1e-10, f"parameters differ from one process by {error:.2e}"
    refresh = 4  # a refresh step: the factors were reduced, the ranks hold the same
    curvature = single_process(run, refresh + 1)[1]
    for name, (A, G) in suite[0][f"{run}-factors"][refresh].items():
        assert torch.equal(A, suite[1][f"{run}-factors"][refresh][name][0])
        assert (A - curvature.factors[name][0]).abs().max() <= 1e-12, name
        assert (G - curvature.factors[name][1]).abs().max() <= 1e-12, name


def test_monte_carlo_is_seeded_per_rank_and_its_statistics_match(runs):
    suite = runs["suite"]
    assert [s["mc-seed"] for s in suite] == [0, 1 << 32]
    assert torch.equal(suite[0]["mc"], suite[1]["mc"]), "the ranks' parameters differ"
    # Step 0 (same parameters in every run): the G of 2 x 32 draws per example, reduced,
    # estimates the exact G of the whole batch; one process draws other samples.
    exact, mc = single_process("exact", 1)[1], single_process("mc", 1)[1]
    for name, (A, G) in suite[0]["mc-factors"][0].items():
        assert (A - exact.factors[name][0]).abs().max() <= 1e-12
        reference = exact.factors[name][1]
        relative = ((G - reference).norm() / reference.norm()).item()
        assert relative < 0.15, f"{name}: MC G off the exact G by {relative:.2f}"
        assert not torch.equal(G, mc.factors[name][1])


def test_work_split_and_traffic_per_refresh(runs):
    suite = runs["suite"]
    layout = ParamLayout.of(worker.model(), kronecker=True)
    layers = [b for b in layout.blocks if b.name in suite[0]["exact-owners"]]
    dims = [(layer.d_a, layer.d_out) for layer in layers]
    assert dims == [(65, 24), (25, 16), (17, 10)]
    # costs 65^3 + 24^3 > 25^3 + 16^3 > 17^3 + 10^3: the largest alone, the two others together
    assert suite[0]["exact-owners"] == {layers[0].name: 0, layers[1].name: 1, layers[2].name: 1}
    assert suite[0]["exact-owners"] == suite[1]["exact-owners"]
    for rank in range(WORLD):
        assert suite[rank]["exact-collectives-3"] == []  # no refresh, no distributed call
        calls = suite[rank]["exact-collectives-4"]
        assert [c.operation for c in calls] == ["status", "reduce", "broadcast", "broadcast"]
        reduce = calls[1].elements
        assert reduce == distributed.reduce_elements(layers)
        assert reduce == 1 + sum(d * (d + 1) // 2 for pair in dims for d in pair) == 3115
        broadcast = sum(c.elements for c in calls[2:])
        assert broadcast == distributed.broadcast_elements(layers, WORLD)


def test_resume_across_two_processes_is_bit_identical(runs):
    for rank in range(WORLD):
        for run in worker.RUNS:
            resumed, uninterrupted = runs["resume"][rank][run], runs["suite"][rank][run]
            assert torch.equal(resumed, uninterrupted), f"{run} on rank {rank}"


@pytest.mark.parametrize(
    "scenario, cause",
    [("fail-factors", "factor A of layer"), ("fail-eigh", "eigendecomposition of factor A")],
)
def test_a_failing_rank_stops_every_rank_with_a_clear_error(tmp_path, scenario, cause):
    if os.environ.get("NATLIB_DEVICE", "").startswith("cuda") and torch.cuda.device_count() < 2:
        pytest.skip("the nccl run needs two GPUs")
    results, seconds = _launch(scenario, tmp_path)
    print(f"{scenario}: {seconds:.1f} s")
    assert seconds < 90, _outputs(results)  # imports take most of it on a loaded machine
    assert all(r.returncode not in (0, None) for r in results), _outputs(results)
    assert cause in results[1].stderr, _outputs(results)
    if scenario == "fail-factors":
        assert "RankFailure: rank 1 of 2 failed before K-FAC's factor reduce" in results[0].stderr
    else:
        assert "on rank 1 failed; rank 0 stops too" in results[0].stderr, _outputs(results)


# --------------------------------------------------------------------------- in this process


def test_greedy_assignment_balances_largest_first():
    assert distributed.assign([1, 8, 3, 5, 2], 2) == [1, 0, 1, 1, 0]  # loads 10 and 9
    assert distributed.assign([4, 4, 4], 3) == [0, 1, 2]
    assert distributed.assign([7, 1], 1) == [0, 0]
    with pytest.raises(ValueError, match="world_size"):
        distributed.assign([1], 0)


def test_one_process_communicates_nothing():
    assert not torch.distributed.is_initialized()
    assert type(distributed.communicator()) is Communicator
    assert Communicator().seed(7) == 7
    with pytest.raises(RuntimeError, match="setup"):
        distributed.DistributedCommunicator()


def test_setup_outside_torchrun_is_a_clear_error(monkeypatch):
    for variable in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(variable, raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        distributed.setup()


def test_backend_follows_the_device_and_shards_concatenate():
    assert distributed.backend_for(torch.device("cpu")) == "gloo"
    assert distributed.backend_for(torch.device("cuda", 1)) == "nccl"
    x = torch.arange(7)
    assert torch.equal(torch.cat([distributed.shard(x, r, 3) for r in range(3)]), x)


def test_launch_kills_processes_at_the_deadline():
    start = time.monotonic()
    results = launch.launch(["-c", "import time; time.sleep(60)"], 2, timeout_s=1.0)
    assert time.monotonic() - start < 10
    assert [r.returncode for r in results] == [None, None]
    failing = launch.launch(["-c", "import sys; sys.exit(3)"], 1, timeout_s=30.0)
    assert failing[0].returncode == 3
    with pytest.raises(ValueError, match="nprocs"):
        launch.launch([sys.executable], 0, 1.0)
