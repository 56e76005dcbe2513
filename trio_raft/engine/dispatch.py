"""Outbound message dispatch and the engine's links to its peers.

Per remote peer, one bounded lane (and one sender task) for the heartbeat/vote traffic and one
for replication, so a slow peer never blocks the run loop. :meth:`Dispatcher.add_peer` and
:meth:`Dispatcher.remove_peer` keep the transport's peer table and the lanes in step.

A full lane drops the message and counts it; raft retries through probes and heartbeats. A send
that fails is counted by error code and reported back to the run loop, which tells raft the peer
is unreachable (or that a snapshot failed). A snapshot that was delivered is reported too: raft
then probes the peer again instead of waiting for it to acknowledge the snapshot, which a peer
that crashed before installing it would never do.

A message whose lane is idle (its sender task waiting on an empty lane) is written at once when
the transport offers :class:`~trio_raft.transport.base.DirectSend` (the gRPC transport does on
its native lanes, docs/transport.md 3.9): on the run loop's turn, without waking the sender
task. Order is kept: a lane holding anything, or whose task is still sending, takes the message
like any other. This is what a proposal at low load waits for twice (the leader's appends, the
follower's answer), docs/benchmarks.md "Direct writes".

A leader's append that carries no entries, only a new commit index, may be deferred for a short
delay (:meth:`Dispatcher.defer`): when an append to the same peer leaves first it carries that
commit index (or a newer one) and the deferred one is dropped, which saves a message and its
answer per write at low load.

Timing (only when the observer times stages, ``stages.py``): a replication message (an append
carrying entries, or an append's answer) is stamped when it is handed to its lane; the sender
task reports ``send`` (lane -> written, by the instant the transport's ``send`` returns) and
``send_handoff`` (its call to the transport -> written), and a leader's appends are noted in
``replication`` so that the follower's answer gives ``replicate``.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import math
import time
from collections.abc import Callable

import attrs
import trio

from trio_raft.core.messages import PRIORITY_MESSAGE_TYPES, Message, MessageType
from trio_raft.engine import stages
from trio_raft.engine.types import Peer
from trio_raft.transport.base import DirectSend, Transport, TransportPeer, error_code

logger = logging.getLogger(__name__)

HEARTBEAT_LANE_CAPACITY = 512
#: Seconds a removed peer's lanes keep sending what they already hold (``remove_peer``).
REMOVED_PEER_GRACE = 1.0


class SendReport(enum.Enum):
    """What the run loop is told about a send (``RawNode.report_unreachable`` /
    ``report_snapshot``)."""

    UNREACHABLE = "unreachable"
    SNAPSHOT_FAILED = "snapshot-failed"
    SNAPSHOT_SENT = "snapshot-sent"


def failure_report(m: Message) -> SendReport:
    return SendReport.SNAPSHOT_FAILED if m.type is MessageType.SNAP else SendReport.UNREACHABLE


def error_code_name(exc: BaseException) -> str:
    """The gRPC status name a dispatch failure is counted under (``docs/api.md``, counters)."""
    if isinstance(exc, trio.Cancelled):
        return "Canceled"
    return error_code(exc)


class DispatchStats:
    __slots__ = ("direct_sends", "drop_count", "error_count", "errors_by_code")

    def __init__(self) -> None:
        #: Messages written by the transport's ``send_nowait``, without a sender task.
        self.direct_sends = 0
        self.drop_count = 0
        self.error_count = 0
        self.errors_by_code: dict[str, int] = {}

    def record_drop(self, why: str = "lane full") -> None:
        self.drop_count += 1
        if self.drop_count == 1 or self.drop_count % 128 == 0:
            logger.warning("dropped outbound raft message (total %d): %s", self.drop_count, why)

    def record_error(self, exc: BaseException) -> None:
        self.error_count += 1
        code = error_code_name(exc)
        self.errors_by_code[code] = self.errors_by_code.get(code, 0) + 1
        if self.error_count == 1 or self.error_count % 128 == 0:
            logger.warning("raft dispatch failed (total %d, %s): %s", self.error_count, code, exc)


class PeerLanes:
    """The two lanes of one peer and the cancel scope of their sender tasks."""

    def __init__(self, node_id: int, normal_capacity: int) -> None:
        self.node_id = node_id
        self.heartbeat_send, self.heartbeat_recv = trio.open_memory_channel[Message](
            HEARTBEAT_LANE_CAPACITY
        )
        self.normal_send, self.normal_recv = trio.open_memory_channel[Message](normal_capacity)
        self.scopes: list[trio.CancelScope] = []
        self.closed = False
        #: Timed messages waiting in a lane: ``id(message)`` -> when it was handed over.
        self.handed: dict[int, float] = {}
        #: Sender tasks end by this trio-clock instant (set by ``retire``).
        self.deadline = math.inf
        self.workers_left = 2
        #: Set when both sender tasks have ended.
        self.ended = trio.Event()

    def lane_for(self, m: Message) -> trio.MemorySendChannel[Message]:
        return self.heartbeat_send if m.type in PRIORITY_MESSAGE_TYPES else self.normal_send

    def close(self) -> None:
        """Stop now: what the lanes hold is dropped."""
        self.closed = True
        for scope in self.scopes:
            scope.cancel()
        self.heartbeat_send.close()
        self.normal_send.close()

    def retire(self, deadline: float) -> None:
        """Take nothing more, send what the lanes hold until ``deadline``, then end."""
        self.deadline = deadline
        for scope in self.scopes:
            scope.deadline = deadline
        self.heartbeat_send.close()
        self.normal_send.close()

    def worker_ended(self) -> None:
        self.workers_left -= 1
        if self.workers_left == 0:
            self.ended.set()


class Dispatcher:
    """Owns the lanes of every remote peer; sender tasks run in the engine's nursery."""

    def __init__(
        self,
        transport: Transport | None,
        normal_capacity: int,
        report: Callable[[int, SendReport], None],
        stage: stages.StageSink | None = None,
    ) -> None:
        self.transport = transport
        #: The transport's send that completes without yielding, if it has one.
        self._direct = transport.send_nowait if isinstance(transport, DirectSend) else None
        #: Told of the ``send`` and ``send_handoff`` stages (None: nothing is timed).
        self.stage = stage
        #: When each timed append was written to each follower (``stages.REPLICATE``).
        self.replication = stages.ReplicationClock()
        self.normal_capacity = normal_capacity
        self.stats = DispatchStats()
        self._report = report
        self._lanes: dict[int, PeerLanes] = {}
        self._nursery: trio.Nursery | None = None
        #: Upper bound on the entry bytes of one coalesced append.
        self.max_coalesced_bytes = 4 << 20
        #: Deferred commit-only appends, newest per peer, and the flusher's wake-up.
        self._deferred: dict[int, Message] = {}
        self._deferred_armed = trio.Event()
        self._defer_delay = 0.0

    def start(self, nursery: trio.Nursery, defer_delay: float = 0.0) -> None:
        self._nursery = nursery
        self._defer_delay = defer_delay
        if defer_delay > 0:
            nursery.start_soon(self._flush_deferred_loop)

    def defer(self, m: Message) -> None:
        """Queue a commit-only append (no entries) to leave after the defer delay unless an
        append to the same peer goes first; without a delay, send it now."""
        if self._defer_delay <= 0 or m.entries or m.type is not MessageType.APP:
            self.send(m)
            return
        self._deferred[m.to] = m
        self._deferred_armed.set()

    async def _flush_deferred_loop(self) -> None:
        while True:
            await self._deferred_armed.wait()
            await trio.sleep(self._defer_delay)
            self._deferred_armed = trio.Event()
            pending, self._deferred = self._deferred, {}
            for m in pending.values():
                self.send(m)

    def add_peer(self, peer: Peer) -> None:
        """Tell the transport where ``peer`` lives and open its lanes (idempotent)."""
        if self.transport is None or not peer.address:
            return
        self.transport.upsert_peer(TransportPeer(peer.node_id, peer.id, peer.address))
        self._ensure_lanes(peer.node_id)

    def _ensure_lanes(self, node_id: int) -> None:
        if node_id in self._lanes or self._nursery is None or self.transport is None:
            return
        lanes = PeerLanes(node_id, self.normal_capacity)
        self._lanes[node_id] = lanes
        self._nursery.start_soon(self._worker, lanes, lanes.heartbeat_recv)
        self._nursery.start_soon(self._worker, lanes, lanes.normal_recv)

    def remove_peer(self, node_id: int) -> None:
        """Forget ``node_id``. Its lanes take nothing more, but what they hold (with any
        deferred commit) is still sent for up to ``REMOVED_PEER_GRACE`` seconds: among it is
        the append telling the removed peer that the change removing it committed, without
        which it would never learn it is out and stop. Then the transport drops the peer,
        unless it was added back meanwhile."""
        deferred = self._deferred.pop(node_id, None)
        lanes = self._lanes.pop(node_id, None)
        if lanes is None or self._nursery is None:
            if lanes is not None:
                lanes.close()
            if self.transport is not None:
                self.transport.remove_peer(node_id)
            return
        if deferred is not None:
            with contextlib.suppress(trio.WouldBlock):
                lanes.normal_send.send_nowait(deferred)
        lanes.retire(trio.current_time() + REMOVED_PEER_GRACE)
        self._nursery.start_soon(self._forget_when_drained, node_id, lanes)

    async def _forget_when_drained(self, node_id: int, lanes: PeerLanes) -> None:
        await lanes.ended.wait()
        if node_id not in self._lanes and self.transport is not None:
            self.transport.remove_peer(node_id)

    def _drop_lanes(self, node_id: int) -> None:
        self._deferred.pop(node_id, None)
        self.replication.forget(node_id)
        lanes = self._lanes.pop(node_id, None)
        if lanes is not None:
            lanes.close()

    def close(self) -> None:
        """Close every lane (the transport keeps its peers: it may outlive the engine)."""
        self._deferred.clear()
        for node_id in list(self._lanes):
            self._drop_lanes(node_id)

    def send(self, m: Message) -> None:
        """Queue ``m`` without blocking; a missing peer or a full lane is a counted drop."""
        if self._deferred and (m.type is MessageType.APP or m.type is MessageType.SNAP):
            self._deferred.pop(m.to, None)  # m carries the commit index the deferred one had
        lanes = self._lanes.get(m.to)
        if lanes is None:
            self.stats.record_drop(f"no address known for node {m.to:x}")
            self._report(m.to, failure_report(m))
            return
        timed = self.stage is not None and _timed(m)
        lane = lanes.lane_for(m)
        if self._direct is not None and self._send_direct(m, lane, timed):
            return
        if timed:
            lanes.handed[id(m)] = time.perf_counter()
        try:
            lane.send_nowait(m)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            if timed:
                lanes.handed.pop(id(m), None)
            self.stats.record_drop()
            self._report(m.to, failure_report(m))

    def _send_direct(self, m: Message, lane: trio.MemorySendChannel[Message],
                     timed: bool) -> bool:
        """Write ``m`` through the transport's :class:`DirectSend` when its lane is idle: its
        sender task waits on an empty lane, so nothing handed to the lane before ``m`` is still
        unsent (a message given to a waiting task leaves the task's wait at once, so the lane
        no longer counts as idle). Returns whether it was written."""
        if m.type is MessageType.SNAP:
            return False
        stats = lane.statistics()
        if stats.current_buffer_used or stats.tasks_waiting_receive != 1:
            return False
        assert self._direct is not None
        handed = time.perf_counter() if timed else 0.0
        written = self._direct(m)
        if written is None:
            return False
        self.stats.direct_sends += 1
        if timed:
            self._timed_send(m, handed, handed, written)
        return True

    async def _worker(
        self, lanes: PeerLanes, recv: trio.MemoryReceiveChannel[Message]
    ) -> None:
        scope = trio.CancelScope(deadline=lanes.deadline)
        if lanes.closed:
            scope.cancel()
        lanes.scopes.append(scope)
        try:
            await self._send_from(lanes, recv, scope)
        finally:
            lanes.worker_ended()

    async def _send_from(self, lanes: PeerLanes, recv: trio.MemoryReceiveChannel[Message],
                         scope: trio.CancelScope) -> None:
        carry: Message | None = None
        with scope:
            async with recv:
                while True:
                    if carry is not None:
                        m, carry = carry, None
                    else:
                        try:
                            m = await recv.receive()
                        except trio.EndOfChannel:
                            return
                    handed = lanes.handed.pop(id(m), None) if lanes.handed else None
                    if m.type is MessageType.APP:
                        m, carry = coalesce_appends(
                            m, recv, self.max_coalesced_bytes,
                            (lambda t: lanes.handed.pop(id(t), None)) if lanes.handed else None)
                    transport = self.transport
                    assert transport is not None
                    if m.type is MessageType.SNAP and not includes(m, m.to):
                        # The recipient would ignore it (Raft thesis section 4.2.2 gives a
                        # joining member entries, not a configuration without it): the
                        # snapshot carrying the change that added it is still being written
                        # (``snapshots.py``). Raft tries again after the next heartbeat.
                        self._report(m.to, SendReport.SNAPSHOT_FAILED)
                        continue
                    try:
                        if m.type is MessageType.SNAP:
                            await transport.send_snapshot(m)
                            self._report(m.to, SendReport.SNAPSHOT_SENT)
                        elif handed is None:
                            await transport.send(m)
                        else:
                            called = time.perf_counter()
                            written = await transport.send(m)
                            self._timed_send(m, handed, called, written)
                    except trio.Cancelled:
                        raise
                    except Exception as exc:
                        self.stats.record_error(exc)
                        self._report(m.to, failure_report(m))


    def _timed_send(self, m: Message, handed: float, called: float,
                    written: float | None) -> None:
        sink = self.stage
        if sink is None:
            return
        if written is None:
            written = time.perf_counter()
        sink(stages.SEND, written - handed, written)
        sink(stages.SEND_HANDOFF, max(0.0, written - called), written)
        if m.type is MessageType.APP and m.entries:
            self.replication.written(m.to, m.entries[-1].index, written)


