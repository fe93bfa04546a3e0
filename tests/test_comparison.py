"""natlib.comparison: equal-budget comparisons, the best learning rate and whether it is interior,
quartiles to a target, full-batch L-BFGS runs, the tasks (classifier and autoencoder), and the
record round trip with its schema check."""

import json
import math
import re

import pytest
import torch

from natlib import comparison, optim, problems
from natlib.__main__ import main
from natlib.preconditioned import train_lbfgs


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
    assert c.quartiles([4.0, 2.0, 3.0, math.inf, math.inf]) == (3.0, 4.0, math.inf)
    assert c.quartiles([1.0, math.inf]) == (math.inf, math.inf, math.inf)
    assert c.final_loss("m", 1.0) == pytest.approx(0.15)


def test_a_best_point_at_the_edge_is_reported():
    c = fake({0.1: [[1, 0.4, 0.3]] * 2, 0.3: [[1, 0.6, 0.4]] * 2, 1.0: [[1, 0.9, 0.9]] * 2})
    assert c.best("m") == 0.1 and not c.interior("m")


def test_compare_optimizers_runs_every_setting_and_round_trips(tmp_path):
    grids = {"K-FAC": (0.1, 0.3), "Adam": (0.01,), "L-BFGS": (1.0,)}
    c = comparison.compare_optimizers(
        "digits", sizes=(64, 4, 10), steps=4, seeds=2, methods=list(grids), grids=grids
    )
    assert len(c.runs) == 2 * (2 + 1 + 1)
    assert all(r.steps == [0, 2, 4] and math.isfinite(r.losses[-1]) for r in c.runs)
    lbfgs = c.runs_of("L-BFGS", 1.0)[0]
    assert lbfgs.losses[-1] < lbfgs.losses[0]
    assert "L-BFGS" in c.report() and c.environment["dtype"] == "float64"
    comparison.write_record(c, tmp_path / "t.json")
    assert comparison.read_record(tmp_path / "t.json") == c


@pytest.mark.parametrize(("problem", "sizes"), [("digits", (64, 3, 10)), ("cnn", (2, 3))])
def test_runs_do_not_depend_on_the_default_dtype(problem, sizes):
    previous = torch.get_default_dtype()
    try:
        results = []
        for default in (torch.float32, torch.float64):
            torch.set_default_dtype(default)
            c = comparison.compare_optimizers(
                problem, sizes=sizes, steps=2, seeds=1, methods=["K-FAC"],
                grids={"K-FAC": (0.3,)},
            )  # fmt: skip
            results.append(c.runs[0].losses)
    finally:
        torch.set_default_dtype(previous)
    assert results[0] == results[1]


def test_train_lbfgs_records_like_train():
    data = problems.digits(dtype=torch.float64)
    model = problems.mlp([64, 3, 10], seed=0, dtype=torch.float64)
    optimizer = comparison.METHODS["L-BFGS"](model, data.loss_fn, 1.0, 0, "exact")
    trace = train_lbfgs(model, optimizer, data.loss_fn, data.X_train, data.y_train, 5, 2)
    assert trace.steps == [0, 2, 4, 5] and trace.losses[-1] < trace.losses[0]
    assert trace.seconds[0] == 0.0 and trace.seconds[-1] > 0


def test_the_digits_cnn_and_a_diverging_kfac_run(tmp_path):
    """The task "cnn" trains problems.digits_cnn; a diverging K-FAC run ends early, never
    reaches the target and does not stop the comparison."""
    grids = {"SGD": (0.1,), "K-FAC": (1e8,)}
    c = comparison.compare_optimizers("cnn", sizes=(2, 3), steps=10, seeds=1, grids=grids)
    assert c.model == "cnn" and "ReLU CNN, channels 2-3" in c.report()
    assert math.isfinite(c.runs_of("SGD", 0.1)[0].losses[-1])
    diverged = c.runs_of("K-FAC", 1e8)[0]
    assert not math.isfinite(diverged.losses[-1]) and diverged.steps[-1] < 10
    assert c.iterations("K-FAC", 1e8) == [math.inf]
    comparison.write_record(c, tmp_path / "cnn.json")
    again = comparison.read_record(tmp_path / "cnn.json")  # NaN != NaN: compare the rest
    assert again.model == "cnn" and again.runs[0] == c.runs[0] and again.report() == c.report()


