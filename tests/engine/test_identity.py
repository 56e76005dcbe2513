"""Cluster ids on running clusters (trio_raft/engine/identity.py) and membership travelling
with snapshots (a joining node needs one member's address)."""

from __future__ import annotations

import attrs
import pytest
import trio

import trio_raft
from tests.engine.kv import KV
from tests.engine.test_single_node import cfg
from trio_raft import errors
from trio_raft.core.messages import Entry
from trio_raft.engine.identity import encode_cluster_record
from trio_raft.storage.cluster_id import load_cluster_id
from trio_raft.storage.descriptor import decode_descriptor, encode_descriptor
from trio_raft.testing.cluster import open_memory_cluster, wait_replicated


async def wait_for(cond, timeout: float = 30.0) -> None:
    with trio.fail_after(timeout):
        while not cond():
            await trio.sleep(0.01)


async def test_several_voters_agree_on_one_cluster_id_through_the_log(tmp_path, clock):
    async with open_memory_cluster(tmp_path, 3, KV) as c:
        leader = await c.wait_for_leader()
        await wait_for(lambda: all(h.engine and h.engine.cluster_id() for h in c.running()))
        ids = {h.engine.cluster_id() for h in c.running() if h.engine}
        assert len(ids) == 1
        (cid,) = ids
        assert all(load_cluster_id(h.data_dir) == cid for h in c.nodes.values())
        assert sum(h.engine._loop.applier.identity.proposed for h in c.running()
                   if h.engine) >= 1
        # A second record (two leaders raced) changes nothing on any node.
        leader._loop.node.propose_entries([Entry(0, 0, data=encode_cluster_record("other"))])
        res = await leader.propose(b"set a 1")
        await c.wait_applied(res.commit_index)
        assert {h.engine.cluster_id() for h in c.running() if h.engine} == {cid}
        # Every snapshot written from now on carries it; a restart keeps it.
        name = c.leader_name()
        assert name is not None
        await c.close(name)
        engine = await c.start(name)
        assert engine.cluster_id() == cid and engine.open_report().cluster_id == cid


async def test_a_node_joins_a_grown_cluster_knowing_one_member(tmp_path, clock):
    """n4 joined after n5's --peers list was written; the snapshot n5 installs names every
    member with its address, so n5 reaches n2-n4 although it was only told about n1."""
    async with open_memory_cluster(tmp_path, ["n1", "n2", "n3"], KV, snapshot_every=20,
                                   snapshot_catchup_entries=5) as c:
        leader = await c.wait_for_leader()
        for i in range(10):
            await leader.propose(b"set k%d %d" % (i, i))
        await c.start("n4", bootstrap=False, peers=["n1", "n2", "n3", "n4"],
                      join_as_learner=True)
        idx = await leader.add_learner("n4", c.nodes["n4"].address)
        warm = await leader.propose(b"set warm 1")
        await wait_replicated(leader, "n4", warm.commit_index)
        await leader.promote_learner("n4", idx, warm.commit_index)
        for i in range(60):  # snapshots compact the log past everything n5 could replay
            await leader.propose(b"set k%d %d" % (i, i))
        assert leader.status().last_snapshot_index > idx
        joiner = await c.start("n5", bootstrap=False, peers=["n1", "n5"], join_as_learner=True)
        idx = await leader.add_learner("n5", c.nodes["n5"].address)
        res = await leader.propose(b"set joined 1")
        await c.wait_applied(res.commit_index, ["n5"])
        assert c.nodes["n5"].fsm.data == c.engine(c.leader_name() or "n1")._loop.cfg \
            .state_machine.data
        assert joiner.status().last_snapshot_index > 0
        servers = {s.id: s.address for s in (await joiner.configuration()).servers}
        assert servers == {n: c.nodes[n].address for n in ("n1", "n2", "n3", "n4", "n5")}
        assert joiner.cluster_id() == leader.cluster_id() is not None
        # it is a full member: promoted, it counts toward the quorum
        await wait_replicated(leader, "n5", res.commit_index)
        await leader.promote_learner("n5", idx, res.commit_index)
        await c.stop("n2")
        await c.stop("n3")
        res = await leader.propose(b"set with-n5 1")  # n1, n4, n5 are a quorum of five
        await c.wait_applied(res.commit_index, ["n5"])


async def test_a_snapshot_of_another_cluster_is_refused(tmp_path):
    async with trio_raft.open_engine(cfg(tmp_path / "a", KV())) as engine:
        await engine.propose(b"set a 1")
        await engine._loop.snapshots.write(None, None, compact=False)
        foreign = engine._loop.storage.snapshot()
    fsm = KV()
    with pytest.raises(errors.ClusterIdMismatchError, match="belongs to cluster"):
        async with trio_raft.open_engine(cfg(tmp_path / "b", fsm)) as engine:
            mine = engine.cluster_id()
            assert mine and mine != decode_descriptor(foreign.data).cluster_id
            big = attrs.evolve(foreign.metadata, index=engine.applied_index() + 100)
            await engine._loop.applier.install_snapshot(attrs.evolve(foreign, metadata=big))
    assert fsm.data == {}  # refused before anything was restored


def test_cluster_record_layout() -> None:
    record = encode_cluster_record("abc123")
    assert record == b"\x04TRCL\x01\x06abc123"
    with pytest.raises(errors.SnapshotDescriptorError):
        encode_cluster_record("not valid!")
    # a descriptor with an id survives re-encoding
    desc = decode_descriptor(encode_descriptor(decode_descriptor(encode_descriptor(
        attrs.evolve(_sample(), cluster_id="abc123")))))
    assert desc.cluster_id == "abc123"


def _sample():
    from trio_raft.storage.descriptor import SnapshotDescriptor
    from trio_raft.storage.fsm_snapshot import encode_snapshot_token

    return SnapshotDescriptor(encode_snapshot_token(1, 2))
