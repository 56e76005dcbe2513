"""bench/plot.py groups the bench scripts' JSON lines into latency-throughput curves (the
drawing itself needs matplotlib, the optional ``bench`` extra, and is not exercised here)."""

from __future__ import annotations

import json

from bench.plot import Point, curves, read_rows, system_of


def test_rows_of_each_bench_script_become_curves_sorted_by_concurrency(tmp_path):
    rows = [
        {"event": "machine", "cpus": 2},
        {"bench": "engine_propose", "concurrency": 64, "proposals_per_s": 9000.0,
         "p50_ms": 7.0, "p99_ms": 20.0},
        {"bench": "engine_propose", "concurrency": 1, "proposals_per_s": 300.0,
         "p50_ms": 3.0, "p99_ms": 6.0},
        {"bench": "vs_pysyncobj", "system": "kvnode", "client": "grpcio", "rpc": "stream",
         "concurrency": 1, "ops_per_s": 200.0, "p50_ms": 4.0, "p99_ms": 9.0},
        {"bench": "vs_pysyncobj", "system": "null", "client": "grpcio", "rpc": "stream",
         "concurrency": 1, "ops_per_s": 2000.0, "p50_ms": 0.4, "p99_ms": 0.9},
        {"bench": "read", "mode": "LINEARIZABLE", "target": "all", "concurrency": 32,
         "ops_per_s": 700.0, "p50_ms": 40.0, "p99_ms": 90.0, "errors": 0},
        {"bench": "read_check", "concurrency": 1},  # not a latency-throughput row
    ]
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n| table |\n")
    got = curves(read_rows([str(path)]))
    assert got == {
        "engine": [Point(1, 300.0, 3.0, 6.0), Point(64, 9000.0, 7.0, 20.0)],
        "kvnode stream (grpcio)": [Point(1, 200.0, 4.0, 9.0)],
        "null (grpcio)": [Point(1, 2000.0, 0.4, 0.9)],
        "LINEARIZABLE all": [Point(32, 700.0, 40.0, 90.0)],
    }
    assert system_of({"bench": "engine_propose", "system": "before"}) == "before"


def test_a_level_run_several_times_keeps_the_median_run():
    rows = [{"bench": "engine_propose", "concurrency": 1, "proposals_per_s": ops,
             "p50_ms": p50, "p99_ms": 1.0} for ops, p50 in ((100.0, 9.0), (300.0, 3.0),
                                                           (200.0, 5.0))]
    assert curves(rows) == {"engine": [Point(1, 200.0, 5.0, 1.0)]}