@pytest.mark.parametrize("name", list(comparison.TASKS))
def test_every_task_gives_each_method_as_many_increasing_learning_rates(name):
    task = comparison.TASKS[name]
    if task.network == "mlp":  # chapter 5 compares every method
        assert set(task.grids) | set(task.left_out) == set(comparison.METHODS) - {"SGD"}
    assert not set(task.grids) & set(task.left_out)
    assert len({len(grid) for grid in task.grids.values()}) == 1  # equal budgets
    for grid in task.grids.values():
        assert len(grid) >= 4 and list(grid) == sorted(set(grid))
        assert all(2.5 < b / a < 3.5 for a, b in zip(grid, grid[1:]))  # half a decade


def test_the_autoencoder_runs_with_its_own_fisher_and_leaves_out_what_it_says():
    grids = {"diagonal Fisher": (0.3,), "L-BFGS": (0.1,)}
    c = comparison.compare_optimizers("autoencoder", steps=3, seeds=1, methods=list(grids),
                                      grids=grids)  # fmt: skip
    assert c.problem == "autoencoder" and c.sizes == comparison.TASKS["autoencoder"].sizes
    assert "Monte-Carlo" in c.settings["diagonal Fisher"]
    assert all(r.losses[-1] < r.losses[0] for r in c.runs)
    assert "block-diagonal" in c.left_out and "left out: block-diagonal" in c.report()
    reasons = comparison._left_out(comparison.TASKS["autoencoder"], problems.digits_autoencoder(
        dtype=torch.float64), torch.float64, "cpu", seeds=5)  # fmt: skip
    assert re.search(r"one step took \d+\.\d CPU s here, .* about \d+ CPU hours",
                     reasons["block-diagonal"])  # fmt: skip
    assert c.report().startswith("digits autoencoder")
    with pytest.raises(ValueError, match="block-diagonal.*backward pass per output"):
        comparison.compare_optimizers("autoencoder", methods=["block-diagonal"])
    with pytest.raises(ValueError, match="problem 'mnist' is not supported"):
        comparison.compare_optimizers("mnist")


def test_runs_stop_at_the_target_when_asked():
    data = problems.digits(dtype=torch.float64)
    model = problems.mlp([64, 3, 10], seed=0, dtype=torch.float64)
    optimizer = comparison.METHODS["Adam"](model, data.loss_fn, 0.1, 0, "exact")
    trace = optim.train(model, optimizer, data.loss_fn, data.X_train, data.y_train, 50, 128,
                        5, 0, target=2.0)  # fmt: skip
    assert trace.losses[-1] <= 2.0 < trace.losses[-2] and trace.steps[-1] < 50
    lbfgs = comparison.METHODS["L-BFGS"](model, data.loss_fn, 1.0, 0, "exact")
    trace = train_lbfgs(model, lbfgs, data.loss_fn, data.X_train, data.y_train, 9,
                                   3, target=10.0)  # fmt: skip
    assert trace.steps == [0]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.pop("schema"), "schema 'natlib.comparison/1'.*None"),
        (lambda d: d.update(schema="natlib.sweep/1"), "its schema is 'natlib.sweep/1'"),
        (lambda d: d.pop("target"), r"missing fields \['target'\]"),
        (lambda d: d.update(tuned="lr"), r"unknown fields \['tuned'\]"),
    ],
)
def test_a_record_of_the_wrong_schema_fails_clearly(tmp_path, change, message):
    path = tmp_path / "t.json"
    comparison.write_record(fake({0.1: [[1, 0.4, 0.3]]}), path)
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))
    with pytest.raises(ValueError, match=message):
        comparison.read_record(path)


def test_the_command_line_takes_only_the_problems_of_its_benchmark(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "training", "--problem", "kfac-ngd", "--device", "cpu"])
    assert "use one of digits, autoencoder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "curvature", "--problem", "digits", "--device", "cpu"])
    assert "does not apply to bench curvature." in capsys.readouterr().err


def test_tables_give_each_method_its_grid_best_point_and_quartiles_to_the_target():
    c = fake({0.1: [[1, 0.9, 0.6], [1, 0.9, 0.7]], 0.3: [[1, 0.4, 0.3], [1, 0.6, 0.4]]})
    assert c.reached("m") == 2 and c.at_best("m") == ((1.25, 1.5, 1.75), (1.25, 1.5, 1.75))
    grid = c.grid_table().splitlines()
    assert grid[1].split() == ["m", "0.1", "0.3", "0.3", "(edge)"]
    table = c.target_table()
    assert "to training loss 0.5" in table and table.splitlines()[-1].split()[:3] == [
        "m",
        "2/2",
        "2",
    ]
    assert max(len(line) for line in grid + table.splitlines()) <= 78
    unreached = fake({0.1: [[1, 0.9, 0.6]] * 2, 0.3: [[1, 0.8, 0.7]] * 2})
    assert unreached.reached("m") == 0 and unreached.at_best("m")[0] == (math.inf,) * 3
