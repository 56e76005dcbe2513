"""The per-stage timing of writes and reads (trio_raft/engine/stages.py): who is told, what each
node reports over real gRPC with real fsync, and the pieces the timing is built from."""

from __future__ import annotations

import logging
import threading
import time

import pytest
import trio
from prometheus_client import CollectorRegistry

import trio_raft
from tests.engine.kv import KV
from tests.engine.test_grpc_cluster import node_config, run_node, wait_leader
from tests.engine.test_metrics import samples, value
from trio_raft.engine import stages
from trio_raft.engine.diskio import DiskRunner
from trio_raft.engine.observer import SafeObserver, safe_observer
from trio_raft.metrics import RaftMetrics
from trio_raft.testing.net import free_loopback_ports


class Recorder(trio_raft.NullObserver):
    def __init__(self) -> None:
        self.events: list[tuple[str, float, float]] = []

    def stage(self, stage: str, seconds: float, ended: float) -> None:
        self.events.append((stage, seconds, ended))

    def names(self) -> set[str]:
        return {e[0] for e in self.events}


def test_only_an_observer_with_its_own_stage_method_is_told():
    class OnlyProposals:
        def wal_write(self, seconds: float) -> None:
            pass

        def proposal(self, seconds: float) -> None:
            pass

    assert stages.stage_sink(safe_observer(None)) is None
    assert stages.stage_sink(trio_raft.NullObserver()) is None
    assert stages.stage_sink(safe_observer(OnlyProposals())) is None
    rec = Recorder()
    sink = stages.stage_sink(safe_observer(rec))
    assert sink is not None
    sink(stages.WAL, 0.25, 7.0)
    assert rec.events == [("wal", 0.25, 7.0)]


def test_a_failing_stage_observer_is_logged_not_raised(caplog):
    class Broken(Recorder):
        def stage(self, stage: str, seconds: float, ended: float) -> None:
            raise RuntimeError("histogram backend down")

    sink = stages.stage_sink(SafeObserver(Broken()))
    assert sink is not None
    with caplog.at_level(logging.ERROR):
        sink(stages.SEND, 0.001, 1.0)
    assert "engine observer failed (stage)" in caplog.text


def test_replication_clock_times_each_answer_from_the_append_it_answers():
    clock = stages.ReplicationClock()
    clock.written(2, 5, 10.0)
    clock.written(2, 7, 11.0)
    clock.written(3, 5, 10.5)
    assert clock.acked(2, 4, 12.0) is None  # answers nothing that was timed
    assert clock.acked(2, 7, 12.0) == pytest.approx(1.0)  # the newest append it covers
    assert clock.acked(2, 7, 13.0) is None  # each append is timed once
    assert clock.acked(3, 6, 11.0) == pytest.approx(0.5)
    assert clock.acked(9, 1, 1.0) is None
    for i in range(stages.ReplicationClock.KEEP * 2):
        clock.written(4, i, float(i))
    assert clock.acked(4, 0, 500.0) is None  # bounded: the oldest were forgotten
    clock.forget(4)
    assert clock.acked(4, 10**6, 1.0) is None


class TickClock:
    """A clock that moves 1 ms each time it is read, and by what ``work`` spends."""

    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        self.t += 0.001
        return self.t


@pytest.mark.parametrize("blocking", [True, False])
async def test_run_timed_gives_ordered_instants(blocking: bool):
    clock = TickClock()
    threads: list[str] = []

    def work() -> int:
        clock.t += 0.002  # the work's own duration
        threads.append(threading.current_thread().name)
        return 42

    result, t = await DiskRunner(blocking, clock=clock).run_timed(work)
    assert result == 42
    assert t.called < t.began < t.ended <= t.resumed
    assert t.inside == pytest.approx(0.003)  # the work, and the clock read that ends it
    assert t.resumed - t.called == pytest.approx(t.inside + t.handoff)
    if blocking:
        assert t.resumed == t.ended  # no thread: nothing between the call's end and the caller
        assert t.handoff == pytest.approx(0.001)  # the read when the call began
        assert threads == [threading.current_thread().name]
    else:
        assert t.handoff == pytest.approx(0.002)  # the reads on each side of the hand-off
        assert threads != [threading.current_thread().name]  # a worker thread ran it


LEADER_STAGES = {"queue", "wal", "wal_handoff", "send", "send_handoff", "receive",
                 "receive_handoff", "replicate", "commit", "apply", "answer", "read_round"}
FOLLOWER_STAGES = {"receive", "receive_handoff", "wal", "wal_handoff", "send", "send_handoff",
                   "apply"}


async def test_every_node_reports_its_stages_over_grpc(tmp_path):
    names = ["n1", "n2", "n3"]
    ports = free_loopback_ports(3)
    peers = [trio_raft.Peer(n, f"127.0.0.1:{p}") for n, p in zip(names, ports)]
    recorders = {n: Recorder() for n in names}
    engines: dict[str, trio_raft.Engine] = {}
    stop = trio.Event()
    began = time.perf_counter()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for n in names:
                await nursery.start(run_node, node_config(tmp_path, n, peers, KV(),
                                                          observer=recorders[n]), engines, stop)
            lname = await wait_leader(engines)
            leader = engines[lname]
            for i in range(20):  # one at a time: every write is timed
                res = await leader.propose(b"set k%d v" % i)
            await leader.linearizable_read()
            with trio.fail_after(20):
                while min(e.applied_index() for e in engines.values()) < res.commit_index:
                    await trio.sleep(0.01)
            stop.set()
    ended = time.perf_counter()
    lrec = recorders[lname]
    assert lrec.names() >= LEADER_STAGES
    for n in names:
        if n != lname:
            assert recorders[n].names() >= FOLLOWER_STAGES, n
    for rec in recorders.values():
        assert rec.names() <= set(stages.STAGES)
        for stage, seconds, at in rec.events:
            assert seconds >= 0, stage
            assert began <= at - seconds and at <= ended, stage
        # send and send_handoff are reported together, for the same message: the hand-off is
        # the end of the whole send
        pairs = [(a, b) for a, b in zip(rec.events, rec.events[1:])
                 if a[0] == "send" and b[0] == "send_handoff"]
        assert pairs
        for send, handoff in pairs:
            assert send[2] == handoff[2] and send[1] >= handoff[1]
    # every write one at a time: the leader answered each proposer once, and each follower's
    # answer to an append is timed from the instant that append was written
    assert sum(1 for e in lrec.events if e[0] == "answer") >= 20
    assert sum(1 for e in lrec.events if e[0] == "replicate") >= 20


async def test_stage_histogram_in_the_metrics(tmp_path):
    from tests.engine.test_single_node import cfg

    registry = CollectorRegistry()
    node = RaftMetrics(registry).engine("n1")
    async with trio_raft.open_engine(cfg(tmp_path, KV(), observer=node)) as engine:
        for i in range(3):
            await engine.propose(b"set k%d v" % i)
        await engine.linearizable_read()
    got = samples(registry)
    for stage in ("queue", "wal", "wal_handoff", "apply", "answer", "commit"):
        assert value(got, "trio_raft_stage_seconds_count", node="n1", stage=stage) >= 1, stage
    assert value(got, "trio_raft_stage_seconds_count", node="n1", stage="replicate") == 0
