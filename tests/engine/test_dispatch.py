"""Outbound lanes: coalescing queued appends, drops on full lanes, error codes."""

from __future__ import annotations

import trio
import trio.testing

from trio_raft.core.messages import Entry, Message, MessageType
from trio_raft.engine.dispatch import (
    REMOVED_PEER_GRACE,
    Dispatcher,
    SendReport,
    coalesce_appends,
    error_code_name,
)
from trio_raft.engine.types import Peer
from trio_raft.errors import DispatchError
from trio_raft.transport.base import TransportPeer

MT = MessageType


class PeerTable:
    """The peer-table half of a transport: what the dispatcher tells it about peers."""

    def __init__(self) -> None:
        self.peers: dict[int, TransportPeer] = {}

    def upsert_peer(self, peer: TransportPeer) -> None:
        self.peers[peer.node_id] = peer

    def remove_peer(self, node_id: int) -> None:
        self.peers.pop(node_id, None)


def peer(node_id: int) -> Peer:
    return Peer(f"n{node_id}", f"127.0.0.1:{7000 + node_id}", node_id)


def app(index: int, log_term: int, n: int, commit: int, term: int = 2,
        to: int = 2) -> Message:
    ents = tuple(Entry(term, index + 1 + i, data=b"x") for i in range(n))
    return Message(MT.APP, to=to, from_=1, term=term, log_term=log_term, index=index,
                   entries=ents, commit=commit)


async def test_contiguous_appends_are_merged_and_others_carried():
    send, recv = trio.open_memory_channel[Message](10)
    first = app(10, 2, 3, commit=9)
    send.send_nowait(app(13, 2, 2, commit=11))
    send.send_nowait(app(15, 2, 1, commit=12))
    hb = Message(MT.HEARTBEAT, to=2, from_=1, term=2)
    send.send_nowait(hb)
    send.send_nowait(app(16, 2, 1, commit=13))
    merged, carry = coalesce_appends(first, recv, 1 << 20)
    assert [e.index for e in merged.entries] == [11, 12, 13, 14, 15, 16]
    assert (merged.index, merged.log_term, merged.commit) == (10, 2, 12)
    assert carry is hb
    rest, carry2 = coalesce_appends(recv.receive_nowait(), recv, 1 << 20)
    assert [e.index for e in rest.entries] == [17] and carry2 is None


async def test_non_contiguous_append_is_not_merged():
    send, recv = trio.open_memory_channel[Message](10)
    first = app(10, 2, 3, commit=9)
    gap = app(20, 2, 1, commit=9)  # a probe after a rejection: does not extend the first
    send.send_nowait(gap)
    merged, carry = coalesce_appends(first, recv, 1 << 20)
    assert merged is first and carry is gap


async def test_full_lane_drops_and_failed_send_is_reported():
    reports: list[tuple[int, bool]] = []
    sent: list[Message] = []
    gate = trio.Event()

    class Slow(PeerTable):
        async def send(self, m: Message) -> None:
            await gate.wait()
            sent.append(m)
            raise DispatchError("peer down", code="Unavailable")

    d = Dispatcher(Slow(), 2, lambda nid, snap: reports.append((nid, snap)))
    async with trio.open_nursery() as nursery:
        d.start(nursery)
        d.add_peer(peer(2))
        for i in range(6):
            d.send(Message(MT.APP, to=2, from_=1, term=1, index=100 * i))
        await trio.testing.wait_all_tasks_blocked()
        assert d.stats.drop_count >= 3  # one in the worker, two queued, the rest dropped
        d.send(Message(MT.APP, to=7, from_=1, term=1))  # no lane for that peer: a drop
        gate.set()
        await trio.testing.wait_all_tasks_blocked()
        d.close()
    assert d.stats.error_count == len(sent) > 0
    assert d.stats.errors_by_code == {"Unavailable": len(sent)}
    assert (7, SendReport.UNREACHABLE) in reports
    assert error_code_name(TimeoutError()) == "DeadlineExceeded"


