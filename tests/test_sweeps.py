"""Tuning sweeps: grids, statistics over seeds, edges, the JSON record and its replay."""

from dataclasses import replace

import numpy as np
import pytest

from natlib import sweeps
from natlib.notebooks import record_path

TINY = replace(
    sweeps.PROBLEMS["autoencoder"],
    sizes=[64, 4, 64],
    steps=6,
    eval_every=3,
    grids={"Adam": {"lr": [0.001, 0.01, 0.1]}, "SGD + momentum": {"lr": [0.1]}},
)


@pytest.fixture(scope="module")
def record():
    return sweeps.run(TINY, seeds=2, device="cpu")


def test_settings_enumerate_the_grid():
    assert sweeps.settings({"damping": [1, 2], "lr": [3]}) == [
        {"damping": 1, "lr": 3},
        {"damping": 2, "lr": 3},
    ]


def test_record_statistics(record):
    assert record.steps == [0, 3, 6]
    assert record.losses("Adam", {"lr": 0.01}).shape == (2, 3)
    best = record.best("Adam")
    assert record.median_final("Adam", best) == min(
        record.median_final("Adam", s) for s in sweeps.settings(TINY.grids["Adam"])
    )
    assert record.edges("SGD + momentum") == []  # a one-point grid has no edge
    low, mid, high = record.quartiles("Adam", best)
    assert np.all(low <= mid) and np.all(mid <= high)
    assert np.isinf(record.first_below("Adam", best, -1.0)).all()
    assert (record.first_below("Adam", best, np.inf) == 0).all()


def test_record_round_trip_and_replay(record, tmp_path):
    path = tmp_path / "sweep.json"
    sweeps.write_record(record, path)
    again = sweeps.read_record(path)
    assert again == record
    trace = sweeps.run_one(TINY, "Adam", {"lr": 0.01}, 1)
    np.testing.assert_allclose(trace.losses, again.losses("Adam", {"lr": 0.01})[1])


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="not supported"):
        sweeps.run("nope")
    path = tmp_path / "other.json"
    path.write_text('{"schema": "x"}')
    with pytest.raises(ValueError, match="sweep"):
        sweeps.read_record(path)


@pytest.mark.parametrize("name", ["sweep-kfac-ngd-cpu.json", "sweep-autoencoder-cpu.json"])
def test_recorded_sweeps_are_complete(name):
    record = sweeps.read_record(record_path(name))
    for method in record.methods:
        for setting in sweeps.settings(record.grids[method]):
            assert record.losses(method, setting).shape == (record.seeds, len(record.steps))
