"""The server half of the gRPC transport: the ``RaftTransport`` service, run on the bridge's loop.

Each RPC decodes its frames on the loop, then crosses into trio through the transport's portal to
run the engine's handler. ``SendSnapshot`` only moves bytes here: it decodes the metadata frame,
starts the landing task in trio (:meth:`ServerHost.receive_snapshot`, which spools, finalizes and
runs the handler) and pushes the payload chunks to it through a bounded
:class:`~trio_raft.transport.snapshot_transfer.ChunkPipe`, waiting while the pipe is full. No
file is touched on the loop. Every failure becomes a gRPC status; nothing a peer sends can stop
the server:

=====================================================  =====================
error                                                  status
=====================================================  =====================
CodecError / DecodeError (bad frame, bad protobuf)      INVALID_ARGUMENT
payload before metadata, second metadata, EOF before
final, stale snapshot                                   FAILED_PRECONDITION
payload CRC differs from the one the sender announced   DATA_LOSS
StepQueueFullError, snapshot or message over the cap    RESOURCE_EXHAUSTED
no handler, transport or engine closed, transfer
cancelled by detach or close                            UNAVAILABLE
unknown peer                                            NOT_FOUND
disk errors while spooling                              INTERNAL
compressed message (none is announced)                  UNIMPLEMENTED
anything else                                           UNKNOWN
=====================================================  =====================

Refusals. A call refused because of what the client sent (a frame or protobuf that does not
decode, a compressed message, snapshot chunks out of order: :func:`is_malformed`) is answered
only after the client has ended its side of the request: the rest of the request is read and
dropped (:func:`~trio_raft.transport.grpc_limits.discard_request`, at most
``ServerLimits.refusal_drain_bytes`` within ``refusal_drain_seconds``), then the status is sent
on a stream that is closed in both directions. A client that writes a request stream in
separate operations (grpcio's asyncio API) otherwise sees a status that arrives while one of
its writes is outstanding as a failed write, reported as INTERNAL instead of the status. Past
the bounds, the status is sent and the stream reset (RST_STREAM NO_ERROR), as for every other
refusal: one caused by this node's state (overload, no handler, closing) or by a message over
its size cap (whose body is never read, see :mod:`.grpc_limits`) is answered at once, so a
peer's replication stream fails fast.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import attrs
import trio
from grpclib.const import Cardinality, Handler, Status
from grpclib.exceptions import GRPCError

from trio_raft.core.errors import DecodeError, StepPeerNotFoundError
from trio_raft.core.messages import Message
from trio_raft.errors import (
    CodecError,
    EngineClosedError,
    ReceivedFSMSnapshotStaleError,
    SnapshotMetadataDuplicateError,
    SnapshotMetadataNilError,
    SnapshotPayloadCRCError,
    SnapshotPayloadTooLargeError,
    SnapshotStreamError,
    SnapshotStreamShortError,
    SnapshotTransferCancelledError,
    StepQueueFullError,
    StorageIOError,
    TransportClosedError,
    TransportHandlerNilError,
    TransportPeerUnknownError,
)
from trio_raft.transport._proto.trio_raft.transport.v1 import (
    Ack,
    RaftMessage,
    RaftTransportBase,
    SnapshotChunk,
)
from trio_raft.transport.bridge import TrioPortal
from trio_raft.transport.codec import decode_message
from trio_raft.transport.grpc_limits import ServerLimits, discard_request
from trio_raft.transport.routes import (
    PRIORITY_ROUTE,
    SEND_ROUTE,
    SNAPSHOT_ROUTE,
    STREAM_ROUTE,
)
from trio_raft.transport.snapshot_transfer import ChunkPipe

log = logging.getLogger(__name__)

_STATUS_BY_ERROR: tuple[tuple[type[BaseException], Status], ...] = (
    (CodecError, Status.INVALID_ARGUMENT),
    (DecodeError, Status.INVALID_ARGUMENT),
    (SnapshotMetadataNilError, Status.FAILED_PRECONDITION),
    (SnapshotMetadataDuplicateError, Status.FAILED_PRECONDITION),
    (SnapshotStreamShortError, Status.FAILED_PRECONDITION),
    (ReceivedFSMSnapshotStaleError, Status.FAILED_PRECONDITION),
    (SnapshotPayloadCRCError, Status.DATA_LOSS),
    (SnapshotTransferCancelledError, Status.UNAVAILABLE),
    (SnapshotPayloadTooLargeError, Status.RESOURCE_EXHAUSTED),
    (SnapshotStreamError, Status.FAILED_PRECONDITION),
    (StepQueueFullError, Status.RESOURCE_EXHAUSTED),
    (TransportHandlerNilError, Status.UNAVAILABLE),
    (TransportClosedError, Status.UNAVAILABLE),
    (EngineClosedError, Status.UNAVAILABLE),
    (TransportPeerUnknownError, Status.NOT_FOUND),
    (StepPeerNotFoundError, Status.NOT_FOUND),
    (StorageIOError, Status.INTERNAL),
    (OSError, Status.INTERNAL),
)


def status_for(exc: BaseException) -> Status:
    """The gRPC status a handler error is reported with."""
    for cls, status in _STATUS_BY_ERROR:
        if isinstance(exc, cls):
            return status
    return Status.UNKNOWN


#: Errors caused by what the client sent (not by this node's state): see "Refusals" above.
_MALFORMED: tuple[type[BaseException], ...] = (
    CodecError, DecodeError, SnapshotMetadataNilError, SnapshotMetadataDuplicateError)
_MALFORMED_STATUSES = frozenset({Status.INVALID_ARGUMENT, Status.UNIMPLEMENTED})


class RefusedCall(GRPCError):
    """A call's refusal; ``malformed`` when the request itself was at fault."""

    def __init__(self, status: Status, message: str, *, malformed: bool) -> None:
        super().__init__(status, message)
        self.malformed = malformed


