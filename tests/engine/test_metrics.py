"""trio_raft.metrics: one collector per engine in a registry the caller chooses; several
engines share it without colliding; values follow the engines."""

from __future__ import annotations

import sys

import pytest
import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import trio_raft
from tests.engine.kv import KV
from trio_raft import errors
from trio_raft.metrics import RaftMetrics
from trio_raft.testing.cluster import open_memory_cluster


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(got, name: str, **labels: str) -> float:
    return got[(name, tuple(sorted(labels.items())))]


async def test_engines_of_one_process_share_a_registry(tmp_path, clock):
    registry = CollectorRegistry()
    metrics = RaftMetrics(registry)
    nodes = {n: metrics.engine(n) for n in ("n1", "n2", "n3")}
    with pytest.raises(ValueError, match="already registered"):
        metrics.engine("n1")
    with pytest.raises(ValueError):  # a second set of the same metrics in one registry
        RaftMetrics(registry)
    async with open_memory_cluster(tmp_path, 3, KV, start=False, snapshot_every=10) as c:
        for n in ("n1", "n2", "n3"):
            await c.start(n, observer=nodes[n])
            nodes[n].attach(c.engine(n))
        leader = await c.wait_for_leader()
        lname = c.leader_name()
        assert lname is not None
        for i in range(25):
            res = await leader.propose(b"set k%d v" % i)
        await c.wait_applied(res.commit_index)
        for em in nodes.values():
            em.refresh()
        got = samples(registry)
        assert value(got, "trio_raft_is_leader", node=lname) == 1
        assert value(got, "trio_raft_state", node=lname, state="leader") == 1
        follower = next(n for n in nodes if n != lname)
        assert value(got, "trio_raft_state", node=follower, state="follower") == 1
        assert value(got, "trio_raft_last_leader_contact_seconds", node=follower) >= 0
        for n in nodes:
            assert value(got, "trio_raft_applied_index", node=n) >= res.commit_index
            assert value(got, "trio_raft_leader_changes_total", node=n) >= 1
            assert value(got, "trio_raft_snapshots_total", node=n, event="written") >= 2
            assert value(got, "trio_raft_wal_sync_seconds_count", node=n) >= 1
            assert value(got, "trio_raft_open_snapshot_restored", node=n) == 0  # bootstrap
        assert value(got, "trio_raft_proposal_seconds_count", node=lname) == 25
        assert value(got, "trio_raft_peer_match_index", node=lname, peer=follower) >= \
            res.commit_index - 1
        assert ("trio_raft_peer_lag_entries", (("node", lname), ("peer", follower))) in got
        assert ("trio_raft_peer_match_index", (("node", follower), ("peer", lname))) not in got
        # a follower brought back from nothing receives and installs a snapshot
        await c.stop(follower)
        c.wipe(follower)
        metrics.remove(follower)
        again = metrics.engine(follower)
        await leader.remove_server(follower)
        await c.start(follower, bootstrap=False, observer=again)
        again.attach(c.engine(follower))
        await leader.add_learner(follower, c.nodes[follower].address)
        res = await leader.propose(b"set after 1")
        await c.wait_applied(res.commit_index, [follower])
        nodes[lname].refresh()
        again.refresh()
        got = samples(registry)
        assert value(got, "trio_raft_snapshots_total", node=follower, event="received") >= 1
        assert value(got, "trio_raft_snapshots_total", node=follower, event="installed") >= 1
        assert value(got, "trio_raft_snapshots_total", node=lname, event="sent") >= 1
    metrics.close()
    assert generate_latest(registry) == b""


async def test_separate_registries_and_a_run_task(tmp_path):
    from tests.engine.test_single_node import cfg

    regs = [CollectorRegistry(), CollectorRegistry()]
    ems = [RaftMetrics(r).engine("same-name") for r in regs]  # no collision across registries
    async with trio_raft.open_engine(cfg(tmp_path, KV(), observer=ems[0])) as engine, \
            trio.open_nursery() as n:
        n.start_soon(ems[0].run, engine, 0.01)
        await engine.propose(b"set a 1")
        with trio.fail_after(5):
            while ems[0].values.get("applied_index", 0) < engine.applied_index():
                await trio.sleep(0.01)
        n.cancel_scope.cancel()
    got = samples(regs[0])
    assert value(got, "trio_raft_applied_index", node="same-name") >= 2
    assert value(got, "trio_raft_open_seconds", node="same-name") > 0
    other = samples(regs[1])  # an engine never attached exports no state
    assert not [k for k in other if k[0] == "trio_raft_applied_index"]


def test_the_processs_garbage_collections_are_counted_and_timed():
    import gc

    reg = CollectorRegistry()
    RaftMetrics(reg)
    before = samples(reg)
    gc.collect()  # a full collection: generation 2
    gc.collect(0)
    after = samples(reg)
    for generation in ("0", "2"):
        assert value(after, "trio_raft_gc_collections_total", generation=generation) >= (
            value(before, "trio_raft_gc_collections_total", generation=generation) + 1)
    assert value(after, "trio_raft_gc_seconds_total", generation="2") > value(
        before, "trio_raft_gc_seconds_total", generation="2")
    assert [value(after, "trio_raft_gc_threshold", generation=str(g)) for g in range(3)] == [
        float(t) for t in gc.get_threshold()]
    RaftMetrics(CollectorRegistry())  # the hook is installed once per process
    from trio_raft.gctune import _Timer

    assert sum(isinstance(cb, _Timer) for cb in gc.callbacks) == 1


def test_a_clear_error_without_prometheus_client(monkeypatch):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(errors.MetricsUnavailableError, match="pip install"):
        RaftMetrics()
    assert issubclass(errors.MetricsUnavailableError, ImportError)


async def test_a_failing_observer_never_stops_the_engine(tmp_path, caplog):
    from tests.engine.test_single_node import cfg

    class Broken(trio_raft.NullObserver):
        def proposal(self, seconds: float) -> None:
            raise RuntimeError("metrics backend down")

    async with trio_raft.open_engine(cfg(tmp_path, KV(), observer=Broken())) as engine:
        await engine.propose(b"set a 1")
        await engine.propose(b"set b 2")
    assert "engine observer failed" in caplog.text
