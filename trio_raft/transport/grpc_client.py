"""The client half of the gRPC transport. Everything here runs on the bridge's asyncio loop.

* Two connections (grpclib ``Channel``) per peer address, created on first use and cached: the
  main one (replication, snapshots) and the priority one (:data:`PRIORITY`), so that neither
  TCP nor HTTP/2 flow control of a large transfer on the first can delay a heartbeat or a vote
  on the second.
* Two lanes, each one long-lived client-streaming call per address (:class:`PeerStream`):
  :data:`BULK` (``SendStream``, replication traffic, on the main connection) and
  :data:`PRIORITY` (``PriorityStream``, the small priority messages, on the priority
  connection). Before the first stream of a lane to an address is opened it is probed (an
  empty stream, closed at once): a peer that answers ``UNIMPLEMENTED`` is marked as not
  supporting that lane's stream and is sent unary ``Send`` calls instead (on the lane's
  connection), until the mark expires (30 s) and the next message probes again. Opening is
  single-flight per lane and address.
* A watcher task per stream waits for the server to end the call. Whatever ends it (an error
  status from the peer's handler, a lost connection, a graceful close) makes the stream terminal:
  it is evicted, the next send on that lane raises that error, the one after that opens a new
  stream. Any failure or cancellation in the middle of writing to a stream evicts it too,
  since a half-written message leaves the stream unusable.
* Snapshots are streamed with ``SendSnapshot`` on the main connection: the metadata frame
  first, payload chunks after, ``final`` on the last chunk (one chunk with metadata and
  ``final`` for an empty payload). The chunks come from a bounded queue that a trio task of the
  caller fills (the payload is read in trio, never here); ``None`` ends the payload.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from typing import Any

import attrs
from grpclib.client import Channel
from grpclib.config import Configuration
from grpclib.const import Cardinality, Status
from grpclib.encoding.proto import ProtoCodec
from grpclib.exceptions import GRPCError

from trio_raft.errors import PeerStreamClosedError, SendStreamDisabledError, TransportClosedError
from trio_raft.transport._proto.trio_raft.transport.v1 import (
    Ack,
    RaftMessage,
    RaftTransportStub,
    SnapshotChunk,
)
from trio_raft.transport.base import split_address
from trio_raft.transport.routes import PRIORITY_ROUTE, SNAPSHOT_ROUTE, STREAM_ROUTE

log = logging.getLogger(__name__)


class CappedCodec(ProtoCodec):
    """grpclib's protobuf codec with the transport's message size cap on both directions, and
    undecodable bytes reported as ``INVALID_ARGUMENT`` (not as a server error)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes

    def encode(self, message: Any, message_type: Any) -> bytes:
        data = super().encode(message, message_type)
        if len(data) > self.max_bytes:
            raise GRPCError(Status.RESOURCE_EXHAUSTED,
                            f"message of {len(data)} bytes exceeds limit {self.max_bytes}")
        return data

    def decode(self, data: bytes, message_type: Any) -> Any:
        if len(data) > self.max_bytes:
            raise GRPCError(Status.RESOURCE_EXHAUSTED,
                            f"message of {len(data)} bytes exceeds limit {self.max_bytes}")
        try:
            return super().decode(data, message_type)
        except Exception as exc:
            raise GRPCError(Status.INVALID_ARGUMENT, f"undecodable protobuf: {exc}") from None


@attrs.frozen(slots=True)
class Lane:
    """A client-streaming lane: its name, its route, and whether it has its own connection."""

    name: str
    route: str
    own_connection: bool


#: Replication traffic: ``SendStream`` on the peer's main connection.
BULK = Lane("bulk", STREAM_ROUTE, own_connection=False)
#: The priority types: ``PriorityStream`` on a connection of their own.
PRIORITY = Lane("priority", PRIORITY_ROUTE, own_connection=True)

_Key = tuple[str, str]  # (lane name, address)


