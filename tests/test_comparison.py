"""natlib.comparison: equal-budget comparisons, the best learning rate and whether it is interior,
quartiles to a target, full-batch L-BFGS runs, and the record round trip."""

import json
import math

import pytest
import torch

from natlib import comparison, problems


def fake(losses_by_lr: dict[float, list[list[float]]]) -> comparison.Comparison:
    runs = [
        comparison.Run("m", lr, seed, [0, 1, 2], losses, [0.0, 1.0, 2.0])
        for lr, per_seed in losses_by_lr.items()
        for seed, losses in enumerate(per_seed)
    ]
    return comparison.Comparison(
        "digits", (2, 2), 2, 1, 1, 2, 0.5, {"m": list(losses_by_lr)}, {"m": ""}, runs
    )


def test_best_is_fewest_median_iterations_then_lowest_final_loss():
    c = fake(
        {
            0.1: [[1, 0.9, 0.6], [1, 0.9, 0.7]],  # never reaches 0.5
            0.3: [[1, 0.4, 0.3], [1, 0.6, 0.4]],  # iterations 1 and 2
            1.0: [[1, 0.6, 0.2], [1, 0.6, 0.1]],  # iterations 2 and 2
        }
    )
    assert c.iterations("m", 0.3) == [1.0, 2.0]
    assert c.iterations("m", 0.1) == [math.inf, math.inf]
    assert c.best("m") == 0.3 and c.interior("m")
    assert c.quartiles([1.0, 2.0, 3.0]) == (1.5, 2.0, 2.5)
    assert c.final_loss("m", 1.0) == pytest.approx(0.15)


def test_a_best_point_at_the_edge_is_reported():
    c = fake({0.1: [[1, 0.4, 0.3]] * 2, 0.3: [[1, 0.6, 0.4]] * 2, 1.0: [[1, 0.9, 0.9]] * 2})
    assert c.best("m") == 0.1 and not c.interior("m")


def test_compare_optimizers_runs_every_setting_and_round_trips(tmp_path):
    grids = {"K-FAC": (0.1, 0.3), "Adam": (0.01,), "L-BFGS": (1.0,)}
    c = comparison.compare_optimizers(
        (64, 4, 10), steps=4, seeds=2, eval_every=2, methods=list(grids), grids=grids
    )
    assert len(c.runs) == 2 * (2 + 1 + 1)
    assert all(r.steps == [0, 2, 4] and math.isfinite(r.losses[-1]) for r in c.runs)
    lbfgs = c.runs_of("L-BFGS", 1.0)[0]
    assert lbfgs.losses[-1] < lbfgs.losses[0]
    assert "L-BFGS" in c.report() and c.environment["dtype"] == "float64"
    comparison.write_record(c, tmp_path / "t.json")
    assert comparison.read_record(tmp_path / "t.json") == c


@pytest.mark.parametrize(("model", "sizes"), [("mlp", (64, 3, 10)), ("cnn", (2, 3))])
def test_runs_do_not_depend_on_the_default_dtype(model, sizes):
    previous = torch.get_default_dtype()
    try:
        results = []
        for default in (torch.float32, torch.float64):
            torch.set_default_dtype(default)
            c = comparison.compare_optimizers(
                sizes, steps=2, seeds=1, eval_every=1, methods=["K-FAC"],
                grids={"K-FAC": (0.3,)}, model=model,
            )  # fmt: skip
            results.append(c.runs[0].losses)
    finally:
        torch.set_default_dtype(previous)
    assert results[0] == results[1]


def test_train_lbfgs_records_like_train():
    data = problems.digits(dtype=torch.float64)
    model = problems.mlp([64, 3, 10], seed=0, dtype=torch.float64)
    optimizer = comparison.METHODS["L-BFGS"](model, data.loss_fn, 1.0, 0)
    trace = comparison.train_lbfgs(model, optimizer, data.loss_fn, data.X_train, data.y_train, 5, 2)
    assert trace.steps == [0, 2, 4, 5] and trace.losses[-1] < trace.losses[0]
    assert trace.seconds[0] == 0.0 and trace.seconds[-1] > 0


def test_the_digits_cnn_and_a_diverging_kfac_run(tmp_path):
    """``model="cnn"`` trains problems.digits_cnn; a diverging K-FAC run ends early, never
    reaches the target and does not stop the comparison."""
    grids = {"SGD": (0.1,), "K-FAC": (1e8,)}
    c = comparison.compare_cnn(sizes=(2, 3), steps=10, seeds=1, eval_every=2, grids=grids)
    assert c.model == "cnn" and "ReLU CNN, channels 2-3" in c.report()
    assert math.isfinite(c.runs_of("SGD", 0.1)[0].losses[-1])
    diverged = c.runs_of("K-FAC", 1e8)[0]
    assert not math.isfinite(diverged.losses[-1]) and diverged.steps[-1] < 10
    assert c.iterations("K-FAC", 1e8) == [math.inf]
    comparison.write_record(c, tmp_path / "cnn.json")
    again = comparison.read_record(tmp_path / "cnn.json")  # NaN != NaN: compare the rest
    assert again.model == "cnn" and again.runs[0] == c.runs[0] and again.report() == c.report()


def test_reader_accepts_old_records_and_rejects_other_schemas(tmp_path):
    c = fake({0.1: [[1, 0.4, 0.3]] * 2})
    comparison.write_record(c, tmp_path / "c.json")
    data = json.loads((tmp_path / "c.json").read_text())
    del data["schema"], data["model"]  # as written before either field existed
    (tmp_path / "old.json").write_text(json.dumps(data))
    assert comparison.read_record(tmp_path / "old.json") == c
    (tmp_path / "other.json").write_text(json.dumps({**data, "schema": "natlib.race/1"}))
    with pytest.raises(ValueError, match="not a natlib.comparison/1 record"):
        comparison.read_record(tmp_path / "other.json")
    del data["runs"]
    (tmp_path / "short.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="not a complete natlib.comparison/1 record"):
        comparison.read_record(tmp_path / "short.json")
