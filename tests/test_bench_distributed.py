"""``python -m natlib bench distributed``: a tiny live run and the committed record."""

from __future__ import annotations

import json

import pytest

from natlib import bench_distributed, distributed
from natlib.notebooks import record_path
from natlib.timing import write_json


def test_a_tiny_run_counts_the_traffic_it_predicts(tmp_path):
    record = bench_distributed.benchmark("cpu", widths=(8,), repeats=1)
    (row,) = record.widths
    assert row.reduce_measured == row.reduce_analytic == 1 + 4 * (45 + 36)  # d_A 9, d_G 8
    assert row.broadcast_measured == row.broadcast_analytic == 2 + 4 * (9 + 81 + 8 + 64)
    assert row.owners == [0, 1, 0, 1] and set(row.refresh_s) == {"1", "2"}
    assert "speed-up" in record.report()
    write_json(record, tmp_path / "distributed-cpu.json")
    saved = json.loads((tmp_path / "distributed-cpu.json").read_text())
    assert saved["schema"] == bench_distributed.SCHEMA
    assert saved["environment"]["readers"] == bench_distributed.READERS


def test_the_committed_record_matches_the_analytic_traffic():
    saved = json.loads(record_path("distributed-cpu.json").read_text())
    assert saved["schema"] == bench_distributed.SCHEMA
    assert saved["environment"]["processes"] == [1, 2]
    assert [row["width"] for row in saved["widths"]] == list(bench_distributed.WIDTHS)
    for row in saved["widths"]:
        d = row["width"]
        layers = bench_distributed.DEPTH
        assert row["reduce_measured"] == row["reduce_analytic"]
        assert row["reduce_analytic"] == 1 + layers * (
            distributed.triangle(d + 1) + distributed.triangle(d)
        )
        assert row["broadcast_measured"] == row["broadcast_analytic"]
        assert row["refresh_s"]["1"] > 0 and row["refresh_s"]["2"] > 0


def test_the_committed_record_reads_back_and_names_a_bad_file(tmp_path):
    record = bench_distributed.read_record(record_path("distributed-cpu.json"))
    assert [w.width for w in record.widths] == list(bench_distributed.WIDTHS)
    assert all(w.speedup(cpu=True) > 0 for w in record.widths)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": "other"}))
    with pytest.raises(ValueError, match="is not a natlib.distributed/1 record"):
        bench_distributed.read_record(bad)
    bad.write_text(json.dumps({"schema": bench_distributed.SCHEMA, "widths": []}))
    with pytest.raises(ValueError, match="not a complete"):
        bench_distributed.read_record(bad)


def test_two_processes_on_cuda_need_two_gpus(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(RuntimeError, match="two GPUs"):
        bench_distributed.benchmark("cuda")
