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

Snapshot messages are carried whole: ``Snapshot.data`` arrives as it was sent. When the sender
has a payload opener and the receiver a ``.fsm`` directory and a token encoder (the setters the
engine uses on any transport), the payload travels too, the way the gRPC transport streams it:
the receiver writes it as its own ``.fsm`` file (CRC32C footer, fsync, rename) and the message's
``Snapshot.data`` becomes the receiver's token.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import random
from collections.abc import Callable, Iterable
from typing import IO, Any

import attrs
import trio

from trio_raft.core.messages import Message, MessageType
from trio_raft.errors import (
    DispatchError,
    ReceivedFSMSnapshotStaleError,
    TransportClosedError,
    TransportPeerUnknownError,
)
from trio_raft.transport.base import ErrorCounter, Handler, TransportPeer
from trio_raft.transport.spool import SnapshotSpool

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
    """One node's end of a :class:`MemoryNetwork`; implements the Transport protocol."""

    def __init__(self, network: MemoryNetwork, node_id: int,
                 peers: Iterable[TransportPeer] = ()) -> None:
        self.network = network
        self.node_id = node_id
        self._peers: dict[int, TransportPeer] = {}
        for p in peers:
            self.upsert_peer(p)
        self._handler: Handler | None = None
        self._queue: list[tuple[float, int, int, Message, bytes | None]] = []
        self._payload_opener: Callable[[int], IO[bytes]] | None = None
        self._token_decoder: Callable[[bytes], int | None] | None = None
        self._token_encoder: Callable[[int, int], bytes] | None = None
        self._fsm_snap_dir: str | None = None
        self._applied_index: Callable[[], int] | None = None
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

    def set_handler(self, handler: Handler | None) -> None:
        self._handler = handler

    def set_fsm_payload_opener(self, fn: Callable[[int], IO[bytes]] | None) -> None:
        self._payload_opener = fn

    def set_snapshot_token_decoder(self, fn: Callable[[bytes], int | None] | None) -> None:
        self._token_decoder = fn

    def set_snapshot_token_encoder(self, fn: Callable[[int, int], bytes] | None) -> None:
        self._token_encoder = fn

    def set_fsm_snap_dir(self, path: str | None) -> None:
        self._fsm_snap_dir = path

    def set_applied_index_getter(self, fn: Callable[[], int] | None) -> None:
        self._applied_index = fn

    def _snapshot_payload(self, message: Message) -> bytes | None:
        snap = message.snapshot
        if snap is None or self._payload_opener is None or self._token_decoder is None:
            return None
        index = self._token_decoder(snap.data)
        if index is None:
            return None
        with self._payload_opener(index) as f:
            return f.read()

    def _receive_payload(self, message: Message, payload: bytes) -> Message:
        snap = message.snapshot
        if snap is None or self._fsm_snap_dir is None or self._token_encoder is None:
            return message
        index = snap.metadata.index
        if self._applied_index is not None and index <= self._applied_index():
            raise ReceivedFSMSnapshotStaleError(f"index {index}")
        with SnapshotSpool(self._fsm_snap_dir) as spool:
            spool.write(payload)
            spool.finalize_as_fsm(self._fsm_snap_dir, index)
            token = self._token_encoder(index, spool.crc)
        return attrs.evolve(message, snapshot=attrs.evolve(snap, data=token))

    def upsert_peer(self, peer: TransportPeer) -> None:
        if peer.node_id != 0:
            self._peers[peer.node_id] = peer

    def remove_peer(self, node_id: int) -> None:
        self._peers.pop(node_id, None)

    async def dispatch(self, message: Message) -> None:
        if self.closed:
            raise TransportClosedError()
        if message.to not in self._peers:
            self._errors.record("Unknown")
            raise TransportPeerUnknownError(f"node_id={message.to}")
        payload = self._snapshot_payload(message) if message.type == MessageType.SNAP else None
        try:
            self.network._send(self.node_id, message, payload)
        except DispatchError as exc:
            self._errors.record(exc.code)
            raise
        finally:
            await trio.lowlevel.checkpoint()
        if message.type == MessageType.SNAP:
            self._counters["snapshots_dispatched"] += 1
        else:
            self._counters["dispatched"] += 1

    send = dispatch
    dispatch_snapshot = dispatch
    send_snapshot = dispatch

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
                    message = self._receive_payload(message, payload)
                await handler(message)
            except Exception as exc:
                network.stats.handler_errors += 1
                self._counters["handler_errors"] += 1
                log.debug("memory transport %d: handler refused %s: %r", self.node_id,
                          message.type.name, exc)
            else:
                network.stats.delivered += 1
                self._counters["received"] += 1
