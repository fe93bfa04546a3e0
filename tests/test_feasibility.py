"""The feasibility benchmark: memory counts, the largest model that fits, and the bench
command on a tiny setting."""

import json

import pytest

from natlib import feasibility
from natlib.__main__ import main


def test_parameter_count_matches_the_model():
    for width in (3, 17):
        model = feasibility.timing.random_mlp_problem(
            feasibility.sizes(width), 2, "cross_entropy", "cpu"
        )[0]
        assert feasibility.parameters(width) == sum(p.numel() for p in model.parameters())


def test_dense_newton_memory_is_quadratic_and_the_rest_linear():
    w = 1000
    p = feasibility.parameters(w)
    assert feasibility.memory_bytes("dense Newton", w) > 4 * p * p
    for method in ("Hessian-free", "K-FAC", "SGD"):
        assert feasibility.memory_bytes(method, w) < 100 * 4 * p
    with pytest.raises(ValueError, match="not supported"):
        feasibility.memory_bytes("BFGS", w)


def test_largest_fitting_model():
    p = feasibility.largest_fitting("dense Newton")
    assert 7e4 < p < 7.8e4  # 4 P^2 bytes = 24 GB at P = 77,460
    assert feasibility.largest_fitting("SGD") > 1e9


def test_bench_newton_command_records_a_tiny_run(monkeypatch, tmp_path, capsys):
    measure = feasibility.measure

    def tiny(device=None):
        return measure(
            dense_widths=(3, 4, 5),
            widths=(3, 4),
            batch=4,
            device=device,
            min_run_time=0.001,
            digits=False,
        )

    monkeypatch.setattr(feasibility, "measure", tiny)
    out = tmp_path / "newton-cpu.json"
    main(["bench", "newton", "--device", "cpu", "--out", str(out)])
    assert "dense Newton P =" in capsys.readouterr().out
    record = feasibility.read_record(out)
    assert [r.width for r in record.dense] == [3, 4, 5]
    assert all(r.form_s > 0 and r.solve_s > 0 for r in record.dense)
    assert all(r.kfac_s > 0 and r.ggn_product_s > 0 for r in record.matrix_free)
    assert json.loads(out.read_text())["schema"] == feasibility.SCHEMA


def test_a_foreign_record_is_refused(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{"schema": "other"}')
    with pytest.raises(ValueError, match="not a natlib.feasibility"):
        feasibility.read_record(path)