@attrs.define(slots=True)
class ClientCounters:
    """Counters written on the loop thread only. ``stream_*``: the bulk lane;
    ``priority_*``: the priority lane; ``*_fallbacks``: the lane's stream found unusable (the
    peer answered the probe UNIMPLEMENTED, or the lane was turned off meanwhile): from then on
    the lane's messages go by unary ``Send`` (counted in ``unary_messages``) until the mark
    expires."""

    stream_opens: int = 0
    stream_reconnects: int = 0
    stream_messages: int = 0
    stream_fallbacks: int = 0
    priority_opens: int = 0
    priority_reconnects: int = 0
    priority_messages: int = 0
    priority_fallbacks: int = 0
    unary_messages: int = 0
    snapshots_sent: int = 0
    snapshot_bytes_sent: int = 0

    def lane_opened(self, lane: Lane, reconnect: bool) -> None:
        if lane is PRIORITY:
            self.priority_opens += 1
            self.priority_reconnects += reconnect
        else:
            self.stream_opens += 1
            self.stream_reconnects += reconnect

    def lane_message(self, lane: Lane) -> None:
        if lane is PRIORITY:
            self.priority_messages += 1
        else:
            self.stream_messages += 1

    def lane_fallback(self, lane: Lane) -> None:
        if lane is PRIORITY:
            self.priority_fallbacks += 1
        else:
            self.stream_fallbacks += 1


@attrs.define(slots=True)
class ClientConfig:
    ssl_context: ssl.SSLContext | None = None
    server_name: str | None = None
    max_message_bytes: int = 64 << 20
    reprobe_after: float = 30.0
    open_timeout: float = 5.0


class PeerStream:
    """One long-lived call of a lane's streaming RPC to an address."""

    def __init__(self, client: ClientSide, lane: Lane, address: str, channel: Channel) -> None:
        self.client = client
        self.lane = lane
        self.address = address
        self.key: _Key = (lane.name, address)
        self.channel = channel
        self.lock = asyncio.Lock()
        self.stream: Any = None
        self.task: asyncio.Task[None] | None = None
        self.error: BaseException | None = None
        self.closed = False
        #: True when the peer (or the connection) ended the call, not a local close.
        self.remote_end = False

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        self.task = loop.create_task(self._run(ready),
                                     name=f"raft-{self.lane.name}-{self.address}")
        try:
            await ready
        except BaseException:
            self.task.cancel()
            raise

    async def _run(self, ready: asyncio.Future[None]) -> None:
        try:
            async with self.channel.request(
                self.lane.route, Cardinality.STREAM_UNARY, RaftMessage, Ack
            ) as stream:
                await stream.send_request()
                self.stream = stream
                ready.set_result(None)
                await stream.recv_message()  # returns when the server ends the call
            self.error = PeerStreamClosedError(f"address={self.address}")
            self.remote_end = True
        except asyncio.CancelledError:
            self.error = self.error or PeerStreamClosedError(f"address={self.address} (closed)")
            if not ready.done():
                ready.cancel()
            raise
        except Exception as exc:
            self.error = exc
            self.remote_end = True
            if not ready.done():
                ready.set_exception(exc)
            else:
                log.debug("%s stream to %s ended: %r", self.lane.name, self.address, exc)
        finally:
            self.closed = True
            self.client.forget_stream(self)

    def terminal_error(self) -> BaseException:
        return self.error or PeerStreamClosedError(f"address={self.address}")

    async def send(self, msg: RaftMessage) -> None:
        async with self.lock:
            if self.closed:
                raise self.terminal_error()
            try:
                await self.stream.send_message(msg)
            except asyncio.CancelledError:
                self.close()
                raise
            except Exception as exc:
                # The peer may have ended the call with a status a moment ago (a refused
                # message); the watcher is about to read it. Report that status, not the reset.
                if self.task is not None and not self.task.done():
                    await asyncio.wait({self.task}, timeout=0.2)
                self.close()
                if self.remote_end and isinstance(self.error, GRPCError):
                    self.client.stream_errors.pop(self.key, None)
                    raise _fresh(self.error) from exc
                raise
            if self.closed:
                raise self.terminal_error()

    def close(self) -> None:
        self.closed = True
        self.client.forget_stream(self)
        if self.task is not None and not self.task.done():
            self.task.cancel()


