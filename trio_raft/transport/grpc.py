"""GRPCTransport: the trio-facing gRPC transport (grpclib on an asyncio loop in a thread).

Lifecycle::

    transport = GRPCTransport(peers, local_address="127.0.0.1:7001")
    transport.set_handler(engine_step)              # async fn(message) -> None, may raise
    port = await nursery.start(transport.serve)     # listens on local_address (or host, port)
    await transport.dispatch(message)               # from the engine's sender tasks
    await transport.aclose()                        # or cancel the nursery: same clean stop

or ``async with GRPCTransport(...) as transport:``. ``serve`` starts the asyncio thread, the trio
nursery that inbound calls run in, and the grpclib server; it returns only after all of them are
stopped. Closing cancels open streams and in-flight calls, closes every connection and joins the
thread, normally within a few tens of milliseconds and bounded to about a second.

The client and server halves live in :mod:`.grpc_client` and :mod:`.grpc_server`; this module
holds the configuration, the peer table, the trio side of snapshot reception and the counters.
"""

from __future__ import annotations

import contextlib
import logging
import os
import ssl
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import IO, Any

import attrs
import trio
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError
from grpclib.server import Server

from trio_raft.core.messages import PRIORITY_MESSAGE_TYPES, Message, MessageType
from trio_raft.errors import (
    CodecError,
    DispatchError,
    PeerStreamClosedError,
    ReceivedFSMSnapshotStaleError,
    SendStreamDisabledError,
    TransportClosedError,
    TransportHandlerNilError,
    TransportPeerUnknownError,
)
from trio_raft.transport.base import (
    GRPC_CODE_NAMES,
    ErrorCounter,
    Handler,
    TransportPeer,
    split_address,
)
from trio_raft.transport.bridge import AsyncioBridge, TrioPortal
from trio_raft.transport.codec import MAX_FRAME_BYTES, encode_message, encode_snapshot_header
from trio_raft.transport.grpc_client import CappedCodec, ClientConfig, ClientSide, PayloadSource
from trio_raft.transport.grpc_server import RaftTransportService
from trio_raft.transport.spool import DEFAULT_MAX_SNAPSHOT_BYTES, SnapshotSpool

log = logging.getLogger(__name__)

DEFAULT_DISPATCH_TIMEOUT = 5.0
DEFAULT_SNAPSHOT_TIMEOUT = 30 * 60.0
DEFAULT_SNAPSHOT_CHUNK_BYTES = 16 << 20
DEFAULT_REPROBE_AFTER = 30.0
#: Magic of the seed's 17-byte snapshot token ("EKVT" | 0x01 | index u64 BE | crc u32 BE).
DEFAULT_TOKEN_MAGIC = b"EKVT"
_STOP_BUDGET = 0.5


def default_token_decoder(data: bytes) -> int | None:
    """The index named by a 17-byte snapshot token, or ``None`` for an inline payload."""
    if len(data) == 17 and data[:4] == DEFAULT_TOKEN_MAGIC and data[4] == 1:
        return int.from_bytes(data[5:13], "big")
    return None


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
    return "Unknown"


@attrs.define(slots=True)
class _TrioCounters:
    dispatched: int = 0
    snapshots_dispatched: int = 0
    snapshots_finalized: int = 0


