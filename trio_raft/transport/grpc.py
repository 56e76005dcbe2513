"""GRPCTransport: the trio-facing gRPC transport (grpclib on an asyncio loop in a thread).

Lifecycle::

    transport = GRPCTransport(peers, local_address="127.0.0.1:7001")
    transport.attach(engine_step, exchange)         # async fn(message) -> None, may raise
    port = await nursery.start(transport.serve)     # listens on local_address (or host, port)
    await transport.send(message)                   # from the engine's sender tasks
    await transport.send_snapshot(snap_message)
    await transport.detach()                        # refuse inbound, cancel incoming transfers
    await transport.aclose()                        # or cancel the nursery: same clean stop

or ``async with GRPCTransport(...) as transport:``. ``serve`` starts the asyncio thread, the trio
nursery that inbound calls and incoming snapshot transfers run in, and the grpclib server; it
returns only after all of them are stopped. Closing cancels open streams, in-flight calls and
snapshot transfers in both directions, closes every connection and joins the thread, normally
within a few tens of milliseconds and bounded to about a second.

Snapshot transfers are trio tasks (see :mod:`.snapshot_transfer`): an incoming one runs in this
transport's nursery (the asyncio handler only pushes chunks to it), an outgoing one runs in the
caller of :meth:`GRPCTransport.send_snapshot` (the asyncio side only writes the chunks it is
given to the gRPC stream). The client and server halves live in :mod:`.grpc_client` and
:mod:`.grpc_server`; this module holds the configuration, the peer table, the trio side of
snapshot transfers and the counters.

The replication and priority lanes are native by default (``native_lanes``): their streams
are written (and, without TLS, served) on trio's thread with ``h2`` (:mod:`.native_lanes`), so
a raft message crosses no thread between two engines; everything else (unary calls, snapshots,
the application's services, peers that do not serve a lane's route) goes through grpclib as
above.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import attrs
import trio
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError

from trio_raft.core.messages import PRIORITY_MESSAGE_TYPES, Message, MessageType
from trio_raft.errors import (
    CodecError,
    DispatchError,
    FSMSnapshotError,
    PeerStreamClosedError,
    SendStreamDisabledError,
    SnapshotTransferCancelledError,
    TransportAttachedError,
    TransportBindError,
    TransportClosedError,
    TransportHandlerNilError,
    TransportPeerUnknownError,
)
from trio_raft.storage.snapshot_exchange import (
    DEFAULT_MAX_SNAPSHOT_BYTES,
    OutgoingPayload,
    SnapshotExchange,
)
from trio_raft.transport.base import (
    GRPC_CODE_NAMES,
    RECEIVED_AT,
    ErrorCounter,
    Handler,
    TransportPeer,
    split_address,
)
from trio_raft.transport.bridge import AsyncioBridge, TrioPortal
from trio_raft.transport.codec import MAX_FRAME_BYTES, encode_message, encode_snapshot_header
from trio_raft.transport.grpc_client import CappedCodec, ClientConfig, ClientSide
from trio_raft.transport.grpc_h2server import LimitedServer
from trio_raft.transport.grpc_limits import ReceiveBudget, ServerLimits
from trio_raft.transport.grpc_server import RaftTransportService
from trio_raft.transport.native_lanes import LanePolicy, NativeLanes
from trio_raft.transport.routes import RAFT_ROUTES
from trio_raft.transport.snapshot_transfer import (
    ChunkPipe,
    InlinePayload,
    TransferRegistry,
    land_snapshot,
    stream_through_loop,
)

log = logging.getLogger(__name__)

DEFAULT_DISPATCH_TIMEOUT = 5.0
DEFAULT_SNAPSHOT_TIMEOUT = 30 * 60.0
DEFAULT_SNAPSHOT_CHUNK_BYTES = 1 << 20
DEFAULT_REPROBE_AFTER = 30.0
_STOP_BUDGET = 0.5


def classify(exc: BaseException) -> str:
    """The counter key of a client-side failure (a CamelCase gRPC status name)."""
    if isinstance(exc, DispatchError):
        return exc.code
    if isinstance(exc, GRPCError):
        return GRPC_CODE_NAMES.get(exc.status.value, "Unknown")
    if isinstance(exc, TimeoutError):
        return "DeadlineExceeded"
    if isinstance(exc, StreamTerminatedError | ProtocolError | OSError | PeerStreamClosedError
                  | SendStreamDisabledError | ssl.SSLError):
        return "Unavailable"
    if isinstance(exc, CodecError):
        return "InvalidArgument"
    if isinstance(exc, FSMSnapshotError):
        return "DataLoss"
    return "Unknown"


@attrs.define(slots=True)
class _TrioCounters:
    dispatched: int = 0
    snapshots_dispatched: int = 0
    snapshots_finalized: int = 0
    snapshots_cancelled: int = 0


class GRPCTransport:
    """The gRPC implementation of :class:`~trio_raft.transport.base.ServingTransport`.

    ``send_stream=False`` sends replication messages with unary ``Send`` calls (no
    ``SendStream``); ``priority_stream=False`` sends the priority types with unary ``Send``
    calls on the peer's main connection, as before the priority lane existed (no
    ``PriorityStream``, no second connection).
    ``max_snapshot_bytes`` caps a received payload (the attached exchange has its own cap too).
    ``max_message_bytes`` caps one gRPC message of the raft service, sent or received;
    ``limits`` are the server's other limits (connections, streams, windows, the receive
    budget, the cap of the messages of application services served next to it), see
    :class:`~trio_raft.transport.grpc_limits.ServerLimits`.
    ``native_lanes=False`` keeps the lanes on grpclib too (a server in TLS always serves
    them through grpclib; a client in TLS sends them natively, in TLS).
    """

    def __init__(
        self,
        peers: Iterable[TransportPeer] = (),
        *,
        local_address: str | None = None,
        server_ssl: ssl.SSLContext | None = None,
        client_ssl: ssl.SSLContext | None = None,
        tls_server_name: str | None = None,
        send_stream: bool = True,
        priority_stream: bool = True,
        dispatch_timeout: float = DEFAULT_DISPATCH_TIMEOUT,
        snapshot_timeout: float = DEFAULT_SNAPSHOT_TIMEOUT,
        snapshot_chunk_bytes: int = DEFAULT_SNAPSHOT_CHUNK_BYTES,
        max_snapshot_bytes: int = DEFAULT_MAX_SNAPSHOT_BYTES,
        max_message_bytes: int = MAX_FRAME_BYTES,
        stream_reprobe_after: float = DEFAULT_REPROBE_AFTER,
        limits: ServerLimits | None = None,
        native_lanes: bool = True,
    ) -> None:
        if not 0 < snapshot_chunk_bytes <= max_message_bytes - (1 << 20):
            raise ValueError("snapshot_chunk_bytes must be positive and leave 1 MiB of headroom "
                             "below max_message_bytes")
        limits = limits if limits is not None else ServerLimits()
        if ReceiveBudget(limits.receive_budget_bytes).large_capacity < max(
                max_message_bytes, limits.max_app_message_bytes):
            raise ValueError("limits.receive_budget_bytes must hold at least one message of "
                             "the largest size allowed in its large-message share (7/8)")
        self._limits = limits
        self._peers: dict[int, TransportPeer] = {}
        for peer in peers:
            self.upsert_peer(peer)
        self.local_address = local_address
        self._server_ssl = server_ssl
        self._client_config = ClientConfig(
            ssl_context=client_ssl, server_name=tls_server_name,
            max_message_bytes=max_message_bytes, reprobe_after=stream_reprobe_after,
            open_timeout=dispatch_timeout)
        self._send_stream = send_stream
        self._priority_stream = priority_stream
        self._native_lanes = native_lanes
        self._native: NativeLanes | None = None
        self._dispatch_timeout = dispatch_timeout
        self._snapshot_timeout = snapshot_timeout
        self._chunk_bytes = snapshot_chunk_bytes
        self._max_snapshot_bytes = max_snapshot_bytes
        self._max_message_bytes = max_message_bytes
        self._handler: Handler | None = None
        self._snapshots: SnapshotExchange | None = None
        self._transfers = TransferRegistry()
        self.service = RaftTransportService(self)
        self._errors = ErrorCounter()
        self._counters = _TrioCounters()
        self._bridge: AsyncioBridge | None = None
        self._portal: TrioPortal | None = None
        self._client: ClientSide | None = None
        self._server: LimitedServer | None = None
        self._started = False
        self._closed = False
        self._close_requested = trio.Event()
        self._stopped = trio.Event()
        self._cm_nursery: Any = None

    # -- the engine's attachment ----------------------------------------------------------------

    def attach(self, handler: Handler, snapshots: SnapshotExchange | None) -> None:
        """Install the inbound handler and the snapshot exchange (see ``base.Transport``)."""
        if self._handler is not None:
            raise TransportAttachedError()
        self._handler = handler
        self._snapshots = snapshots

    async def detach(self) -> None:
        """Refuse inbound messages from now on (UNAVAILABLE), cancel the in-flight incoming
        snapshot transfers and return once they are gone (spools removed, files closed)."""
        self._handler = None
        self._snapshots = None
        await self._transfers.cancel_all()

    def incoming_transfers(self) -> int:
        """How many incoming snapshot transfers are running now."""
        return len(self._transfers)

    # -- peers ------------------------------------------------------------------------------------

    def upsert_peer(self, peer: TransportPeer) -> None:
        if peer.node_id == 0 or not peer.address:
            return
        old = self._peers.get(peer.node_id)
        self._peers[peer.node_id] = peer
        if old is not None and old.address != peer.address:
            self._drop_address_if_unused(old.address)

    def remove_peer(self, node_id: int) -> None:
        old = self._peers.pop(node_id, None)
        if old is not None:
            self._drop_address_if_unused(old.address)

    def peers(self) -> dict[int, TransportPeer]:
        return dict(self._peers)

    def _drop_address_if_unused(self, address: str) -> None:
        if any(p.address == address for p in self._peers.values()):
            return
        if self._bridge is not None and self._client is not None:
            self._bridge.run_sync_soon(self._client.close_address, address)
        if self._native is not None:
            self._native.close_address(address)

    # -- registration -----------------------------------------------------------------------------

    def register(self, target: Any) -> None:
        """Add the ``RaftTransport`` service to an application's grpclib server: ``target`` is a
        list of handlers (the service is appended) or a grpclib ``Server`` (the routes are added).
        That server must run on this transport's loop (see ``serve(handlers=...)``)."""
        if isinstance(target, list):
            target.append(self.service)
            return
        mapping = getattr(target, "_mapping", None)
        if isinstance(mapping, dict):
            mapping.update(self.service.__mapping__())
            return
        raise TypeError(f"cannot register the raft transport service on {target!r}")

    @property
    def portal(self) -> TrioPortal | None:
        """For coroutines on the transport's loop (e.g. application services): call into trio."""
        return self._portal

    @property
    def bridge(self) -> AsyncioBridge | None:
        return self._bridge

    # -- lifecycle --------------------------------------------------------------------------------

    async def serve(self, host: str | None = None, port: int | None = None, *,
                    handlers: Sequence[Any] = (),
                    task_status: trio.TaskStatus[int | None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the transport until :meth:`aclose` or cancellation. Listens on ``host:port``
        (default: ``local_address``; port 0 picks a free port; no address: client only), serving
        this transport's service plus ``handlers``. ``task_status.started`` gets the bound port.
        An address it cannot listen on raises :class:`~trio_raft.errors.TransportBindError`
        (the ``OSError`` as its cause) once everything it started has stopped."""
        if self._closed:
            raise TransportClosedError()
        if self._started:
            raise RuntimeError("GRPCTransport.serve is already running")
        self._started = True
        if host is None and port is None and self.local_address:
            host, port = split_address(self.local_address)
        listen = host is not None or port is not None
        bridge = AsyncioBridge(name="trio-raft-grpc")
        bind_error: TransportBindError | None = None
        try:
            await bridge.start()
            async with trio.open_nursery() as nursery:
                self._bridge = bridge
                self._client = ClientSide(self._client_config)
                self._client.stream_enabled = self._send_stream
                self._client.priority_enabled = self._priority_stream
                self._portal = TrioPortal(nursery)
                if self._native_lanes:
                    self._native = NativeLanes(
                        nursery, self._portal, self, self._limits, LanePolicy(
                            self._send_stream, self._priority_stream, self._dispatch_timeout,
                            self._client_config.reprobe_after,
                            self._client_config.ssl_context, self._client_config.server_name),
                        client=True, server=self._server_ssl is None)
                try:
                    bound = None
                    if listen:
                        bound = await bridge.run(self._start_server, host, port, list(handlers))
                    task_status.started(bound)
                    await self._close_requested.wait()
                except TransportBindError as exc:
                    bind_error = exc  # raised below, outside the nursery (not in a group)
                finally:
                    if self._native is not None:
                        self._native.aclose()
                    with trio.CancelScope(shield=True) as cs:
                        cs.deadline = trio.current_time() + _STOP_BUDGET
                        await bridge.run(self._stop_on_loop)
                    self._portal = None
                    nursery.cancel_scope.cancel()
        finally:
            self._portal = None
            with trio.CancelScope(shield=True):
                await bridge.aclose()
            self._bridge = None
            self._server = None
            self._native = None
            self._closed = True
            self._stopped.set()
        if bind_error is not None:
            raise bind_error

    async def _start_server(self, host: str | None, port: int | None,
                            handlers: list[Any]) -> int | None:
        server = LimitedServer([self.service, *handlers],
                               codec=CappedCodec(self._max_message_bytes), limits=self._limits,
                               route_caps=dict.fromkeys(RAFT_ROUTES, self._max_message_bytes))
        try:
            await server.start(host, port, ssl=self._server_ssl)
        except OSError as exc:
            where = f"{host if host is not None else '*'}:{port if port is not None else 0}"
            raise TransportBindError(f"{where}: {exc.strerror or exc}",
                                     address=where) from exc
        if self._native is not None and self._native.server is not None:
            server.adopt = self._native.hand_over
        self._server = server
        listener = getattr(server, "_server", None)  # grpclib keeps the asyncio server private
        sockets = listener.sockets if listener is not None else ()
        return int(sockets[0].getsockname()[1]) if sockets else port

    async def _stop_on_loop(self) -> None:
        server = self._server
        if server is not None:
            await server.stop_accepting()
            server.close()
        if self._client is not None:
            await self._client.aclose()
        if server is not None:
            await server.wait_closed()

    async def aclose(self) -> None:
        """Stop serving, cancel streams and calls, close connections, join the thread."""
        self._closed = True
        self._close_requested.set()
        if self._started:
            with trio.CancelScope(shield=True):
                await self._stopped.wait()

    async def __aenter__(self) -> GRPCTransport:
        self._cm_nursery = trio.open_nursery()
        nursery = await self._cm_nursery.__aenter__()
        try:
            await nursery.start(self.serve)
        except BaseException as exc:
            await self._cm_nursery.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        await self.aclose()
        result: bool | None = await self._cm_nursery.__aexit__(*exc_info)
        return result

    # -- sending ----------------------------------------------------------------------------------

    def _peer_for(self, message: Message) -> TransportPeer:
        peer = self._peers.get(message.to)
        if peer is None:
            self._count_error("Unknown", TransportPeerUnknownError(f"node_id={message.to}"))
            raise TransportPeerUnknownError(f"node_id={message.to}")
        return peer

    def _running(self) -> tuple[AsyncioBridge, ClientSide]:
        bridge, client = self._bridge, self._client
        if bridge is None or client is None or self._closed:
            raise TransportClosedError()
        return bridge, client

    def _count_error(self, code: str, exc: BaseException) -> None:
        self._errors.record(code)
        n = self._errors.total
        if n == 1 or n % 128 == 0:
            log.warning("raft dispatch failed (%d so far): code=%s: %r", n, code, exc)
        else:
            log.debug("raft dispatch failed: code=%s: %r", code, exc)

    def _failure(self, exc: Exception) -> BaseException:
        if isinstance(exc, TransportClosedError):
            return exc
        code = classify(exc)
        self._count_error(code, exc)
        err = DispatchError(f"{type(exc).__name__}: {exc}", code=code)
        err.__cause__ = exc
        return err

    async def send(self, message: Message) -> float:
        """Send one message (not ``MsgSnap``) to ``message.to``. Returns when the message is
        written to the peer's stream or acknowledged by a unary call, with the
        ``time.perf_counter()`` instant that happened; raises
        :class:`DispatchError` (with ``code``), :class:`TransportPeerUnknownError` or
        :class:`TransportClosedError` on failure."""
        if message.type == MessageType.SNAP:
            self._count_error("InvalidArgument", DispatchError())
            raise DispatchError("MsgSnap goes through send_snapshot", code="InvalidArgument")
        peer = self._peer_for(message)
        bridge, client = self._running()
        try:
            frame = encode_message(message, max_bytes=sys.maxsize)
        except CodecError as exc:
            raise self._failure(exc) from None
        if len(frame) > self._max_message_bytes:
            self._count_error("ResourceExhausted", DispatchError())
            raise DispatchError(f"frame of {len(frame)} bytes exceeds "
                                f"{self._max_message_bytes}", code="ResourceExhausted")
        priority = message.type in PRIORITY_MESSAGE_TYPES
        if self._native is not None:
            try:
                native = await self._native.send(peer.address, frame, priority)
            except Exception as exc:
                raise self._failure(exc) from None
            if native is not None:
                self._counters.dispatched += 1
                return native
        try:
            written = await bridge.run(client.deliver, peer.address, frame, priority,
                                       self._dispatch_timeout)
        except Exception as exc:
            raise self._failure(exc) from None
        self._counters.dispatched += 1
        return written

    def send_nowait(self, message: Message) -> float | None:
        """Send ``message`` now without yielding when its native lane is open and free: the
        instant it was written, or ``None`` when it was not sent (:meth:`send` then takes it,
        and reports any failure)."""
        native = self._native
        if native is None or message.type == MessageType.SNAP or self._closed:
            return None
        peer = self._peers.get(message.to)
        if peer is None:
            return None
        try:
            frame = encode_message(message, max_bytes=self._max_message_bytes)
        except CodecError:
            return None
        written = native.send_nowait(peer.address, frame,
                                     message.type in PRIORITY_MESSAGE_TYPES)
        if written is not None:
            self._counters.dispatched += 1
        return written

    async def send_snapshot(self, message: Message) -> None:
        """Stream a ``MsgSnap`` and its payload: the ``.fsm`` file its token names (through the
        attached exchange), else ``Snapshot.data`` itself. The payload is read here, in trio
        (worker threads for the file), into a bounded queue that the asyncio side writes to the
        stream; cancelling the caller stops both and closes the file before returning. Raises
        like :meth:`send` (a damaged or missing ``.fsm`` file: ``DataLoss``)."""
        peer = self._peer_for(message)
        bridge, client = self._running()
        snap = message.snapshot
        exchange = self._snapshots
        try:
            if snap is None:
                raise CodecError("snapshot message without a snapshot")
            opened = (await trio.to_thread.run_sync(exchange.open_outgoing, snap.data)
                      if exchange is not None else None)
        except (CodecError, FSMSnapshotError) as exc:
            raise self._failure(exc) from None
        try:
            # A token rides in the metadata frame: the receiver checks the CRC it computes
            # against it (older receivers ignore the frame's data).
            header = encode_snapshot_header(message, max_bytes=self._max_message_bytes,
                                            keep_token=opened is not None)
            payload: OutgoingPayload | InlinePayload = (
                opened if opened is not None else InlinePayload(snap.data))

            async def write(queue: asyncio.Queue[bytes | None]) -> None:  # on the loop
                await client.send_snapshot(peer.address, header, queue, self._snapshot_timeout)

            await stream_through_loop(bridge, payload, self._chunk_bytes, write)
        except Exception as exc:
            raise self._failure(exc) from None
        finally:
            if opened is not None:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(opened.close)
        self._counters.snapshots_dispatched += 1

    # -- receiving (called through the portal, in trio) --------------------------------------------

    @property
    def max_message_bytes(self) -> int:
        return self._max_message_bytes

    @property
    def server_limits(self) -> ServerLimits:
        return self._limits

    async def deliver_inbound(self, message: Message, received_at: float | None = None) -> None:
        handler = self._handler
        if handler is None:
            raise TransportHandlerNilError()
        RECEIVED_AT.set(received_at)
        await handler(message)

    async def receive_snapshot(self, header: Message, pipe: ChunkPipe) -> None:
        """The landing task of one incoming transfer (runs in this transport's nursery): spool
        the chunks ``pipe`` delivers, finalize, run the handler. :meth:`detach` and closing the
        transport cancel it; it cleans up before it ends."""
        handler, exchange = self._handler, self._snapshots
        if handler is None:
            raise TransportHandlerNilError()
        transfer = self._transfers.open()
        try:
            with transfer.scope:
                pipe.bind(transfer.scope)
                await land_snapshot(header, pipe.get, handler, exchange,
                                    max_bytes=self._max_snapshot_bytes)
                if exchange is not None:
                    self._counters.snapshots_finalized += 1
                return
            self._counters.snapshots_cancelled += 1  # by detach() or the sender going away
            raise SnapshotTransferCancelledError()
        except trio.Cancelled:
            self._counters.snapshots_cancelled += 1  # the transport is closing
            raise
        finally:
            self._transfers.close(transfer)

    # -- counters ---------------------------------------------------------------------------------

    def dispatch_error_count(self) -> int:
        return self._errors.total

    def dispatch_error_counts_by_code(self) -> dict[str, int]:
        return dict(self._errors.by_code)

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = attrs.asdict(self._counters)
        out.update(attrs.asdict(self.service.counters))
        client = self._client
        if client is not None:
            out.update(attrs.asdict(client.counters))
            out["open_streams"] = len(client.streams)
            out["channels"] = len(client.channels)
        if self._native is not None:
            self._native.add_stats(out)
        server = self._server
        if server is not None:
            out.update(server.stats())
        out["peers"] = len(self._peers)
        out["dispatch_errors"] = self._errors.total
        out["dispatch_errors_by_code"] = dict(self._errors.by_code)
        return out