def to_grpc_error(exc: BaseException) -> GRPCError:
    if isinstance(exc, GRPCError):
        return exc
    status = status_for(exc)
    if status is Status.UNKNOWN:
        log.warning("raft transport handler failed: %r", exc)
    return RefusedCall(status, f"{type(exc).__name__}: {exc}",
                       malformed=isinstance(exc, _MALFORMED))


def is_malformed(err: GRPCError) -> bool:
    """Whether a refusal is about the request (see "Refusals" in the module docstring)."""
    return bool(getattr(err, "malformed", False)) or err.status in _MALFORMED_STATUSES


@attrs.define(slots=True)
class ServerCounters:
    """Counters written on the loop thread only."""

    messages_received: int = 0
    messages_rejected: int = 0
    snapshots_received: int = 0
    snapshots_rejected: int = 0
    snapshot_bytes_received: int = 0
    #: Refused calls whose status waited for the end of the request / that were reset instead.
    refusals_after_request_end: int = 0
    refusals_reset: int = 0


class ServerHost(Protocol):
    """What the service needs from the transport that owns it."""

    @property
    def portal(self) -> TrioPortal | None: ...

    @property
    def max_message_bytes(self) -> int: ...

    @property
    def server_limits(self) -> ServerLimits: ...

    async def deliver_inbound(self, message: Message,
                              received_at: float | None = None) -> None: ...

    async def receive_snapshot(self, header: Message, pipe: ChunkPipe) -> None: ...


_Call = Callable[[Any], Awaitable[Any]]


