"""The benchmarks: baselines agree with natlib, tiny runs report and record, the recorded run
still loads, and ``python -m natlib bench`` honours ``--device`` and checks ``--out`` first."""

import json
import os
from pathlib import Path

import pytest
import torch

from natlib import bench, costmodel, curvature, problems, timing
from natlib.__main__ import main

RECORD = Path(__file__).parents[1] / "book" / "data" / "kfac_benchmark_cpu.json"


def test_vmap_einsum_baseline_computes_the_exact_fisher(float64):
    data = problems.digits(dtype=torch.float64)
    model = problems.mlp([64, 6, 10], seed=0)
    X = data.X_train[:30]
    expected = curvature.fisher(model, data.loss_fn, X)
    actual = bench.vmap_einsum_fisher(model, data.loss_fn, X)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=0)


def test_curvature_benchmark_reports_and_records(tmp_path, float64):
    result = bench.curvature_benchmark(
        sizes=(64, 5, 10), examples=40, naive_examples=4, min_run_time=0.01, device="cpu"
    )
    assert result.parameters == 64 * 5 + 5 + 5 * 10 + 10 and result.examples == 40
    assert result.max_relative_difference < 1e-12
    assert min(result.natlib_s, result.vmap_einsum_s, result.naive_s) > 0
    report = result.report()
    assert "PASS" in report and "extrapolated" in report and "float64" in report
    timing.write_json(result, tmp_path / "bench.json")
    record = json.loads((tmp_path / "bench.json").read_text())
    assert record["environment"]["torch"] == torch.__version__
    assert record["naive_examples"] == 4


def test_kfac_benchmark_reports_every_configuration():
    threads_before = torch.get_num_threads()
    result = bench.kfac_benchmark(rounds=1, widths=(8, 8, 4), batch=16, min_run_time=0.01)
    keys = [
        f"{kind} {T_cov}/{T_inv}"
        for kind in bench.KFAC_KINDS
        for T_cov, T_inv in bench.KFAC_SETTINGS
    ]
    assert list(result.step_s) == list(result.shares) == keys
    assert result.sgd_s > 0 and min(result.step_s.values()) > 0
    for share in result.shares.values():
        assert list(share) == [
            "factors",
            "eigendecompositions",
            "preconditioning",
            "forward/backward/update",
        ]
        assert sum(share.values()) == pytest.approx(1.0)
    assert set(result.factors_s) == set(bench.KFAC_KINDS)
    # the FLOP model: more work at T_cov/T_inv 1/10 than 10/100; the sampled backward makes
    # the Monte-Carlo Fisher cost more than the empirical one
    flops = result.flop_ratio
    assert list(flops) == keys and min(flops.values()) > 1.0
    assert flops["mc 1/10"] > flops["mc 10/100"] and flops["mc 1/10"] > flops["empirical 1/10"]
    report = result.report()
    assert report.count("target <=") == len(bench.KFAC_SETTINGS)  # verdicts for MC only
    assert result.environment["threads"] == 1 and torch.get_num_threads() == threads_before
    assert result.environment["clock"] == "CPU time of the process"
    assert "1 thread, CPU time of the process" in report
    assert report.count("FLOP model") == len(keys)


def test_kfac_benchmark_on_two_threads_reads_the_wall_clock():
    result = bench.kfac_benchmark(1, (8, 8, 4), 16, min_run_time=0.01, threads=2)
    assert result.environment["threads"] == 2 and result.environment["clock"] == "wall clock"


def test_the_recorded_kfac_run_still_loads():
    record = bench.KFACBenchmark(**json.loads(RECORD.read_text()))
    assert "K-FAC mc        T_cov/T_inv 10/100" in record.report()
    assert set(record.shares["mc 10/100"]) == set(bench.SHARE_LABELS.values())
    for key, ratio in record.flop_ratio.items():  # the square-layer model, biases aside
        kind, periods = key.split()
        T_cov, T_inv = map(int, periods.split("/"))
        square = costmodel.step_cost(512, record.batch, 4, T_cov, T_inv, kind=kind)
        assert ratio == pytest.approx(square.overhead, rel=0.01)


@pytest.mark.parametrize("name", ["curvature", "kfac"])
def test_cli_passes_the_device(name, monkeypatch, capsys, tmp_path):
    asked = []
    fake = bench.KFACBenchmark((4, 4), 2, "float32", 1, 1.0, {}, {}, {}, {})
    monkeypatch.setattr(
        bench, f"{name}_benchmark", lambda device=None, **_: asked.append(device) or fake
    )
    out = tmp_path / "out.json"
    main(["bench", name, "--device", "cpu", "--out", str(out)])
    assert asked == ["cpu"] and "K-FAC step / SGD step" in capsys.readouterr().out
    assert bench.KFACBenchmark(**json.loads(out.read_text())) == bench.KFACBenchmark(
        [4, 4], 2, "float32", 1, 1.0, {}, {}, {}, {}
    )


def test_cli_checks_out_before_running(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(bench, "kfac_benchmark", lambda device=None, **_: pytest.fail("it ran"))
    blocker = tmp_path / "file"
    blocker.write_text("")
    for out, reason in [(tmp_path, "is a folder"), (blocker / "x.json", "is not a folder")]:
        with pytest.raises(SystemExit):
            main(["bench", "kfac", "--out", str(out)])
        assert reason in capsys.readouterr().err
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as if not root, read-only
    with pytest.raises(SystemExit):
        main(["bench", "kfac", "--out", str(tmp_path / "sub" / "x.json")])
    assert f"the folder {tmp_path} is not writable" in capsys.readouterr().err


def test_cli_refuses_a_missing_gpu(monkeypatch, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    monkeypatch.setattr(bench, "curvature_benchmark", lambda device=None: pytest.fail("it ran"))
    with pytest.raises(SystemExit):
        main(["bench", "curvature", "--device", "cuda"])
    assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["cnn", "transformer"])
def test_architecture_benchmark_reports(name, tmp_path):
    sizes = {"cnn": {"channels": (2, 3)}, "transformer": {"context": 8, "width": 8, "layers": 1}}
    threads = torch.get_num_threads()
    result = bench.architecture_benchmark(name, rounds=1, batch=4, device="cpu", **sizes[name])
    assert set(result.step_s) == {"expand", "reduce"} and result.sgd_s > 0
    report = result.report()
    assert "K-FAC-expand" in report and "K-FAC-reduce" in report and "x SGD" in report
    assert result.environment["threads"] == 1 and result.environment["clock"].startswith("CPU")
    assert "1 thread" in report and torch.get_num_threads() == threads
    timing.write_json(result, tmp_path / "bench.json")
    assert json.loads((tmp_path / "bench.json").read_text())["model"] == name
