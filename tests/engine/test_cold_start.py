"""The cold-start skip (trio_raft/engine/coldstart.py): a state machine whose durable store
already holds the newest snapshot is not restored, and only the entries above its index are
replayed into it; every other case restores as before."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

import trio_raft
from tests.engine.durable_kv import DurableKV
from tests.engine.kv import KV
from tests.engine.test_single_node import cfg
from trio_raft import errors
from trio_raft.storage.fsm_snapshot import fsm_snapshot_path
from trio_raft.testing.cluster import open_memory_cluster, wait_replicated


async def fill(engine: trio_raft.Engine, n: int, start: int = 0) -> int:
    index = 0
    for i in range(start, start + n):
        index = (await engine.propose(b"set k%d v%d" % (i, i))).commit_index
    return index


async def settled_snapshot_index(engine: trio_raft.Engine, every: int) -> int:
    """The newest snapshot's index once none is due or being written.

    Periodic snapshots are written in the background (trio_raft/engine/snapshots.py): one
    may still be landing when the proposals that triggered it have returned. With nothing
    more proposed, a snapshot is due or in flight exactly while the applied index is
    ``every`` or more past the newest snapshot."""
    with trio.fail_after(10):
        while engine.applied_index() - engine.status().last_snapshot_index >= every:
            await trio.sleep(0.01)
    return engine.status().last_snapshot_index


async def test_a_store_that_holds_the_snapshot_is_not_restored(tmp_path):
    store = str(tmp_path / "store.json")
    fsm = DurableKV(store)
    async with trio_raft.open_engine(cfg(tmp_path, fsm, snapshot_every=10,
                                         snapshot_catchup_entries=2)) as engine:
        report = engine.open_report()
        assert report.kind == "bootstrap" and not report.skipped
        cluster_id = engine.cluster_id()
        assert cluster_id and report.cluster_id == cluster_id
        last = await fill(engine, 35)
        snap_index = await settled_snapshot_index(engine, 10)
        assert snap_index >= 30
    assert fsm.cluster_id == cluster_id and fsm.index == last
    # The payload is not even read: damage it, the skip still opens.
    path = fsm_snapshot_path(tmp_path / "n1" / "fsm-snap", snap_index)
    raw = bytearray(Path(path).read_bytes())
    raw[-1] ^= 0xFF  # the footer: its CRC no longer matches the token's
    Path(path).write_bytes(raw)
    again = DurableKV(store)
    async with trio_raft.open_engine(cfg(tmp_path, again)) as engine:
        report = engine.open_report()
        assert report.skipped and not report.restored
        assert report.snapshot_index == snap_index and report.store_index == last
        assert report.entries_replayed == 0
        assert report.entries_skipped == last - snap_index
        assert report.seconds > 0
        assert engine.applied_index() >= last
        assert "restore" not in again.names() and "apply" not in again.names()
        # set_cluster_id comes first, before the engine asks what the store holds
        assert again.calls[:2] == [("set_cluster_id", cluster_id), ("durable_state", None)]
        assert again.data["k34"] == "v34"
        res = await engine.propose(b"set after 1")
        assert again.index == res.commit_index and again.calls[-1] == ("apply", again.index)
    # Without the store the damaged payload is found when it is used (restored).
    with pytest.raises(errors.FSMSnapshotTokenCRCError):
        async with trio_raft.open_engine(cfg(tmp_path, KV())):
            pass


async def test_only_entries_above_the_store_are_replayed(tmp_path):
    store = str(tmp_path / "store.json")
    fsm = DurableKV(store)
    async with trio_raft.open_engine(cfg(tmp_path, fsm, snapshot_every=10,
                                         snapshot_catchup_entries=2)) as engine:
        await fill(engine, 25)
        stale = Path(store).read_text()  # the store as of here (a crash lost what follows)
        stale_index = fsm.index
        last = await fill(engine, 3, start=100)
        snap_index = await settled_snapshot_index(engine, 10)
    assert stale_index >= snap_index  # the snapshot is older than the store
    with open(store, "w") as f:
        f.write(stale)
    again = DurableKV(store)
    async with trio_raft.open_engine(cfg(tmp_path, again)) as engine:
        report = engine.open_report()
        assert report.skipped and report.store_index == stale_index
        applied = [i for name, i in again.calls if name == "apply"]
        assert applied == list(range(stale_index + 1, last + 1))
        assert report.entries_replayed == last - stale_index
        assert again.data["k102"] == "v102" and again.index == last


async def test_a_store_behind_the_snapshot_or_of_another_cluster_is_restored(tmp_path):
    store = str(tmp_path / "store.json")
    fsm = DurableKV(store)
    async with trio_raft.open_engine(cfg(tmp_path, fsm, snapshot_every=10,
                                         snapshot_catchup_entries=2)) as engine:
        await fill(engine, 2)
        early = Path(store).read_text()
        await fill(engine, 30, start=2)
        snap_index = await settled_snapshot_index(engine, 10)
        cluster_id = engine.cluster_id()
    for content in (early, None, "foreign"):
        if content is None:
            os.unlink(store)  # nothing durable: restore
        elif content == "foreign":
            again = DurableKV(store)
            again.cluster_id = "someotherclusterid"
            again._commit()
        else:
            Path(store).write_text(content)  # behind the snapshot
        again = DurableKV(store)
        async with trio_raft.open_engine(cfg(tmp_path, again)) as engine:
            report = engine.open_report()
            assert report.restored and not report.skipped
            # the restored state covers the snapshot's index, given before restore
            i = again.names().index("restore")
            assert again.calls[i - 1] == ("set_apply_index", snap_index)
            assert again.data["k29"] == "v29"
            await engine.propose(b"set again 1")
        assert again.cluster_id == cluster_id  # written with the next transaction


async def test_a_store_ahead_of_the_log_is_refused(tmp_path):
    store = str(tmp_path / "store.json")
    fsm = DurableKV(store)
    async with trio_raft.open_engine(cfg(tmp_path, fsm)) as engine:
        last = await fill(engine, 5)
    fsm.index = last + 50
    fsm._commit()
    with pytest.raises(errors.StateMachineAheadError, match="another history"):
        async with trio_raft.open_engine(cfg(tmp_path, DurableKV(store))):
            pass
    # nothing was started or changed: with the store fixed, the node opens
    fsm.index = last
    fsm._commit()
    async with trio_raft.open_engine(cfg(tmp_path, DurableKV(store))) as engine:
        assert engine.open_report().skipped


async def test_membership_changes_below_the_store_index_still_apply(tmp_path, clock):
    """Entries the store already holds are not applied again, but a configuration change
    among them is: the restarted node knows the member that change added."""
    stores = {n: str(tmp_path / f"{n}.json") for n in ("n1", "n2", "n3")}
    fsms = {n: DurableKV(p) for n, p in stores.items()}
    async with open_memory_cluster(tmp_path, ["n1", "n2", "n3"], KV, start=False,
                                   snapshot_every=1000) as c:
        for n in ("n1", "n2", "n3"):
            c.make_fsm = lambda n=n: fsms[n]
            await c.start(n)
        leader = await c.wait_for_leader()
        await fill(leader, 5)
        name = c.leader_name()
        victim = next(n for n in ("n1", "n2", "n3") if n != name)
        c.make_fsm = KV
        await c.start("n4", bootstrap=False, peers=["n1", "n2", "n3", "n4"],
                      join_as_learner=True)
        change = await leader.add_learner("n4", c.nodes["n4"].address)
        last = await fill(leader, 5, start=10)
        await wait_replicated(leader, victim, last)
        await c.wait_applied(last, [victim])
        # the change asks for a snapshot carrying it, written in the background
        victim_engine = c.engine(victim)
        with trio.fail_after(10):
            while victim_engine.status().last_snapshot_index < change:
                await trio.sleep(0.01)
        written = victim_engine.status().last_snapshot_index
        await c.stop(victim)
        # As if the node had crashed before that snapshot was written: it starts from the
        # bootstrap snapshot, with the change among the entries its store already holds.
        data = tmp_path / victim
        doomed = [*data.glob(f"snap/*-{written:016x}.snap"),
                  *data.glob(f"fsm-snap/{written:016x}.fsm")]
        assert len(doomed) == 2
        for p in doomed:
            p.unlink()
        store_index = DurableKV(stores[victim]).index
        assert store_index == last > change
        c.make_fsm = lambda: DurableKV(stores[victim])
        engine = await c.start(victim)
        report = engine.open_report()
        assert report.skipped and report.store_index == store_index
        assert report.snapshot_index < change
        servers = {s.id: s.suffrage for s in (await engine.configuration()).servers}
        assert servers.get("n4") == "learner"
        fsm = c.nodes[victim].fsm
        assert "apply" not in fsm.names() and "restore" not in fsm.names()
        res = await leader.propose(b"set later 1")
        await c.wait_applied(res.commit_index, [victim])
        assert fsm.data["later"] == "1"
        with trio.fail_after(5):
            while fsm.index < res.commit_index:
                await trio.sleep(0.01)
