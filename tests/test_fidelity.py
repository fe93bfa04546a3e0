"""natlib.fidelity: the fidelity/cost table against the exact Fisher, the wide-network cosines
against conjugate gradients, and the record ``python -m natlib bench approximations --out``
writes and the chapter reads."""

import math

import pytest
import torch

from natlib import curvature, fidelity, problems
from natlib.__main__ import main
from natlib.exact import Fisher

SMALL = (64, 5, 4, 10)


def tiny_benchmark(**kwargs) -> fidelity.ApproximationBenchmark:
    options = dict(sizes=SMALL, examples=12, adam_steps=2, wide_sizes=(64, 6, 10))
    return fidelity.approximations_benchmark(**(options | kwargs), min_run_time=0.0)


def test_rows_against_the_exact_fisher(float64):
    result = tiny_benchmark()
    names = [row.method for row in result.rows]
    assert names[0] == "exact Fisher (dense)" and len(names) == 10
    rows = {row.method: row for row in result.rows}
    exact = rows["exact Fisher (dense)"]
    assert exact.relative_error < 1e-12 and exact.cosine == pytest.approx(1.0, abs=1e-12)
    assert rows["block-diagonal Fisher"].block_error < 1e-12
    assert rows["EK-FAC"].block_error <= rows["K-FAC (exact damping)"].block_error
    assert all(row.memory_bytes > 0 and row.solve_s > 0 for row in result.rows)
    report = result.report()
    assert all(name in report for name in names) and "rel. error" in report
    assert "conjugate gradients" in report and result.environment["clock"]


def test_untimed_rows_are_nan_and_equal_the_timed_fidelity(float64):
    model, data = fidelity.trained_digits_mlp(SMALL, adam_steps=2)
    X, y = data.X_train[:12], data.y_train[:12]
    rows = fidelity.approximation_rows(model, data.loss_fn, X, y)
    timed = tiny_benchmark(wide_sizes=None).rows
    assert all(math.isnan(r.update_s) and math.isnan(r.solve_s) for r in rows)
    for r, t in zip(rows, timed):
        assert r.cosine == pytest.approx(t.cosine, rel=1e-9)
        assert r.relative_error == pytest.approx(t.relative_error, rel=1e-9)


def test_trained_network_is_chapter_threes_recipe(float64):
    model, data = fidelity.trained_digits_mlp(SMALL, adam_steps=3)
    reference = problems.mlp(list(SMALL), seed=0)
    assert not torch.equal(model[0].weight, reference[0].weight)
    untrained, _ = fidelity.trained_digits_mlp(SMALL, adam_steps=0)
    assert torch.equal(untrained[0].weight, reference[0].weight)


def test_wide_cosines_use_the_natural_gradient_by_conjugate_gradients(float64):
    model, data = fidelity.trained_digits_mlp((64, 6, 10), adam_steps=0)
    X, y = data.X_train[:20], data.y_train[:20]
    rows, iterations = fidelity.wide_cosines(model, data.loss_fn, X, y, damping=1e-2)
    F = Fisher.from_batch(model, data.loss_fn, X, y).to_dense()
    g = curvature.flat_gradient(model, data.loss_fn, X, y)
    dense = torch.linalg.solve(F + 1e-2 * torch.eye(len(g)), g)
    kfac = next(r for r in rows if r.method == "K-FAC (exact damping)")
    from natlib.kfac import KFACApproximation

    direction = KFACApproximation.from_batch(model, data.loss_fn, X, y, damping_mode="exact").solve(
        g, 1e-2
    )
    expected = (direction @ dense / (direction.norm() * dense.norm())).item()
    assert kfac.cosine == pytest.approx(expected, abs=1e-8)
    assert [r.method for r in rows] == list(fidelity.WIDE_METHODS) and 0 < iterations <= len(g)


def test_cli_writes_a_record_that_reads_back(monkeypatch, capsys, tmp_path, float64):
    result = tiny_benchmark()
    monkeypatch.setattr(fidelity, "approximations_benchmark", lambda device=None: result)
    out = tmp_path / "approximations.json"
    main(["bench", "approximations", "--device", "cpu", "--out", str(out)])
    assert "rel. error" in capsys.readouterr().out
    assert fidelity.read_record(out) == result
