"""bench/machine_floor.py measures with real processes (started with ``spawn``), sockets and
fsync; these runs are tiny and check what each probe hands back, not how fast the machine is."""

from __future__ import annotations

import multiprocessing

from bench.machine_floor import busy_loops, in_children, summary, wake_round_trips


def test_a_wake_probe_times_every_round_trip_and_reaps_its_child():
    for spin in (False, True):
        samples = wake_round_trips(30, spin)
        assert len(samples) == 30
        assert all(s > 0 for s in samples)
    assert multiprocessing.active_children() == []  # the echoing children ended


def test_fsync_probes_in_several_processes_return_each_ones_samples_and_clean_up(tmp_path):
    per_process = in_children(3, str(tmp_path), 25)
    assert len(per_process) == 3
    for samples in per_process:
        assert len(samples) == 25
        assert all(s > 0 for s in samples)
    assert multiprocessing.active_children() == []
    # every child removed its file
    assert list(tmp_path.iterdir()) == []


def test_summary_gives_the_median_and_the_99th_percentile_in_milliseconds():
    samples = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    got = summary(samples)
    assert got["p50_ms"] == 50.5
    assert 99.0 <= got["p99_ms"] <= 100.0


def test_busy_loops_are_killed_and_reaped_when_the_block_ends():
    with busy_loops(2):
        assert len(multiprocessing.active_children()) == 2
    assert multiprocessing.active_children() == []
