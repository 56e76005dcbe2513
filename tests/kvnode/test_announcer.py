"""serve's membership announcer is driven by events, from whichever thread they come.

The engine is a stand-in exposing just what the announcer calls; the state machine and the
service context are the real ones.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import trio
import trio.testing

import trio_raft
from trio_raft_kv.metrics import Metrics
from trio_raft_kv.serve import ANNOUNCE_RETRY, MembershipAnnouncer
from trio_raft_kv.services import ServiceContext
from trio_raft_kv.statemachine import KVStateMachine, encode_member


class StandInEngine:
    """Leader or follower on demand; proposals are applied at once."""

    def __init__(self, fsm: KVStateMachine, state: trio_raft.State) -> None:
        self.fsm = fsm
        self._state = state
        self.proposed: list[tuple[float, bytes]] = []
        self.on_acquired: Callable[[], object] | None = None

    def register_leader_acquired_callback(self, fn: Callable[[], object]) -> Callable[[], None]:
        self.on_acquired = fn

        def deregister() -> None:
            self.on_acquired = None

        return deregister

    def state(self) -> trio_raft.State:
        return self._state

    def leader(self) -> trio_raft.LeaderInfo:
        return trio_raft.LeaderInfo(id="", address="")

    def applied_index(self) -> int:
        return 0

    async def propose(self, data: bytes) -> None:
        self.proposed.append((trio.current_time(), data))
        self.fsm.apply(data)

    def become_leader(self) -> None:
        self._state = trio_raft.State.LEADER
        assert self.on_acquired is not None
        self.on_acquired()


def announcer_for(node_id: str) -> tuple[KVStateMachine, MembershipAnnouncer]:
    fsm = KVStateMachine()
    announcer = MembershipAnnouncer(ServiceContext(node_id, fsm, Metrics(node_id)),
                                    transport=None)  # type: ignore[arg-type]
    fsm.on_members_changed = announcer.members_changed
    return fsm, announcer


async def test_a_leader_records_itself_and_stops_without_waiting(
        clock: trio.testing.MockClock) -> None:
    fsm, announcer = announcer_for("n1")
    engine: Any = StandInEngine(fsm, trio_raft.State.LEADER)
    await announcer.run(engine)
    assert [data for _, data in engine.proposed] == [encode_member("n1")]
    assert announcer.recorded.is_set() and "n1" in fsm.members
    assert trio.current_time() == 0  # ended on the apply, not after a retry interval
    assert engine.on_acquired is None  # deregistered


async def test_becoming_leader_wakes_the_announcer_at_once(
        clock: trio.testing.MockClock) -> None:
    fsm, announcer = announcer_for("n1")
    engine: Any = StandInEngine(fsm, trio_raft.State.FOLLOWER)  # no leader known yet

    async def elected_later() -> None:
        await trio.sleep(ANNOUNCE_RETRY * 0.3)
        engine.become_leader()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(announcer.run, engine)
        nursery.start_soon(elected_later)
    assert [t for t, _ in engine.proposed] == [ANNOUNCE_RETRY * 0.3]


async def test_a_record_applied_elsewhere_or_restored_in_a_worker_thread_is_seen() -> None:
    # Real clock: a worker thread is involved, and the wait below is only an upper bound.
    fsm, announcer = announcer_for("n2")
    fsm.apply(encode_member("n1"))  # someone else's record: not ours
    await trio.testing.wait_all_tasks_blocked()
    assert not announcer.recorded.is_set()

    source = KVStateMachine()
    source.apply(encode_member("n2"))
    blob = io.BytesIO()
    source.snapshot().write_to(blob)
    blob.seek(0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(announcer.recorded.wait)  # someone waits, as run() does
        await trio.testing.wait_all_tasks_blocked()
        # The engine restores in a worker thread; the waiter is woken in trio.
        await trio.to_thread.run_sync(fsm.restore, blob)
        with trio.fail_after(30):
            await announcer.recorded.wait()
    engine: Any = StandInEngine(fsm, trio_raft.State.FOLLOWER)
    with trio.fail_after(30):
        await announcer.run(engine)  # already recorded: returns without an attempt
    assert engine.proposed == []