class ClientSide:
    """Channels, lanes and snapshot sends (runs on the loop). ``stream_enabled``: the bulk
    lane streams (else every replication message is a unary call on the main connection);
    ``priority_enabled``: the priority lane streams on its own connection (else every priority
    message is a unary call on the main connection, as before the lane existed)."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.counters = ClientCounters()
        self.channels: dict[_Key, Channel] = {}
        self.streams: dict[_Key, PeerStream] = {}
        self.opening: dict[_Key, asyncio.Task[PeerStream]] = {}
        self.unsupported: dict[_Key, float] = {}
        self.had_stream: set[_Key] = set()
        self.stream_errors: dict[_Key, BaseException] = {}
        self.stream_enabled = True
        self.priority_enabled = True
        self.closed = False
        self._codec = CappedCodec(config.max_message_bytes)
        self._snapshot_tasks: set[asyncio.Task[Any]] = set()

    # -- channels ---------------------------------------------------------------------------------

    def channel(self, address: str, *, priority: bool = False) -> Channel:
        """The main connection to ``address``, or (``priority``) the priority lane's."""
        if self.closed:
            raise TransportClosedError()
        key = ("priority" if priority else "main", address)
        ch = self.channels.get(key)
        if ch is None:
            host, port = split_address(address)
            config = None
            if self.config.ssl_context is not None and self.config.server_name:
                config = Configuration(ssl_target_name_override=self.config.server_name)
            ch = Channel(host, port, ssl=self.config.ssl_context, codec=self._codec,
                         config=config)
            self.channels[key] = ch
        return ch

    def _lane_channel(self, lane: Lane, address: str) -> Channel:
        return self.channel(address, priority=lane.own_connection)

    def close_address(self, address: str) -> None:
        """Drop the channels, streams, probe state and marks of one address."""
        for lane in (BULK, PRIORITY):
            key = (lane.name, address)
            ps = self.streams.pop(key, None)
            if ps is not None:
                ps.close()
            opening = self.opening.pop(key, None)
            if opening is not None:
                opening.cancel()
            self.unsupported.pop(key, None)
            self.had_stream.discard(key)
            self.stream_errors.pop(key, None)
        for which in ("main", "priority"):
            ch = self.channels.pop((which, address), None)
            if ch is not None:
                ch.close()

    async def aclose(self) -> None:
        """Cancel streams and snapshot sends, close channels. Bounded by the caller."""
        self.closed = True
        tasks: list[asyncio.Task[Any]] = []
        for ps in list(self.streams.values()):
            ps.close()
            if ps.task is not None:
                tasks.append(ps.task)
        for task in [*self.opening.values(), *self._snapshot_tasks]:
            task.cancel()
            tasks.append(task)
        if tasks:
            await asyncio.wait(tasks, timeout=0.5)
        for ch in self.channels.values():
            ch.close()
        self.channels.clear()
        self.streams.clear()
        self.opening.clear()

    # -- regular messages -------------------------------------------------------------------------

    async def deliver(self, address: str, frame: bytes, priority: bool,
                      timeout: float) -> float:
        """Send one frame on its lane: the priority lane for a priority type, else the bulk
        lane; by a unary call where the lane does not stream. Returns the
        ``time.perf_counter()`` instant the frame was written (or the call answered)."""
        msg = RaftMessage(message=frame)
        if priority:
            lane, streaming = PRIORITY, self.priority_enabled
        else:
            lane, streaming = BULK, self.stream_enabled
        async with asyncio.timeout(timeout):
            if streaming and not self._marked_unsupported(lane, address):
                try:
                    await self._stream_send(lane, address, msg)
                    return time.perf_counter()
                except GRPCError as exc:
                    if exc.status is not Status.UNIMPLEMENTED:
                        raise
                    self._mark_unsupported(lane, address)
                except SendStreamDisabledError:
                    pass
                self.counters.lane_fallback(lane)
            channel = self._lane_channel(lane, address) if streaming else self.channel(address)
            await RaftTransportStub(channel).send(msg)
            self.counters.unary_messages += 1
            return time.perf_counter()

    def _marked_unsupported(self, lane: Lane, address: str) -> bool:
        key = (lane.name, address)
        marked = self.unsupported.get(key)
        if marked is None:
            return False
        if asyncio.get_running_loop().time() - marked >= self.config.reprobe_after:
            del self.unsupported[key]
            return False
        return True

    def _mark_unsupported(self, lane: Lane, address: str) -> None:
        log.info("peer %s does not implement %s; using unary Send", address,
                 lane.route.rsplit("/", 1)[1])
        key = (lane.name, address)
        self.unsupported[key] = asyncio.get_running_loop().time()
        ps = self.streams.pop(key, None)
        if ps is not None:
            ps.close()

    def _lane_enabled(self, lane: Lane) -> bool:
        return self.priority_enabled if lane is PRIORITY else self.stream_enabled

    async def _stream_send(self, lane: Lane, address: str, msg: RaftMessage) -> None:
        key = (lane.name, address)
        ps = self.streams.get(key)
        if ps is None or ps.closed:
            err = self.stream_errors.pop(key, None)
            if err is not None:
                raise _fresh(err)
            task = self.opening.get(key)
            if task is None:
                task = asyncio.get_running_loop().create_task(self._open_stream(lane, address))
                self.opening[key] = task
                task.add_done_callback(lambda t: self._opened(key, t))
            ps = await asyncio.shield(task)
        await ps.send(msg)
        self.counters.lane_message(lane)

    def _opened(self, key: _Key, task: asyncio.Task[PeerStream]) -> None:
        if self.opening.get(key) is task:
            del self.opening[key]
        if not task.cancelled():
            task.exception()  # mark retrieved: the waiters got it

    async def _open_stream(self, lane: Lane, address: str) -> PeerStream:
        if not self._lane_enabled(lane):
            raise SendStreamDisabledError()
        channel = self._lane_channel(lane, address)
        async with asyncio.timeout(self.config.open_timeout):
            # Probe: an empty stream tells whether the peer implements the lane's RPC at all,
            # before any message is committed to a stream that would be refused.
            async with channel.request(lane.route, Cardinality.STREAM_UNARY, RaftMessage,
                                       Ack) as probe:
                await probe.send_request(end=True)
                try:
                    await probe.recv_message()
                except GRPCError as exc:
                    if _route_not_found(probe, exc):
                        raise GRPCError(Status.UNIMPLEMENTED, "method not found") from None
                    raise
            ps = PeerStream(self, lane, address, channel)
            await ps.open()
        if (not self._lane_enabled(lane) or self.closed
                or self.channels.get(("priority" if lane.own_connection else "main", address))
                is not channel):
            ps.close()
            raise SendStreamDisabledError()
        self.counters.lane_opened(lane, reconnect=ps.key in self.had_stream)
        self.had_stream.add(ps.key)
        self.streams[ps.key] = ps
        return ps

    def forget_stream(self, ps: PeerStream) -> None:
        if self.streams.get(ps.key) is ps:
            del self.streams[ps.key]
            if ps.remote_end and ps.error is not None and not self.closed:
                # The peer ended the stream (e.g. its handler refused a message): the next send
                # on this lane reports that error once, so it is counted; the one after opens a
                # new stream.
                self.stream_errors[ps.key] = ps.error

    # -- snapshots --------------------------------------------------------------------------------

    async def send_snapshot(self, address: str, header: bytes,
                            chunks: asyncio.Queue[bytes | None], timeout: float) -> int:
        """Stream one snapshot whose payload chunks arrive on ``chunks`` (``None`` ends it);
        returns the payload bytes sent."""
        task = asyncio.current_task()
        assert task is not None
        self._snapshot_tasks.add(task)
        try:
            async with asyncio.timeout(timeout):
                return await self._stream_snapshot(address, header, chunks)
        finally:
            self._snapshot_tasks.discard(task)

    async def _stream_snapshot(self, address: str, header: bytes,
                               chunks: asyncio.Queue[bytes | None]) -> int:
        channel = self.channel(address)
        sent = 0
        async with channel.request(SNAPSHOT_ROUTE, Cardinality.STREAM_UNARY, SnapshotChunk,
                                   Ack) as stream:
            await stream.send_request()
            # One chunk of look-ahead tells which chunk is the last one, so the final flag
            # rides on real data (an exact multiple of the chunk size adds no empty chunk).
            current = await chunks.get()
            metadata = header
            while True:
                nxt = await chunks.get() if current is not None else None
                data = current or b""
                final = nxt is None
                await stream.send_message(
                    SnapshotChunk(metadata=metadata, chunk=data, final=final), end=final)
                sent += len(data)
                metadata = b""
                if final:
                    break
                current = nxt
            await stream.recv_message()
        self.counters.snapshots_sent += 1
        self.counters.snapshot_bytes_sent += sent
        return sent


def _route_not_found(call: Any, exc: GRPCError) -> bool:
    """Whether ``exc`` is grpclib's client failing on a server's "method not found" answer.

    A grpclib server answers a route it does not know with headers holding ``grpc-status``
    UNIMPLEMENTED but no content-type, which grpclib's client reports as UNKNOWN ("Missing
    content-type header"); the headers it received tell what the server meant. (Servers built
    from an older protos/transport.proto answer PriorityStream like this.)"""
    if exc.status is not Status.UNKNOWN:
        return False
    headers = getattr(getattr(call, "_stream", None), "headers", None) or ()
    return dict(headers).get("grpc-status") == str(Status.UNIMPLEMENTED.value)


def _fresh(err: BaseException) -> BaseException:
    """A new exception equal to ``err`` (a stored exception is not raised twice)."""
    if isinstance(err, GRPCError):
        return GRPCError(err.status, err.message, err.details)
    if isinstance(err, PeerStreamClosedError):
        return PeerStreamClosedError(*err.args)
    return PeerStreamClosedError(f"{type(err).__name__}: {err}")