def recording_dispatcher() -> tuple[Dispatcher, list[Message]]:
    sent: list[Message] = []

    class Record(PeerTable):
        async def send(self, m: Message) -> None:
            sent.append(m)

    return Dispatcher(Record(), 8, lambda nid, snap: None), sent


async def test_commit_only_append_is_deferred_and_superseded(clock):
    d, sent = recording_dispatcher()
    async with trio.open_nursery() as nursery:
        d.start(nursery, defer_delay=0.002)
        d.add_peer(peer(2))
        d.add_peer(peer(3))
        commit_only = app(20, 2, 0, commit=20)
        to3 = Message(MT.APP, to=3, from_=1, term=2, log_term=2, index=20, commit=20)
        d.defer(commit_only)
        d.defer(to3)
        d.defer(app(20, 2, 1, commit=20))  # carries entries: leaves at once
        await trio.sleep(0.001)
        # Peer 2's append with entries left first and carried the commit: the held one is gone;
        # peer 3's is still held.
        assert [(m.to, len(m.entries)) for m in sent] == [(2, 1)]
        await trio.sleep(0.002)
        assert [(m.to, len(m.entries)) for m in sent] == [(2, 1), (3, 0)]
        # Held again, then the peer is removed: the held commit leaves at once (the removed
        # peer learns that the change removing it committed), then the transport drops it.
        d.defer(Message(MT.APP, to=3, from_=1, term=2, log_term=2, index=20, commit=21))
        d.remove_peer(3)
        await trio.testing.wait_all_tasks_blocked()
        assert [(m.to, m.commit) for m in sent][2:] == [(3, 21)]
        assert 3 not in d.transport.peers and 2 in d.transport.peers
        d.send(Message(MT.APP, to=3, from_=1, term=2, log_term=2, index=21, commit=21))
        await trio.sleep(0.01)
        assert len(sent) == 3  # nothing more reaches a removed peer
        nursery.cancel_scope.cancel()


async def test_a_removed_peer_gets_what_its_lanes_held_for_a_grace_period(clock):
    release = trio.Event()
    sent: list[Message] = []

    class Slow(PeerTable):
        async def send(self, m: Message) -> None:
            await release.wait()
            sent.append(m)

    d = Dispatcher(Slow(), 8, lambda nid, snap: None)
    async with trio.open_nursery() as nursery:
        d.start(nursery)
        d.add_peer(peer(2))
        d.add_peer(peer(3))
        for i in range(3):
            d.send(app(20 + i, 2, 1, commit=20 + i, to=3))
        d.remove_peer(3)
        await trio.sleep(0.5)
        assert 3 in d.transport.peers  # still draining
        release.set()
        await trio.testing.wait_all_tasks_blocked()
        assert [m.to for m in sent] and all(m.to == 3 for m in sent)
        assert 3 not in d.transport.peers
        # A peer that never drains is cut off after the grace period.
        stuck = trio.Event()

        class Stuck(PeerTable):
            async def send(self, m: Message) -> None:
                await stuck.wait()

        d2 = Dispatcher(Stuck(), 8, lambda nid, snap: None)
        d2.start(nursery)
        d2.add_peer(peer(4))
        d2.send(app(20, 2, 1, commit=20, to=4))
        d2.remove_peer(4)
        await trio.sleep(REMOVED_PEER_GRACE + 0.1)
        assert 4 not in d2.transport.peers
        # Removed and added back while draining: the new peer stays.
        d2.add_peer(peer(5))
        d2.send(app(20, 2, 1, commit=20, to=5))
        d2.remove_peer(5)
        d2.add_peer(peer(5))
        await trio.sleep(REMOVED_PEER_GRACE + 0.1)
        assert 5 in d2.transport.peers
        nursery.cancel_scope.cancel()


async def test_commit_only_append_without_delay_leaves_at_once():
    d, sent = recording_dispatcher()
    async with trio.open_nursery() as nursery:
        d.start(nursery)
        d.add_peer(peer(2))
        d.defer(app(20, 2, 0, commit=20))
        await trio.sleep(0)
        await trio.testing.wait_all_tasks_blocked()
        assert [m.commit for m in sent] == [20]
        d.send(app(20, 2, 1, commit=21))  # a transport without DirectSend: its sender task
        assert [m.commit for m in sent] == [20]  # writes it, not this turn
        await trio.testing.wait_all_tasks_blocked()
        assert [m.commit for m in sent] == [20, 21] and d.stats.direct_sends == 0
        nursery.cancel_scope.cancel()


