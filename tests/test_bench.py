"""The curvature benchmark's baselines agree with natlib, and the harness reports them."""

import json

import pytest
import torch

from natlib import bench, curvature, problems

pytestmark = pytest.mark.usefixtures("float64")


def test_baselines_compute_the_exact_fisher():
    data = problems.digits(dtype=torch.float64)
    model = problems.mlp([64, 6, 10], seed=0)
    X = data.X_train[:30]
    expected = curvature.fisher(model, data.loss_fn, X)
    for baseline in (bench.vmap_einsum_fisher, bench.naive_fisher):
        torch.testing.assert_close(baseline(model, data.loss_fn, X), expected, rtol=1e-10, atol=0)


def test_curvature_benchmark_reports_and_records(tmp_path):
    result = bench.curvature_benchmark(
        sizes=(64, 5, 10), examples=40, naive_examples=4, min_run_time=0.01
    )
    assert result.parameters == 64 * 5 + 5 + 5 * 10 + 10 and result.examples == 40
    assert result.max_relative_difference < 1e-12
    assert min(result.natlib_s, result.vmap_einsum_s, result.naive_s) > 0
    report = result.report()
    assert "PASS" in report and "extrapolated" in report and "float64" in report
    bench.write_json(result, tmp_path / "bench.json")
    record = json.loads((tmp_path / "bench.json").read_text())
    assert record["environment"]["torch"] == torch.__version__
    assert record["naive_examples"] == 4