def _timed(m: Message) -> bool:
    """Whether ``m`` is a replication message whose ``send`` stage is timed."""
    return (m.type is MessageType.APP and bool(m.entries)) or m.type is MessageType.APP_RESP


def includes(m: Message, node_id: int) -> bool:
    """Whether the configuration of ``m``'s snapshot lists ``node_id`` (a message without a
    snapshot is the transport's to refuse)."""
    if m.snapshot is None:
        return True
    cs = m.snapshot.metadata.conf_state
    return any(node_id in ids for ids in (cs.voters, cs.learners, cs.voters_outgoing,
                                          cs.learners_next))


def coalesce_appends(
    first: Message, recv: trio.MemoryReceiveChannel[Message], max_bytes: int,
    on_take: Callable[[Message], object] | None = None,
) -> tuple[Message, Message | None]:
    """Merge appends already queued behind ``first`` into one message.

    While a send is slow, the leader keeps producing appends that each extend the previous one
    (in replicate state, each starts where the last ended). Sending them as one append carrying
    all their entries and the newest commit index is what the follower would have ended up with
    anyway, and costs one round trip instead of many. Returns the merged append and the first
    queued message that could not be merged (to be sent next), if any. ``on_take`` is called
    with each message merged into ``first``.
    """
    merged = first
    entries = list(first.entries)
    size = sum(len(e.data) for e in entries)
    changed = False
    while size < max_bytes:
        try:
            nxt = recv.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel):
            break
        contiguous = (
            nxt.type is MessageType.APP
            and nxt.term == merged.term
            and entries
            and nxt.index == entries[-1].index
            and nxt.log_term == entries[-1].term
        )
        if not contiguous:
            if changed:
                merged = attrs.evolve(merged, entries=tuple(entries))
            return merged, nxt
        if on_take is not None:
            on_take(nxt)
        entries.extend(nxt.entries)
        size += sum(len(e.data) for e in nxt.entries)
        merged = attrs.evolve(merged, commit=max(merged.commit, nxt.commit))
        changed = True
    if changed:
        merged = attrs.evolve(merged, entries=tuple(entries))
    return merged, None