async def test_delivered_snapshot_is_reported_so_raft_probes_again():
    """A peer that crashes before installing a delivered snapshot never acknowledges it;
    reporting the delivery lets raft probe it (and send a new snapshot) instead of waiting."""
    reports: list[tuple[int, SendReport]] = []

    class Snapshots(PeerTable):
        async def send(self, m: Message) -> None:
            raise AssertionError("not a snapshot")

        async def send_snapshot(self, m: Message) -> None:
            if m.to == 3:
                raise DispatchError("peer down", code="Unavailable")

    d = Dispatcher(Snapshots(), 4, lambda nid, r: reports.append((nid, r)))
    async with trio.open_nursery() as nursery:
        d.start(nursery)
        d.add_peer(peer(2))
        d.add_peer(peer(3))
        d.send(Message(MT.SNAP, to=2, from_=1, term=1))
        d.send(Message(MT.SNAP, to=3, from_=1, term=1))
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert sorted(reports, key=lambda r: r[0]) == [(2, SendReport.SNAPSHOT_SENT),
                                                   (3, SendReport.SNAPSHOT_FAILED)]


class DirectTransport(PeerTable):
    """A transport with :class:`~trio_raft.transport.base.DirectSend`: ``refuse`` makes
    ``send_nowait`` decline; ``gate`` holds ``send`` (a sender task busy with a message)."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[str, int]] = []
        self.refuse = False
        self.gate: trio.Event | None = None

    def send_nowait(self, m: Message) -> float | None:
        if self.refuse:
            return None
        self.log.append(("direct", m.commit))
        return 123.0

    async def send(self, m: Message) -> None:
        if self.gate is not None:
            await self.gate.wait()
        self.log.append(("task", m.commit))


async def test_an_idle_lane_writes_directly_and_a_busy_one_keeps_the_order():
    t = DirectTransport()
    stages: list[tuple[str, float]] = []
    d = Dispatcher(t, 8, lambda nid, snap: None,
                   stage=lambda name, seconds, at: stages.append((name, at)))
    async with trio.open_nursery() as nursery:
        d.start(nursery)
        d.add_peer(peer(2))
        await trio.testing.wait_all_tasks_blocked()
        d.send(app(10, 2, 1, commit=1))  # both lanes idle: written on this turn
        d.send(Message(MT.HEARTBEAT, to=2, from_=1, term=2, commit=2))
        assert t.log == [("direct", 1), ("direct", 2)]
        assert ("send", 123.0) in stages  # a direct append is timed like any other
        assert d.replication.acked(2, 11, now=124.0) == 1.0  # noted as written at 123

        t.refuse, t.gate = True, trio.Event()
        d.send(app(11, 2, 1, commit=3))  # declined: its sender task takes it, and waits
        await trio.testing.wait_all_tasks_blocked()
        t.refuse = False
        d.send(app(12, 2, 1, commit=4))  # the task is still sending: no overtaking
        d.send(app(20, 2, 1, commit=5))  # nor behind a message waiting in the lane
        assert t.log[2:] == []
        t.gate.set()
        await trio.testing.wait_all_tasks_blocked()
        assert t.log[2:] == [("task", 3), ("task", 4), ("task", 5)]

        # A message handed straight to the waiting task: the lane is empty, but not idle.
        t.refuse = True
        d.send(app(21, 2, 1, commit=6))
        t.refuse = False
        d.send(app(30, 2, 1, commit=7))
        await trio.testing.wait_all_tasks_blocked()
        assert t.log[5:] == [("task", 6), ("task", 7)]
        d.send(app(31, 2, 1, commit=8))
        assert t.log[7:] == [("direct", 8)]
        assert d.stats.direct_sends == 3
        nursery.cancel_scope.cancel()