class RaftTransportService(RaftTransportBase):
    """grpclib service implementation; register it on any grpclib ``Server`` that runs on the
    transport's loop."""

    def __init__(self, host: ServerHost) -> None:
        self._host = host
        self.counters = ServerCounters()

    def __mapping__(self) -> dict[str, Handler]:
        return {
            SEND_ROUTE: Handler(self._call(self._rpc_send), Cardinality.UNARY_UNARY,
                                RaftMessage, Ack),
            STREAM_ROUTE: Handler(self._call(self.send_stream), Cardinality.STREAM_UNARY,
                                  RaftMessage, Ack),
            SNAPSHOT_ROUTE: Handler(self._call(self.send_snapshot), Cardinality.STREAM_UNARY,
                                    SnapshotChunk, Ack),
            PRIORITY_ROUTE: Handler(self._call(self.priority_stream),
                                    Cardinality.STREAM_UNARY, RaftMessage, Ack),
        }

    def _call(self, body: _Call) -> Callable[[Any], Awaitable[None]]:
        """A grpclib handler around ``body(stream) -> Ack``: a refusal of a malformed request
        is answered once the client has finished sending (bounded), any other at once."""

        async def handle(stream: Any) -> None:
            try:
                reply = await body(stream)
            except GRPCError as exc:
                if not is_malformed(exc):
                    raise
                await self._refuse_after_request(stream, exc)
                return
            await stream.send_message(reply)

        return handle

    async def _refuse_after_request(self, stream: Any, err: GRPCError) -> None:
        limits = self._host.server_limits
        ended = False
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(limits.refusal_drain_seconds):
                ended = await discard_request(stream, limits.refusal_drain_bytes)
        if ended:
            self.counters.refusals_after_request_end += 1
        else:
            self.counters.refusals_reset += 1  # the status goes with a reset of the stream
        await stream.send_trailing_metadata(status=err.status, status_message=err.message)

    def _portal(self) -> TrioPortal:
        portal = self._host.portal
        if portal is None:
            raise GRPCError(Status.UNAVAILABLE, "raft transport is not serving")
        return portal

    async def _handle_frame(self, portal: TrioPortal, frame: bytes) -> None:
        try:
            message = decode_message(frame, max_bytes=self._host.max_message_bytes)
            await portal.run(self._host.deliver_inbound, message, time.perf_counter())
        except GRPCError:
            self.counters.messages_rejected += 1
            raise
        except Exception as exc:
            self.counters.messages_rejected += 1
            raise to_grpc_error(exc) from None
        self.counters.messages_received += 1

    async def _rpc_send(self, stream: Any) -> Ack:
        message = await stream.recv_message()
        if message is None:
            raise RefusedCall(Status.INVALID_ARGUMENT, "the request carries no message",
                              malformed=True)
        return await self.send(message)

    async def send(self, message: RaftMessage) -> Ack:
        await self._handle_frame(self._portal(), message.message)
        return Ack()

    async def send_stream(self, messages: AsyncIterator[RaftMessage]) -> Ack:
        # Pipelined: frames are decoded here and queued (bounded) for one trio task that runs
        # the handler on them in order, so reading the stream does not wait for a thread round
        # trip per message. The first handler error ends the stream with its status.
        portal = self._portal()
        pipe = _Pipe(asyncio.get_running_loop(), portal)
        consumer = asyncio.ensure_future(portal.run(self._consume, pipe))
        consumer.add_done_callback(pipe.consumer_done)
        try:
            async for message in messages:
                if consumer.done():
                    break
                try:
                    decoded = decode_message(message.message,
                                             max_bytes=self._host.max_message_bytes)
                except Exception as exc:
                    self.counters.messages_rejected += 1
                    raise to_grpc_error(exc) from None
                await pipe.put(decoded, len(message.message), time.perf_counter())
            pipe.close()
            await consumer
        except GRPCError:
            raise
        except Exception as exc:
            self.counters.messages_rejected += 1
            raise to_grpc_error(exc) from None
        finally:
            if not consumer.done():
                consumer.cancel()
                await asyncio.gather(consumer, return_exceptions=True)
        return Ack()

    async def priority_stream(self, messages: AsyncIterator[RaftMessage]) -> Ack:
        # The same service as SendStream: what differs is on the sender's side (its own
        # stream and connection, so the small messages never wait behind large ones).
        return await self.send_stream(messages)

    async def _consume(self, pipe: _Pipe) -> None:  # trio side
        deliver = self._host.deliver_inbound
        while True:
            if not pipe.items:
                if pipe.eof:
                    return
                pipe.wake = trio.Event()
                await pipe.wake.wait()
                continue
            batch, pipe.items = pipe.items, collections.deque()
            size = 0
            for message, n, received_at in batch:
                await deliver(message, received_at)
                size += n
                self.counters.messages_received += 1
            pipe.release_soon(len(batch), size)

    async def send_snapshot(self, messages: AsyncIterator[SnapshotChunk]) -> Ack:
        portal = self._portal()
        loop = asyncio.get_running_loop()
        pipe: ChunkPipe | None = None
        receiver: asyncio.Future[None] | None = None
        size = 0
        try:
            finished = False
            async for chunk in messages:
                if chunk.metadata:
                    if pipe is not None:
                        raise SnapshotMetadataDuplicateError()
                    header = decode_message(chunk.metadata,
                                            max_bytes=self._host.max_message_bytes)
                    if header.snapshot is None:
                        raise SnapshotMetadataNilError("metadata frame carries no snapshot")
                    pipe = ChunkPipe(loop, portal)
                    receiver = asyncio.ensure_future(
                        portal.run(self._host.receive_snapshot, header, pipe))
                    receiver.add_done_callback(pipe.receiver_done)
                elif pipe is None:
                    raise SnapshotMetadataNilError(
                        "final chunk before metadata" if chunk.final
                        else "payload chunk before metadata")
                if chunk.chunk:
                    if not await pipe.put(chunk.chunk):
                        break  # the landing task ended early: its error is the answer
                    size += len(chunk.chunk)
                if chunk.final:
                    finished = True
                    break
            if pipe is None or receiver is None:
                raise SnapshotStreamShortError()
            if finished:
                pipe.finish()
            elif not receiver.done():
                raise SnapshotStreamShortError()
            await receiver
        except asyncio.CancelledError:
            if pipe is not None:
                pipe.abort()  # the landing task removes its spool; the transport waits for it
            raise
        except Exception as exc:
            self.counters.snapshots_rejected += 1
            if pipe is not None and receiver is not None and not receiver.done():
                pipe.abort()
                with contextlib.suppress(Exception):
                    await asyncio.shield(receiver)  # returns once the spool is gone
            raise to_grpc_error(exc) from None
        self.counters.snapshots_received += 1
        self.counters.snapshot_bytes_received += size
        return Ack()


