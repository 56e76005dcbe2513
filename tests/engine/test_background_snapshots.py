"""Snapshots are written in the background (trio_raft/engine/snapshots.py): a configuration
change asks for one and the run loop goes on, so a large state being written never stops
heartbeats, proposals or reads; the snapshot carrying the change lands afterwards."""

from __future__ import annotations

import threading
from typing import IO

import trio

from tests.engine.kv import KV, KVSnapshot
from trio_raft.testing.cluster import open_memory_cluster, wait_replicated


class Gate:
    """Holds every snapshot write (in its worker thread) while closed."""

    def __init__(self) -> None:
        self.closed = False
        self.held = 0
        self._open = threading.Event()
        self._lock = threading.Lock()

    def wait(self) -> None:
        if not self.closed:
            return
        with self._lock:
            self.held += 1
        assert self._open.wait(60), "the test never opened the gate"

    def open(self) -> None:
        self.closed = False
        self._open.set()


class HeldSnapshot(KVSnapshot):
    def __init__(self, data: dict[str, str], gate: Gate) -> None:
        super().__init__(data)
        self._gate = gate

    def write_to(self, writer: IO[bytes]) -> int:
        self._gate.wait()
        return super().write_to(writer)


class SlowKV(KV):
    def __init__(self, gate: Gate) -> None:
        super().__init__()
        self._gate = gate

    def snapshot(self) -> KVSnapshot:
        return HeldSnapshot(self.data, self._gate)


async def test_a_configuration_change_does_not_wait_for_its_snapshot(tmp_path):
    # Worker threads for file I/O (the snapshot write must really leave the trio thread), so
    # trio's real clock (a mock clock would jump ahead while a thread works), and one voter,
    # whose leadership no scheduling delay can take away.
    gate = Gate()
    async with open_memory_cluster(tmp_path, ["n1"], lambda: SlowKV(gate), start=False,
                                   snapshot_every=10_000, blocking_io=False) as c:
        leader = await c.start("n1")
        before = await leader.propose(b"set a 1")
        await c.start("n2", bootstrap=False, peers=["n1", "n2"], join_as_learner=True)
        gate.closed = True
        try:
            # The leader writes a snapshot carrying the change, held in its thread;
            # meanwhile it answers the change, commits, applies and serves reads.
            with trio.fail_after(30):
                change = await leader.add_learner("n2", c.nodes["n2"].address)
                assert change > before.commit_index
                last = 0
                for i in range(20):
                    last = (await leader.propose(b"set k%d v" % i)).commit_index
                await c.wait_applied(last, ["n1"])
                assert await leader.linearizable_read() >= last
                while gate.held < 1:  # the write is waiting in its thread
                    await trio.sleep(0.01)
            assert leader.status().last_snapshot_index < change  # still held
            # The learner needs a snapshot that lists it: the older one (the bootstrap's) is
            # not sent to it meanwhile (it would ignore it), let alone over and over.
            assert leader.counters().snapshots_sent == 0
            assert c.engine("n2").status().applied_index == 0
        finally:
            gate.open()
        with trio.fail_after(30):
            await wait_replicated(leader, "n2", last)
            while leader.status().last_snapshot_index < change:
                await trio.sleep(0.01)
        assert leader.counters().snapshots_sent >= 1
        assert c.nodes["n2"].fsm.data == c.nodes["n1"].fsm.data
