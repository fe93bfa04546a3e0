"""The slope fit, the timing sweeps and the JSON record (not the timings), and the names the
chapter reaches through ``natlib.scaling``."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from natlib import costmodel, scaling, timing
from natlib.__main__ import main

CPU = torch.device("cpu")
RECORD = Path(__file__).parents[1] / "book" / "data" / "scaling-cpu.json"
TINY = scaling.Settings(
    widths=[16, 23, 32, 45, 64],
    batch=8,
    rounds=1,
    step_widths=[8, 16],
    step_batches=[4, 8],
    width=8,
    depths=[1, 2],
    depth=1,
    min_run_time=0.001,
)


@pytest.fixture(scope="module")
def record() -> scaling.ScalingRecord:
    return scaling.measure(TINY, CPU)


def test_geometric_widths():
    assert scaling.geometric_widths(64, 2048) == [
        64,
        91,
        128,
        181,
        256,
        362,
        512,
        724,
        1024,
        1448,
        2048,
    ]
    assert scaling.geometric_widths(16, 1024, 1) == [16, 32, 64, 128, 256, 512, 1024]
    assert scaling.geometric_widths(64, 100, 1) == [64]
    with pytest.raises(ValueError, match="low <= high"):
        scaling.geometric_widths(128, 64)


CHAPTER_NAMES = (
    "GROUPS ONCE PIECES PIECE_LABELS Settings cycle_seconds factor_cost fit_slope layer_memory "
    "layer_sweep read_record step_cost step_sweep"
).split()


@pytest.mark.parametrize("name", CHAPTER_NAMES)
def test_names_chapter_4_uses_stay_reachable(name):
    assert hasattr(scaling, name)


def test_the_chapter_reaches_the_cost_model_and_the_harness_through_scaling():
    assert scaling.step_cost is costmodel.step_cost and scaling.GROUPS is costmodel.GROUPS
    assert scaling.layer_memory is costmodel.layer_memory
    assert scaling.factor_cost is costmodel.factor_cost and scaling.PARTS is costmodel.PARTS
    assert scaling.ONCE == timing.ONCE
    cost = scaling.step_cost(1024, 256, depth=4, T_cov=1, T_inv=10)
    assert cost.overhead == pytest.approx(1 + 1 + 2 * 1024 / (3 * 256) + 11 * 1024 / (30 * 256))


def test_fit_slope_recovers_a_known_exponent():
    x = np.array(scaling.geometric_widths(64, 4096))
    exact = scaling.fit_slope(x, 3e-9 * x**2.8)
    assert exact.slope == pytest.approx(2.8) and exact.scale == pytest.approx(3e-9)
    assert exact.points == 5  # the top two octaves: 1024 ... 4096
    rng = np.random.default_rng(0)
    noisy = scaling.fit_slope(x, x**3 * np.exp(0.05 * rng.standard_normal(len(x))), lower=64)
    assert noisy.low < 3 < noisy.high and noisy.points == len(x)
    assert noisy.verdict("eigh", 2.5, 3.3) == "eigh slope within [2.5, 3.3]: yes"
    assert exact.verdict("eigh", 2.9, 3.3) == "eigh slope within [2.9, 3.3]: no"


def test_fit_slope_rejects_bad_input():
    with pytest.raises(ValueError, match="3 points"):
        scaling.fit_slope([1, 2, 4, 16], [1, 2, 4, 16])
    with pytest.raises(ValueError, match="positive"):
        scaling.fit_slope([1, 2, 3], [0, 1, 2], lower=1)
    with pytest.raises(ValueError, match="one length"):
        scaling.fit_slope([1, 2, 3], [1, 2])


def test_layer_pieces_compute_what_they_name():
    pieces = scaling.layer_pieces(12, 5, CPU, torch.float64)
    A, G = pieces["factors"]()
    assert A.shape == G.shape == (12, 12)
    values, vectors = pieces["eigh"]()
    assert values.shape == (12,) and vectors.shape == (12, 12)
    inverse = pieces["cholesky"]()
    assert inverse.shape == (12, 12)
    assert pieces["precondition"]().shape == (12, 12)


def test_record_holds_every_sweep(record):
    assert record.layer.widths == TINY.widths
    assert all(len(t) == len(TINY.widths) and min(t) > 0 for t in record.layer.seconds.values())
    assert record.layer.flop_rate() > 0 and record.layer.eigh_constant() > 0
    assert [s.width for s in record.by_width] == TINY.step_widths
    assert [s.batch for s in record.by_batch] == TINY.step_batches
    assert [s.depth for s in record.by_depth] == TINY.depths
    for s in record.by_width + record.by_batch + record.by_depth:
        assert min(s.sgd_s, s.kfac_s, s.kfac_factors_s, s.refresh_s) > 0
        assert s.sgd_peak_bytes is None and s.kfac_peak_bytes is None  # measured on CUDA only
    assert record.environment["threads"] == scaling.TIMING_THREADS
    assert record.environment["clock"] == "CPU time of one thread"
    assert "slope" in record.report()


def test_step_times_amortise_their_parts():
    s = scaling.StepTimes(64, 32, 2, sgd_s=1.0, kfac_s=1.5, kfac_factors_s=3.5, refresh_s=10.0)
    assert s.parts(T_cov=2, T_inv=5) == {
        "forward_backward": 1.0,
        "factors": 1.0,
        "precondition": 0.5,
        "refresh": 2.0,
    }
    assert s.step_seconds(2, 5) == 4.5 and s.overhead(2, 5) == 4.5
    assert s.precondition_overhead == 0.5
    assert s.dominant(1, 1) == "refresh" and s.dominant(1, 100) == "per-example work"


def test_cycle_check_compares_composed_with_direct_seconds():
    s = scaling.StepTimes(64, 32, 2, sgd_s=1.0, kfac_s=1.5, kfac_factors_s=3.5, refresh_s=10.0)
    assert scaling.CycleCheck(2, 5, seconds=4.5).disagreement(s) == 0
    assert scaling.CycleCheck(2, 5, seconds=3.0).disagreement(s) == 0.5


def test_the_record_times_every_cycle_period(record):
    assert [(c.T_cov, c.T_inv) for c in record.cycles] == list(scaling.CYCLE_PERIODS)
    assert all(c.seconds > 0 for c in record.cycles)


def test_json_record_round_trips(record, tmp_path):
    path = tmp_path / "scaling-cpu.json"
    scaling.write_record(record, path)
    data = json.loads(path.read_text())
    assert data["schema"] == scaling.SCHEMA
    assert {"device", "torch", "threads", "dtype", "clock"} <= set(data["environment"])
    assert set(data["layer"]["seconds"]) == set(scaling.PIECES)
    assert scaling.read_record(path) == record


def test_read_record_names_what_is_wrong(record, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"schema": "something else"}))
    with pytest.raises(ValueError, match=f"not a {scaling.SCHEMA} record"):
        scaling.read_record(path)
    scaling.write_record(record, path)
    data = json.loads(path.read_text())
    del data["by_batch"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="by_batch"):
        scaling.read_record(path)


def test_cli_writes_the_record(record, tmp_path, monkeypatch, capsys):
    asked = []
    monkeypatch.setattr(scaling, "benchmark", lambda device: asked.append(device) or record)
    out = tmp_path / "data" / "scaling-cpu.json"
    main(["bench", "scaling", "--device", "cpu", "--out", str(out)])
    assert asked == ["cpu"] and "K-FAC scaling on" in capsys.readouterr().out
    assert scaling.read_record(out) == record


def test_the_recorded_run_still_loads():
    record = scaling.read_record(RECORD)
    assert record.schema == scaling.SCHEMA and record.layer.widths == record.settings.widths
    assert "K-FAC/SGD at d=" in record.report()


def test_sweeps_time_the_monte_carlo_fisher_with_factored_damping():
    assert scaling.KFAC_OPTIONS["kind"] == "mc" and scaling.KFAC_OPTIONS["damping_mode"] == "pi"


def test_benchmark_refuses_a_missing_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        scaling.benchmark("cuda")


def test_cycle_seconds_runs_whole_refresh_cycles():
    seconds = scaling.cycle_seconds(8, 4, 1, T_cov=1, T_inv=3, device=CPU, min_run_time=0.001)
    assert 0 < seconds < 1
