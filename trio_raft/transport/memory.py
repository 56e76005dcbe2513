"""An in-process network implementing the Transport protocol, with fault injection.

For tests and the simulator: every node gets a :class:`MemoryTransport` from one
:class:`MemoryNetwork`. A sent message is put in the destination's delivery queue with a
delivery time; the destination's :meth:`MemoryTransport.serve` task hands messages to its handler
in delivery-time order (ties in send order). Faults, per directed link ``(src, dst)``:

* ``drop_rate``: probability a message is silently lost;
* ``delay`` and ``jitter``: one-way latency ``delay + uniform(0, jitter)`` (jitter reorders);
* ``duplicate_rate``: probability a message is delivered twice (each copy with its own delay);
* cuts: :meth:`MemoryNetwork.cut` (one way), :meth:`MemoryNetwork.partition` (both ways between
  groups), :meth:`MemoryNetwork.isolate`, :meth:`MemoryNetwork.heal`. Sending over a cut link,
  or to a node that is not serving, raises :class:`~trio_raft.errors.DispatchError` with code
  ``Unavailable`` (as a refused connection would); a message in flight when its link is cut is
  lost.

All timing uses trio's clock, so the network runs under ``trio.testing.MockClock``. Randomness
comes from one ``random.Random`` per link, seeded from the network's seed and the link's ends, so
a link's fate depends only on the sequence of messages sent over it. (Trio itself may shuffle the
order in which runnable tasks run; a fully reproducible simulation also pins that.)

Snapshots (:meth:`MemoryTransport.send_snapshot`) travel the way the gRPC transport streams
them, through the same storage-side object: the sender's attached
:class:`~trio_raft.storage.snapshot_exchange.SnapshotExchange` opens the ``.fsm`` payload that the
token in ``Snapshot.data`` names (read in worker threads; an inline payload is taken as it is),
and the receiver lands it with its own exchange (spool, CRC32C, footer, fsync, rename, in worker
threads) before its handler gets the message with the receiver's token. A receiver without an
exchange gets the payload inline. The landing runs in the receiver's delivery task; ``detach``
cancels it and waits until its spool is gone.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import random
import time
from collections.abc import Iterable
from typing import Any

import attrs
import trio

from trio_raft.core.messages import Message, MessageType
from trio_raft.errors import (
    DispatchError,
    FSMSnapshotError,
    SnapshotTransferCancelledError,
    TransportAttachedError,
    TransportClosedError,
    TransportPeerUnknownError,
)
from trio_raft.storage.snapshot_exchange import DEFAULT_MAX_SNAPSHOT_BYTES, SnapshotExchange
from trio_raft.transport.base import RECEIVED_AT, ErrorCounter, Handler, TransportPeer
from trio_raft.transport.snapshot_transfer import TransferRegistry, land_snapshot

log = logging.getLogger(__name__)


@attrs.frozen(slots=True)
class LinkConfig:
    """Fault settings of one directed link."""

    drop_rate: float = attrs.field(default=0.0, validator=attrs.validators.and_(
        attrs.validators.ge(0.0), attrs.validators.le(1.0)))
    delay: float = attrs.field(default=0.0, validator=attrs.validators.ge(0.0))
    jitter: float = attrs.field(default=0.0, validator=attrs.validators.ge(0.0))
    duplicate_rate: float = attrs.field(default=0.0, validator=attrs.validators.and_(
        attrs.validators.ge(0.0), attrs.validators.le(1.0)))


@attrs.define(slots=True)
class NetworkStats:
    sent: int = 0
    delivered: int = 0
    dropped: int = 0
    duplicated: int = 0
    refused: int = 0
    lost_in_flight: int = 0
    handler_errors: int = 0


class MemoryNetwork:
    """The shared medium of a set of :class:`MemoryTransport`."""

    def __init__(self, *, seed: int | random.Random = 0,
                 default_link: LinkConfig | None = None) -> None:
        if isinstance(seed, random.Random):
            seed = seed.getrandbits(64)
        self.seed = seed
        self.default_link = default_link or LinkConfig()
        self.stats = NetworkStats()
        self._nodes: dict[int, MemoryTransport] = {}
        self._links: dict[tuple[int, int], LinkConfig] = {}
        self._rngs: dict[tuple[int, int], random.Random] = {}
        self._cuts: set[tuple[int, int]] = set()

    # -- nodes ------------------------------------------------------------------------------------

    def transport(self, node_id: int, peers: Iterable[TransportPeer] = ()) -> MemoryTransport:
        """A new transport for ``node_id`` (replacing a closed one for the same id)."""
        old = self._nodes.get(node_id)
        if old is not None and not old.closed:
            raise ValueError(f"node {node_id} already has an open transport")
        t = MemoryTransport(self, node_id, peers)
        self._nodes[node_id] = t
        return t

    def node(self, node_id: int) -> MemoryTransport | None:
        return self._nodes.get(node_id)

    # -- links ------------------------------------------------------------------------------------

    def set_link(self, src: int, dst: int, config: LinkConfig | None = None,
                 **changes: Any) -> None:
        """Set the fault config of ``src -> dst`` (a ``LinkConfig`` or keyword changes to the
        current one)."""
        base = config or self.link(src, dst)
        self._links[(src, dst)] = attrs.evolve(base, **changes) if changes else base

    def set_links(self, nodes: Iterable[int], config: LinkConfig | None = None,
                  **changes: Any) -> None:
        """Apply :meth:`set_link` to every directed link among ``nodes``."""
        ids = list(nodes)
        for a in ids:
            for b in ids:
                if a != b:
                    self.set_link(a, b, config, **changes)

    def link(self, src: int, dst: int) -> LinkConfig:
        return self._links.get((src, dst), self.default_link)

    def cut(self, src: int, dst: int) -> None:
        """Cut ``src -> dst`` only (``dst -> src`` keeps working)."""
        self._cuts.add((src, dst))

    def restore(self, src: int, dst: int) -> None:
        self._cuts.discard((src, dst))

    def partition(self, *groups: Iterable[int]) -> None:
        """Cut every link between nodes of different groups, both ways."""
        sets = [set(g) for g in groups]
        for i, a in enumerate(sets):
            for b in sets[i + 1:]:
                for x in a:
                    for y in b:
                        self._cuts.add((x, y))
                        self._cuts.add((y, x))

    def isolate(self, node_id: int) -> None:
        """Cut ``node_id`` off from every other known node, both ways."""
        self.partition([node_id], [n for n in self._nodes if n != node_id])

    def heal(self) -> None:
        """Remove every cut (link fault settings stay)."""
        self._cuts.clear()

    def is_cut(self, src: int, dst: int) -> bool:
        return (src, dst) in self._cuts

    def _rng(self, src: int, dst: int) -> random.Random:
        rng = self._rngs.get((src, dst))
        if rng is None:
            rng = self._rngs[(src, dst)] = random.Random(f"{self.seed}:{src}:{dst}")
        return rng

    # -- delivery ---------------------------------------------------------------------------------

    def _send(self, src: int, message: Message, payload: bytes | None = None) -> None:
        dst = message.to
        target = self._nodes.get(dst)
        if target is None or not target.serving or (src, dst) in self._cuts:
            self.stats.refused += 1
            raise DispatchError(f"node {dst} unreachable from {src}", code="Unavailable")
        self.stats.sent += 1
        link = self.link(src, dst)
        rng = self._rng(src, dst)
        copies = 1
        if link.duplicate_rate and rng.random() < link.duplicate_rate:
            copies = 2
            self.stats.duplicated += 1
        now = trio.current_time()
        for _ in range(copies):
            if link.drop_rate and rng.random() < link.drop_rate:
                self.stats.dropped += 1
                continue
            delay = link.delay + (rng.random() * link.jitter if link.jitter else 0.0)
            target._enqueue(now + delay, src, message, payload)


class MemoryTransport:
    """One node's end of a :class:`MemoryNetwork`; a
    :class:`~trio_raft.transport.base.ServingTransport`."""

    def __init__(self, network: MemoryNetwork, node_id: int,
                 peers: Iterable[TransportPeer] = ()) -> None:
        self.network = network
        self.node_id = node_id
        self._peers: dict[int, TransportPeer] = {}
        for p in peers:
            self.upsert_peer(p)
        self._handler: Handler | None = None
        self._snapshots: SnapshotExchange | None = None
        self._transfers = TransferRegistry()
        self._queue: list[tuple[float, int, int, Message, bytes | None]] = []
        self._seq = itertools.count()
        self._wakeup = trio.Event()
        self._errors = ErrorCounter()
        self._counters = {"dispatched": 0, "snapshots_dispatched": 0, "received": 0,
                          "handler_errors": 0}
        self.serving = False
        self.closed = False
        self._started = False
        self._cancel: trio.CancelScope | None = None
        self._stopped = trio.Event()
        self._cm_nursery: Any = None

    # -- Transport protocol -----------------------------------------------------------------------

    def attach(self, handler: Handler, snapshots: SnapshotExchange | None) -> None:
        if self._handler is not None:
            raise TransportAttachedError()
        self._handler = handler
        self._snapshots = snapshots

    async def detach(self) -> None:
        """Refuse inbound messages from now on; cancel a snapshot being landed and wait until
        its spool is gone."""
        self._handler = None
        self._snapshots = None
        await self._transfers.cancel_all()

    def upsert_peer(self, peer: TransportPeer) -> None:
        if peer.node_id != 0:
            self._peers[peer.node_id] = peer

    def remove_peer(self, node_id: int) -> None:
        self._peers.pop(node_id, None)

    async def send(self, message: Message) -> None:
        if message.type == MessageType.SNAP:
            self._errors.record("InvalidArgument")
            raise DispatchError("MsgSnap goes through send_snapshot", code="InvalidArgument")
        await self._send(message, None)
        self._counters["dispatched"] += 1

    async def send_snapshot(self, message: Message) -> None:
        """Carry a ``MsgSnap`` and its payload (see the module docstring)."""
        snap = message.snapshot
        if message.type != MessageType.SNAP or snap is None:
            self._errors.record("InvalidArgument")
            raise DispatchError("send_snapshot needs a MsgSnap with a snapshot",
                                code="InvalidArgument")
        exchange = self._snapshots
        payload: bytes = snap.data
        if self.closed:
            raise TransportClosedError()
        if exchange is not None:
            try:
                payload = await trio.to_thread.run_sync(_read_outgoing, exchange, snap.data)
            except FSMSnapshotError as exc:
                self._errors.record("DataLoss")
                raise DispatchError(f"{type(exc).__name__}: {exc}", code="DataLoss") from exc
            if payload is not snap.data:  # read from a file: the token stays, as on gRPC
                await self._send(message, payload)
                self._counters["snapshots_dispatched"] += 1
                return
        header = attrs.evolve(message, snapshot=attrs.evolve(snap, data=b""))
        await self._send(header, payload)
        self._counters["snapshots_dispatched"] += 1

    async def _send(self, message: Message, payload: bytes | None) -> None:
        if self.closed:
            raise TransportClosedError()
        if message.to not in self._peers:
            self._errors.record("Unknown")
            raise TransportPeerUnknownError(f"node_id={message.to}")
        try:
            self.network._send(self.node_id, message, payload)
        except DispatchError as exc:
            self._errors.record(exc.code)
            raise
        finally:
            await trio.lowlevel.checkpoint()

    def dispatch_error_count(self) -> int:
        return self._errors.total

    def dispatch_error_counts_by_code(self) -> dict[str, int]:
        return dict(self._errors.by_code)

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self._counters)
        out["queued"] = len(self._queue)
        out["peers"] = len(self._peers)
        out["dispatch_errors"] = self._errors.total
        out["dispatch_errors_by_code"] = dict(self._errors.by_code)
        return out

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                    ) -> None:
        """Deliver inbound messages to the handler until :meth:`aclose` or cancellation."""
        if self.closed:
            raise TransportClosedError()
        if self._started:
            raise RuntimeError("MemoryTransport.serve is already running")
        self._started = True
        try:
            with trio.CancelScope() as cancel:
                self._cancel = cancel
                self.serving = True
                task_status.started()
                await self._deliver_forever()
        finally:
            self.serving = False
            self.closed = True
            self._queue.clear()
            self._stopped.set()

    async def aclose(self) -> None:
        self.closed = True
        self.serving = False
        if self._cancel is not None:
            self._cancel.cancel()
        if self._started:
            with trio.CancelScope(shield=True):
                await self._stopped.wait()
        await trio.lowlevel.checkpoint()

    async def __aenter__(self) -> MemoryTransport:
        self._cm_nursery = trio.open_nursery()
        nursery = await self._cm_nursery.__aenter__()
        await nursery.start(self.serve)
        return self

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        await self.aclose()
        result: bool | None = await self._cm_nursery.__aexit__(*exc_info)
        return result

    # -- delivery ---------------------------------------------------------------------------------

    def _enqueue(self, at: float, src: int, message: Message, payload: bytes | None = None
                 ) -> None:
        heapq.heappush(self._queue, (at, next(self._seq), src, message, payload))
        self._wakeup.set()

    async def _deliver_forever(self) -> None:
        network = self.network
        while True:
            if not self._queue:
                self._wakeup = trio.Event()
                await self._wakeup.wait()
                continue
            at = self._queue[0][0]
            if trio.current_time() < at:
                self._wakeup = trio.Event()
                with trio.move_on_at(at):
                    await self._wakeup.wait()
                continue
            _, _, src, message, payload = heapq.heappop(self._queue)
            if network.is_cut(src, self.node_id):
                network.stats.lost_in_flight += 1
                continue
            handler = self._handler
            if handler is None:
                network.stats.handler_errors += 1
                self._counters["handler_errors"] += 1
                continue
            try:
                if payload is not None:
                    await self._land(message, payload, handler)
                else:
                    RECEIVED_AT.set(time.perf_counter())
                    await handler(message)
            except Exception as exc:
                network.stats.handler_errors += 1
                self._counters["handler_errors"] += 1
                log.debug("memory transport %d: handler refused %s: %r", self.node_id,
                          message.type.name, exc)
            else:
                network.stats.delivered += 1
                self._counters["received"] += 1

    async def _land(self, message: Message, payload: bytes, handler: Handler) -> None:
        chunks = [payload] if payload else []

        async def next_chunk() -> bytes | None:
            await trio.lowlevel.checkpoint()
            return chunks.pop() if chunks else None

        transfer = self._transfers.open()
        try:
            with transfer.scope:
                await land_snapshot(message, next_chunk, handler, self._snapshots,
                                    max_bytes=DEFAULT_MAX_SNAPSHOT_BYTES)
                return
            raise SnapshotTransferCancelledError()
        finally:
            self._transfers.close(transfer)


def _read_outgoing(exchange: SnapshotExchange, data: bytes) -> bytes:
    """The payload ``data`` names (read whole, CRC-checked), or ``data`` itself when inline."""
    opened = exchange.open_outgoing(data)
    if opened is None:
        return data
    with opened:
        parts = []
        while chunk := opened.read(1 << 20):
            parts.append(chunk)
    return b"".join(parts)
