"""The state machine's thread rules (docs/api.md): ``restore`` runs in a worker thread, and a
reader that reads the state machine right after ``linearizable_read()`` returns never sees a
half-restored state."""

from __future__ import annotations

import json
import shutil
import threading
from typing import IO, Any

import attrs
import trio

import trio_raft
from tests.engine.kv import KVSnapshot
from tests.engine.test_single_node import cfg
from trio_raft import errors
from trio_raft.storage.descriptor import decode_descriptor, encode_descriptor
from trio_raft.storage.fsm_snapshot import fsm_snapshot_path
from trio_raft.testing.cluster import open_memory_cluster

KEYS = 120


class SlowRestoreKV:
    """``set k v`` commands; ``restore`` empties the dict and refills it key by key from a
    worker thread, and stops halfway until ``proceed`` is set (:func:`release_halfway`):
    anyone looking meanwhile sees a mixture."""

    def __init__(self) -> None:
        self.data: dict[str, str] = {}
        self.restore_threads: list[str] = []
        self.restoring_now = False
        self.halfway = threading.Event()
        self.proceed = threading.Event()
        #: Restores that were held halfway.
        self.held = 0

    def apply(self, data: bytes) -> Any:
        _, k, v = data.decode().split(" ", 2)
        self.data[k] = v
        return None

    def snapshot(self) -> KVSnapshot:
        return KVSnapshot(self.data)

    def restore(self, reader: IO[bytes]) -> None:
        self.restoring_now = True
        self.restore_threads.append(threading.current_thread().name)
        blob = reader.read()
        new = json.loads(blob) if blob else {}
        try:
            self.data.clear()
            for i, (k, v) in enumerate(new.items()):
                self.data[k] = v
                if i == len(new) // 2:
                    self.held += 1
                    self.halfway.set()
                    if not self.proceed.wait(timeout=30):  # only a broken test gets here
                        raise RuntimeError("restore held halfway for 30 s")
        finally:
            self.restoring_now = False


async def release_halfway(fsm: SlowRestoreKV) -> None:
    """Once ``fsm``'s restore is held halfway, let every task of this run go on until all of
    them are blocked (a reader let through too early reads the mixture now), then let the
    restore finish."""
    try:
        await trio.to_thread.run_sync(fsm.halfway.wait, abandon_on_cancel=True)
        await trio.testing.wait_all_tasks_blocked()
    finally:
        fsm.proceed.set()
        fsm.halfway.set()  # a waiting thread abandoned by a cancellation ends too


async def write(c: Any, data: bytes, exclude: str | None = None) -> int:
    """Propose ``data`` (an idempotent ``set``) through whoever leads, retrying while
    leadership moves (the machine may be loaded); returns the commit index."""
    while True:
        leader = await c.wait_for_leader(exclude=exclude)
        try:
            return int((await leader.propose(data)).commit_index)
        except (errors.NotAppliedError, errors.OutcomeUnknownError):
            await trio.sleep(0.01)


def consistent(view: dict[str, str]) -> bool:
    """All keys present, all written by the same round."""
    return len(view) >= KEYS and len({view[f"k{i}"] for i in range(KEYS)}) == 1


async def test_reads_never_see_a_half_restored_state_machine(tmp_path):
    async with open_memory_cluster(tmp_path, 3, SlowRestoreKV, blocking_io=False,
                                   snapshot_every=40, snapshot_catchup_entries=0) as c:
        await c.wait_for_leader()
        for i in range(KEYS):
            last = await write(c, b"set k%d one" % i)
        name = c.leader_name()
        follower = next(n for n in c.nodes if n != name)
        await c.wait_applied(last, [follower])
        fsm = c.nodes[follower].fsm
        engine = c.engine(follower)
        seen: list[str] = []
        during_restore = 0
        done = trio.Event()
        target = 1 << 62

        async def reader() -> None:
            nonlocal during_restore
            while not done.is_set():
                try:
                    await engine.linearizable_read()
                except Exception:
                    await trio.sleep(0.001)
                    continue
                view = dict(fsm.data)  # right after the read, no await in between
                during_restore += fsm.restoring_now
                assert consistent(view), f"half-restored view: {len(view)} keys"
                seen.append(view["k0"])
                await trio.sleep(0)

        async def until_caught_up() -> None:
            while engine.applied_index() < target or seen.count("two") < 20:
                await trio.sleep(0.01)
            done.set()

        with trio.fail_after(60):
            async with trio.open_nursery() as n:
                n.start_soon(release_halfway, fsm)
                for _ in range(4):
                    n.start_soon(reader)
                while seen.count("one") < 20:
                    await trio.sleep(0.01)
                c.isolate(follower)
                for i in range(KEYS):  # compacted away: the follower must take a snapshot
                    target = await write(c, b"set k%d two" % i, exclude=follower)
                c.heal()
                n.start_soon(until_caught_up)
        assert fsm.restore_threads and "MainThread" not in fsm.restore_threads
        assert fsm.held >= 1  # the readers had their chance at a half-restored state
        assert during_restore == 0
        assert seen[0] == "one" and seen[-1] == "two"
        assert consistent(dict(fsm.data)) and fsm.data["k0"] == "two"
        assert not engine.restoring()


async def test_readers_released_before_a_restore_run_before_it_starts(tmp_path):
    """White box: tasks a read released (woken) just before a snapshot is installed finish
    their synchronous look at the state machine before ``restore`` starts in its thread."""
    source = SlowRestoreKV()
    async with trio_raft.open_engine(cfg(tmp_path / "a", source)) as engine:
        for i in range(KEYS + 20):  # ahead of the target's log
            await engine.propose(b"set k%d two" % (i % KEYS))
        await engine._loop.snapshots.write(None, None, compact=False)
        snap = engine._loop.storage.snapshot()
        fsm_file = fsm_snapshot_path(engine._loop.disk.fsm_dir, snap.metadata.index)
    fsm = SlowRestoreKV()
    async with trio_raft.open_engine(cfg(tmp_path / "b", fsm)) as engine:
        for i in range(KEYS):
            await engine.propose(b"set k%d one" % i)
        loop = engine._loop
        shutil.copy(fsm_file, loop.disk.fsm_dir)  # the payload a leader would have sent
        # ...by a leader of this node's cluster (two single-node bootstraps are two clusters)
        desc = decode_descriptor(snap.data)
        snap = attrs.evolve(snap, data=encode_descriptor(
            attrs.evolve(desc, cluster_id=engine.cluster_id())))
        released = trio.Event()
        views: list[tuple[bool, dict[str, str]]] = []

        async def reader() -> None:
            await released.wait()
            views.append((fsm.restoring_now, dict(fsm.data)))

        async with trio.open_nursery() as n:
            n.start_soon(release_halfway, fsm)
            for _ in range(8):
                n.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            released.set()  # the readers are woken...
            await loop.applier.install_snapshot(snap)  # ...and the restore is next
        assert len(views) == 8
        assert all(not during and consistent(view) for during, view in views)
        assert [v["k0"] for _, v in views] == ["one"] * 8
        assert fsm.data["k0"] == "two" and consistent(dict(fsm.data))
        assert fsm.restore_threads and "MainThread" not in fsm.restore_threads
        assert fsm.held == 1
