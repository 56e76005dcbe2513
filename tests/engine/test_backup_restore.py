"""Backups from a running engine, a new cluster restored from one, and recovery of a cluster
that lost its quorum for good (in-process clusters, real data dirs)."""

from __future__ import annotations

import attrs
import pytest
import trio

import trio_raft
from tests.engine.kv import KV
from tests.engine.test_single_node import cfg
from trio_raft import errors
from trio_raft.engine.membership import to_persisted
from trio_raft.storage.backup import verify_backup
from trio_raft.storage.peers import PersistedPeer
from trio_raft.storage.restore import recover_cluster, restore_backup
from trio_raft.testing.cluster import open_memory_cluster, wait_replicated


def persisted(peers: list[trio_raft.Peer]) -> list[PersistedPeer]:
    return to_persisted([attrs.evolve(p, node_id=trio_raft.derive_node_id(p.id))
                         for p in peers])


async def test_export_is_a_consistent_point_in_time(tmp_path):
    async with trio_raft.open_engine(cfg(tmp_path, KV())) as engine:
        for i in range(20):
            await engine.propose(b"set k%d v%d" % (i, i))
        info = await engine.export_snapshot(tmp_path / "b.bak")
        assert info.index == engine.applied_index() and info.term == engine.status().term
        assert info.cluster_id == engine.cluster_id()
        assert [(m.id, m.address) for m in info.members] == [("n1", "127.0.0.1:7001")]
        await engine.propose(b"set later 1")  # not in the backup
    assert verify_backup(tmp_path / "b.bak") == info
    restored = tmp_path / "restored"
    restore_backup(tmp_path / "b.bak", restored / "n1",
                   persisted([trio_raft.Peer("n1", "127.0.0.1:7001")]))
    fsm = KV()
    async with trio_raft.open_engine(cfg(restored, fsm)) as engine:
        assert fsm.data == {f"k{i}": f"v{i}" for i in range(20)}
        assert engine.cluster_id() not in (None, info.cluster_id)  # a new cluster
        assert engine.applied_index() >= info.index
        await engine.propose(b"set new 1")
    # nothing applied yet: nothing to export
    async with trio_raft.open_engine(cfg(tmp_path / "j", KV(), bootstrap=False,
                                         peers=[trio_raft.Peer("n1", "127.0.0.1:7001"),
                                                trio_raft.Peer("n2", "127.0.0.1:7002")],
                                         join_as_learner=True)) as engine:
        with pytest.raises(errors.NothingToExportError):
            await engine.export_snapshot(tmp_path / "nothing.bak")


async def test_backup_under_load_restores_a_new_cluster(tmp_path, clock):
    acked: dict[str, tuple[int, str]] = {}
    async with open_memory_cluster(tmp_path / "old", 3, KV, snapshot_every=50) as c:
        leader = await c.wait_for_leader()
        old_id = leader.cluster_id()

        warmed, exported = trio.Event(), trio.Event()

        async def writer() -> None:
            i = 0
            while not exported.is_set() or i < len(before) + 50:  # writes go on after it
                res = await leader.propose(b"set w%d %d" % (i, i))
                acked[f"w{i}"] = (res.commit_index, str(i))
                i += 1
                if i == 120:
                    warmed.set()

        before: dict[str, tuple[int, str]] = {}
        async with trio.open_nursery() as n:
            n.start_soon(writer)
            await warmed.wait()
            before = dict(acked)
            await leader.linearizable_read()
            info = await leader.export_snapshot(tmp_path / "cluster.bak")
            exported.set()
        assert len(acked) >= len(before) + 50
        peers = persisted(c.peers())
    assert info.index >= max(i for i, _ in before.values())
    async with open_memory_cluster(tmp_path / "new", 3, KV, start=False) as c2:
        for name in ("n1", "n2", "n3"):
            restore_backup(tmp_path / "cluster.bak", c2.nodes[name].data_dir, peers)
            await c2.start(name)
        leader = await c2.wait_for_leader()
        res = await leader.propose(b"set fresh 1")
        await c2.wait_applied(res.commit_index)
        for h in c2.nodes.values():
            data = h.fsm.data
            assert all(data[k] == v for k, (_, v) in before.items())  # acknowledged before
            assert all(data.get(k) in (None, v) for k, (i, v) in acked.items() if i > info.index)
        with trio.fail_after(30):
            while len({h.engine.cluster_id() for h in c2.running() if h.engine}) != 1 or \
                    leader.cluster_id() is None:
                await trio.sleep(0.01)
        assert leader.cluster_id() != old_id


async def test_recover_a_survivor_after_losing_the_quorum(tmp_path, clock):
    names = ["n1", "n2", "n3", "n4", "n5"]
    async with open_memory_cluster(tmp_path, names, KV, snapshot_every=30) as c:
        leader = await c.wait_for_leader()
        last = 0
        for i in range(70):
            last = (await leader.propose(b"set k%d v%d" % (i, i))).commit_index
        await c.wait_applied(last)  # writes stopped, every node caught up
        survivor = "n1"
        for name in ("n3", "n4", "n5"):  # lost for good
            await c.stop(name)
        await c.stop("n2")
        await c.stop(survivor)
        expected = dict(c.nodes[survivor].fsm.data)
        p1 = next(p for p in c.peers() if p.id == survivor)
        info = recover_cluster(c.nodes[survivor].data_dir, persisted([p1]),
                               local_id=survivor)
        assert info.removed and info.last_index >= last
        engine = await c.start(survivor, bootstrap=False)
        with trio.fail_after(30):
            while engine.state() is not trio_raft.State.LEADER:
                await trio.sleep(0.01)
        assert c.nodes[survivor].fsm.data == expected  # every acknowledged write
        servers = (await engine.configuration()).servers
        assert [(s.id, s.suffrage) for s in servers] == [(survivor, "voter")]
        assert engine.cluster_id() == info.cluster_id
        res = await engine.propose(b"set after-recovery 1")  # a quorum of one
        # new members join as learners and are promoted
        for name in ("n6", "n7"):
            await c.start(name, bootstrap=False, peers=[survivor, name], join_as_learner=True)
            idx = await engine.add_learner(name, c.nodes[name].address)
            res = await engine.propose(b"set joined-%s 1" % name.encode())
            await wait_replicated(engine, name, res.commit_index)
            await engine.promote_learner(name, idx, res.commit_index)
        res = await engine.propose(b"set three-voters 1")
        await c.wait_applied(res.commit_index, ["n6", "n7"])
        assert c.nodes["n7"].fsm.data["k69"] == "v69"
        assert c.engine("n7").cluster_id() == info.cluster_id