class GRPCTransport:
    """The gRPC implementation of :class:`~trio_raft.transport.base.Transport`."""

    def __init__(
        self,
        peers: Iterable[TransportPeer] = (),
        *,
        local_address: str | None = None,
        server_ssl: ssl.SSLContext | None = None,
        client_ssl: ssl.SSLContext | None = None,
        tls_server_name: str | None = None,
        send_stream: bool = True,
        dispatch_timeout: float = DEFAULT_DISPATCH_TIMEOUT,
        snapshot_timeout: float = DEFAULT_SNAPSHOT_TIMEOUT,
        snapshot_chunk_bytes: int = DEFAULT_SNAPSHOT_CHUNK_BYTES,
        max_snapshot_bytes: int = DEFAULT_MAX_SNAPSHOT_BYTES,
        max_message_bytes: int = MAX_FRAME_BYTES,
        stream_reprobe_after: float = DEFAULT_REPROBE_AFTER,
    ) -> None:
        if not 0 < snapshot_chunk_bytes <= max_message_bytes - (1 << 20):
            raise ValueError("snapshot_chunk_bytes must be positive and leave 1 MiB of headroom "
                             "below max_message_bytes")
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
        self._dispatch_timeout = dispatch_timeout
        self._snapshot_timeout = snapshot_timeout
        self._chunk_bytes = snapshot_chunk_bytes
        self._max_snapshot_bytes = max_snapshot_bytes
        self._max_message_bytes = max_message_bytes
        self._handler: Handler | None = None
        self._spool_dir: str | None = None
        self._fsm_snap_dir: str | None = None
        self._payload_reader: Callable[[int], bytes] | None = None
        self._payload_opener: Callable[[int], IO[bytes]] | None = None
        self._protect: Callable[[int], object] | None = None
        self._unprotect: Callable[[int], object] | None = None
        self._prepare: Callable[[int], Awaitable[object]] | None = None
        self._finalized_hook: Callable[[int, str, int], object] | None = None
        self._applied_index: Callable[[], int] | None = None
        self._token_encoder: Callable[[int, int], bytes] | None = None
        self._token_decoder: Callable[[bytes], int | None] = default_token_decoder
        self.service = RaftTransportService(self)
        self._errors = ErrorCounter()
        self._counters = _TrioCounters()
        self._bridge: AsyncioBridge | None = None
        self._portal: TrioPortal | None = None
        self._client: ClientSide | None = None
        self._server: Server | None = None
        self._started = False
        self._closed = False
        self._close_requested = trio.Event()
        self._stopped = trio.Event()
        self._cm_nursery: Any = None

    # -- configuration (the seed's setters) ------------------------------------------------------

    def set_handler(self, handler: Handler | None) -> None:
        self._handler = handler

    def set_spool_dir(self, path: str | os.PathLike[str] | None) -> None:
        self._spool_dir = os.fspath(path) if path is not None else None

    def set_fsm_snap_dir(self, path: str | os.PathLike[str] | None) -> None:
        self._fsm_snap_dir = os.fspath(path) if path is not None else None

    def set_fsm_payload_reader(self, fn: Callable[[int], bytes] | None) -> None:
        """``fn(index) -> payload bytes`` (blocking, CRC-checked by the storage layer)."""
        self._payload_reader = fn

    def set_fsm_payload_opener(self, fn: Callable[[int], IO[bytes]] | None) -> None:
        """``fn(index) -> binary file`` positioned at the payload, footer excluded (blocking)."""
        self._payload_opener = fn

    def set_fsm_snapshot_protection(self, protect: Callable[[int], object] | None,
                                    unprotect: Callable[[int], object] | None) -> None:
        """``protect(index)`` runs (in trio) before a received ``.fsm`` is finalized and may raise
        :class:`~trio_raft.errors.ReceivedFSMSnapshotStaleError`; ``unprotect(index)`` undoes it
        when finalizing or the handler fails."""
        self._protect, self._unprotect = protect, unprotect

    def set_fsm_snapshot_prepare(self, fn: Callable[[int], Awaitable[object]] | None) -> None:
        """``async fn(index)``, awaited once a snapshot's metadata arrives, before spooling."""
        self._prepare = fn

    def set_fsm_snapshot_finalized_hook(self, fn: Callable[[int, str, int], object] | None,
                                        ) -> None:
        """``fn(index, path, crc)``, called (in trio) after a received ``.fsm`` is renamed."""
        self._finalized_hook = fn

    def set_applied_index_getter(self, fn: Callable[[], int] | None) -> None:
        """Snapshots at or below ``fn()`` are refused as stale."""
        self._applied_index = fn

    def set_snapshot_token_encoder(self, fn: Callable[[int, int], bytes] | None) -> None:
        """``fn(index, crc) -> Snapshot.data`` for a finalized ``.fsm`` (default: empty data)."""
        self._token_encoder = fn

    def set_snapshot_token_decoder(self, fn: Callable[[bytes], int | None] | None) -> None:
        """``fn(data) -> index`` when ``data`` is a token, else ``None`` (inline payload)."""
        self._token_decoder = fn or default_token_decoder

    def set_send_stream_enabled(self, enabled: bool) -> None:
        """Disable (closing every open stream) or re-enable the SendStream lane."""
        self._send_stream = enabled
        if self._bridge is not None and self._client is not None:
            self._bridge.run_sync_soon(self._client.set_stream_enabled, enabled)

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
        this transport's service plus ``handlers``. ``task_status.started`` gets the bound port."""
        if self._closed:
            raise TransportClosedError()
        if self._started:
            raise RuntimeError("GRPCTransport.serve is already running")
        self._started = True
        if host is None and port is None and self.local_address:
            host, port = split_address(self.local_address)
        listen = host is not None or port is not None
        bridge = AsyncioBridge(name="trio-raft-grpc")
        try:
            await bridge.start()
            async with trio.open_nursery() as nursery:
                self._bridge = bridge
                self._client = ClientSide(self._client_config)
                self._client.stream_enabled = self._send_stream
                self._portal = TrioPortal(nursery)
                try:
                    bound = None
                    if listen:
                        bound = await bridge.run(self._start_server, host, port, list(handlers))
                    task_status.started(bound)
                    await self._close_requested.wait()
                finally:
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
            self._closed = True
            self._stopped.set()

    async def _start_server(self, host: str | None, port: int | None,
                            handlers: list[Any]) -> int | None:
        server = Server([self.service, *handlers], codec=CappedCodec(self._max_message_bytes))
        self._server = server
        await server.start(host, port, ssl=self._server_ssl)
        listener = getattr(server, "_server", None)  # grpclib keeps the asyncio server private
        sockets = listener.sockets if listener is not None else ()
        return int(sockets[0].getsockname()[1]) if sockets else port

    async def _stop_on_loop(self) -> None:
        server = self._server
        if server is not None:
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

    async def dispatch(self, message: Message) -> None:
        """Send one message to ``message.to``. Returns when the message is written to the peer's
        stream or acknowledged by a unary call; raises :class:`DispatchError` (with ``code``),
        :class:`TransportPeerUnknownError` or :class:`TransportClosedError` on failure."""
        if message.type == MessageType.SNAP or (message.snapshot is not None
                                                and message.snapshot.data):
            await self.dispatch_snapshot(message)
            return
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
        use_stream = self._send_stream and message.type not in PRIORITY_MESSAGE_TYPES
        try:
            await bridge.run(client.deliver, peer.address, frame, use_stream,
                             self._dispatch_timeout)
        except Exception as exc:
            raise self._failure(exc) from None
        self._counters.dispatched += 1

    send = dispatch

    async def dispatch_snapshot(self, message: Message) -> None:
        """Stream a ``MsgSnap`` and its payload (from the ``.fsm`` file named by a token through
        the opener or reader, else ``Snapshot.data`` itself); raises like :meth:`dispatch`."""
        peer = self._peer_for(message)
        bridge, client = self._running()
        snap = message.snapshot
        try:
            if snap is None:
                raise CodecError("snapshot message without a snapshot")
            header = encode_snapshot_header(message, max_bytes=self._max_message_bytes)
        except CodecError as exc:
            raise self._failure(exc) from None
        source = self._payload_source(snap.data)
        try:
            await bridge.run(client.send_snapshot, peer.address, header, source,
                             self._chunk_bytes, self._snapshot_timeout)
        except Exception as exc:
            raise self._failure(exc) from None
        self._counters.snapshots_dispatched += 1

    send_snapshot = dispatch_snapshot

    def _payload_source(self, data: bytes) -> PayloadSource:
        index = self._token_decoder(data) if data else None
        if index is not None:
            opener, reader = self._payload_opener, self._payload_reader
            if opener is not None:
                return PayloadSource(opener=lambda: opener(index))
            if reader is not None:
                return PayloadSource(reader=lambda: reader(index))
            log.warning("snapshot token for index %d but no payload opener or reader is set; "
                        "sending the token bytes inline", index)
        return PayloadSource(inline=data)

    # -- receiving (called through the portal, in trio) --------------------------------------------

    @property
    def max_message_bytes(self) -> int:
        return self._max_message_bytes

    @property
    def max_snapshot_bytes(self) -> int:
        return self._max_snapshot_bytes

    def spool_directory(self) -> str:
        return self._fsm_snap_dir or self._spool_dir or tempfile.gettempdir()

    def fsm_mode_for(self, index: int) -> bool:
        return self._fsm_snap_dir is not None and index != 0

    async def deliver_inbound(self, message: Message) -> None:
        handler = self._handler
        if handler is None:
            raise TransportHandlerNilError()
        await handler(message)

    async def prepare_snapshot(self, index: int) -> None:
        self._check_not_stale(index)
        if self._prepare is not None:
            await self._prepare(index)

    def _check_not_stale(self, index: int) -> None:
        if self._applied_index is not None:
            applied = self._applied_index()
            if index <= applied:
                raise ReceivedFSMSnapshotStaleError(f"index={index} applied={applied}")

    async def dispatch_snapshot_spool(self, message: Message, spool: SnapshotSpool) -> None:
        """Complete a received snapshot: with an fsm dir, finalize ``spool`` as the ``.fsm`` file
        (CRC computed while spooling), put the token in ``Snapshot.data`` and run the handler;
        without one, hand the payload over inline. Closes ``spool`` in every case; on failure
        the finalized file is removed and the protection released."""
        try:
            snap = message.snapshot
            if snap is None:
                raise CodecError("snapshot message without a snapshot")
            if self._handler is None:
                raise TransportHandlerNilError()
            index = snap.metadata.index
            if not self.fsm_mode_for(index):
                data = await trio.to_thread.run_sync(spool.read_all)
                await self.deliver_inbound(
                    attrs.evolve(message, snapshot=attrs.evolve(snap, data=data)))
                return
            assert self._fsm_snap_dir is not None
            self._check_not_stale(index)
            if self._protect is not None:
                self._protect(index)
            path: str | None = None
            try:
                path = await trio.to_thread.run_sync(spool.finalize_as_fsm,
                                                     self._fsm_snap_dir, index)
                self._counters.snapshots_finalized += 1
                if self._finalized_hook is not None:
                    self._finalized_hook(index, path, spool.crc)
                data = (self._token_encoder(index, spool.crc)
                        if self._token_encoder is not None else b"")
                await self.deliver_inbound(
                    attrs.evolve(message, snapshot=attrs.evolve(snap, data=data)))
            except BaseException:
                with trio.CancelScope(shield=True):
                    if path is not None:
                        await trio.to_thread.run_sync(_unlink_quietly, path)
                    if self._unprotect is not None:
                        self._unprotect(index)
                raise
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(spool.close)

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
        out["peers"] = len(self._peers)
        out["dispatch_errors"] = self._errors.total
        out["dispatch_errors_by_code"] = dict(self._errors.by_code)
        return out


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
