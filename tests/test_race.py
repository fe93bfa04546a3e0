"""natlib.race: equal-CPU-time races on the character transformer, tuning by the final test
loss, the choice between K-FAC-expand and K-FAC-reduce, and the record round trip."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from natlib import race

TINY = race.Task(context=8, width=8, layers=1, heads=2, batch=2, train_chars=4_000, test_chars=400)


def fake(tuning: dict[str, list[float]]) -> race.Race:
    """A record whose tuning runs end at the given bits, along each method's grid."""
    grids = {m: [0.1 * 3**i for i in range(len(b))] for m, b in tuning.items()}
    curves = [
        race.Curve(m, lr, 0, [0.0, 1.0], [0, 5], [7.0, bits])
        for m in tuning
        for lr, bits in zip(grids[m], tuning[m])
    ]
    knobs = {m: "lr" for m in tuning}
    return race.Race({}, 0, 0, 1, [1.0], [1.0], knobs, grids, {}, [], curves, [])


def test_best_learning_rate_interior_and_kfac_choice() -> None:
    r = fake(
        {
            "SGD": [3.0, 2.5, 2.8],
            "AdamW": [2.0, 2.2, math.inf],
            "K-FAC-expand": [3.1, 2.9, 3.0],
            "K-FAC-reduce": [2.95, 2.7, 2.9],
        }
    )
    assert r.best("SGD") == pytest.approx(0.3) and r.interior("SGD")
    assert r.best("AdamW") == pytest.approx(0.1) and not r.interior("AdamW")
    assert r.tuning_bits("AdamW")[-1] == math.inf
    assert r.kfac() == "K-FAC-reduce"


def test_a_race_tunes_chooses_and_races_every_seed(tmp_path) -> None:
    torch.manual_seed(0)
    grids = {"SGD": [0.1, 1.0], "AdamW": [1e-3, 1e-2], "K-FAC-expand": [1.0],
             "K-FAC-reduce": [1.0]}  # fmt: skip
    r = race.run(TINY, seeds=2, budget_s=0.2, tuning_s=0.1, evaluations=2, grids=grids)
    assert len(r.tuning) == 6 and r.methods[:2] == ["SGD", "AdamW"]
    assert r.methods[2] == r.kfac() and len(r.curves) == 2 * 3
    for method in r.methods:
        bits, seconds = r.bits(method), r.seconds(method)
        assert bits.shape == (2, 3) and np.isfinite(bits).all()
        assert bits[:, 0] == pytest.approx(r.bits("SGD")[:, 0])  # a seed fixes the start
        assert (seconds[:, 1:] >= np.array(r.checkpoints)).all()  # every checkpoint reached
        assert r.quartiles(method).shape == (3, 3) and r.step_seconds(method) > 0
        assert r.step_seconds(method, tuning=True) > 0
    assert r.environment["threads"] == 1 and "CPU time" in r.environment["clock"]
    assert "K-FAC" in r.report() and torch.get_num_threads() >= 1
    race.write_record(r, tmp_path / "race.json")
    assert race.read_record(tmp_path / "race.json") == r


def test_same_seed_same_run() -> None:
    """A run depends on its seed only: initialisation, batches and K-FAC's samples."""
    entries = [("K-FAC-reduce", 1.0, 1)]
    first = race.race(TINY, entries, [0.05])
    again = race.race(TINY, entries, [0.05])
    steps = min(first[0].steps[-1], again[0].steps[-1])
    assert steps > 0
    short = race.race(TINY, entries, [1e-9])  # one step
    assert short[0].steps == [0, 1] and short[0].bits[0] == first[0].bits[0]


def test_reader_rejects_other_schemas_and_incomplete_records(tmp_path) -> None:
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"schema": "natlib.sweep/1"}))
    with pytest.raises(ValueError, match="not a natlib.race/1 record .*'natlib.sweep/1'"):
        race.read_record(path)
    path.write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="not a natlib.race/1 record"):
        race.read_record(path)
    path.write_text(json.dumps({"schema": race.SCHEMA, "tuning": [], "curves": []}))
    with pytest.raises(ValueError, match="not a complete natlib.race/1 record"):
        race.read_record(path)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="seeds"):
        race.run(TINY, seeds=0)
    with pytest.raises(ValueError, match="budget_s"):
        race.run(TINY, budget_s=0.0)


def test_step_cost_of_the_transformer() -> None:
    """The cost model counts the linear layers at N T rows (expand) and the K-FAC extras."""
    cost = race.step_cost(TINY, "expand", T_inv=10)
    widths = TINY.width * TINY.width * 4 + 2 * 4 * TINY.width * TINY.width  # q k v o, MLP
    head = TINY.width * 97
    rows = TINY.batch * TINY.context
    assert cost.forward_backward == 6 * rows * (widths + head)
    assert cost.overhead > 1.0 and cost.refresh > 0
    reduce = race.step_cost(TINY, "reduce", T_inv=10)
    assert reduce.factors < cost.factors and reduce.forward_backward == cost.forward_backward


@pytest.mark.parametrize("method", ["SGD", "AdamW", "K-FAC-reduce"])
def test_replay_reproduces_a_raced_run_by_its_steps(method) -> None:
    """A run raced alongside others, re-run alone for the steps it took, ends at the same test
    loss: the steps, unlike the CPU seconds, do not depend on the machine."""
    curves = race.race(TINY, [("SGD", 0.1, 0), (method, 0.01, 1)], [0.05, 0.1])
    curve = curves[1]
    assert curve.steps[1] > 0
    for checkpoint in (1, 2):
        assert race.replay(curve, checkpoint, TINY) == curve.bits[checkpoint]
    assert race.replay(curve, 0, TINY) == curve.bits[0]  # no step: the initial loss


def test_the_transformer_is_drawn_in_float32_whatever_the_default() -> None:
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        drawn = [p.detach() for p in TINY.model(0).parameters()]
    finally:
        torch.set_default_dtype(previous)
    again = list(TINY.model(0).parameters())
    assert all(a.dtype == torch.float32 and torch.equal(a, b) for a, b in zip(drawn, again))