class _Pipe:
    """Bounded, ordered hand-off of decoded messages from one stream (asyncio) to its trio
    consumer: at most :data:`LIMIT` messages and :data:`LIMIT_BYTES` bytes of frames waiting
    (one message is always let through, whatever its size). ``items``, ``eof`` and ``wake``
    are touched only in the trio thread; ``pending``, ``pending_bytes`` and ``space`` only on
    the loop."""

    LIMIT = 256
    LIMIT_BYTES = 64 << 20

    def __init__(self, loop: asyncio.AbstractEventLoop, portal: TrioPortal) -> None:
        self.loop = loop
        self.portal = portal
        #: (message, frame size, the instant it was decoded)
        self.items: collections.deque[tuple[Message, int, float]] = collections.deque()
        self.eof = False
        self.wake: trio.Event | None = None
        self.pending = 0
        self.pending_bytes = 0
        self.space = asyncio.Event()
        self.dead = False

    def _push(self, message: Message, size: int, received_at: float) -> None:  # trio thread
        self.items.append((message, size, received_at))
        if self.wake is not None:
            self.wake.set()

    def _finish(self) -> None:  # trio thread
        self.eof = True
        if self.wake is not None:
            self.wake.set()

    def consumer_done(self, fut: asyncio.Future[None]) -> None:  # loop
        self.dead = True
        self.space.set()
        if not fut.cancelled():
            fut.exception()  # retrieved here; send_stream re-raises it when it is still reading

    def _full(self, size: int) -> bool:
        return self.pending > 0 and (self.pending >= self.LIMIT
                                     or self.pending_bytes + size > self.LIMIT_BYTES)

    async def put(self, message: Message, size: int, received_at: float) -> None:  # loop
        while self._full(size) and not self.dead:
            self.space.clear()
            await self.space.wait()
        if self.dead:
            return
        self.pending += 1
        self.pending_bytes += size
        self.portal.call_soon(self._push, message, size, received_at)

    def close(self) -> None:  # loop
        self.portal.call_soon(self._finish)

    def _release(self, n: int, size: int) -> None:  # loop
        self.pending -= n
        self.pending_bytes -= size
        self.space.set()

    def release_soon(self, n: int, size: int) -> None:  # trio thread
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self._release, n, size)
