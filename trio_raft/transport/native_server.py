"""The server end of the native lanes: HTTP/2 (``h2``) on trio's thread.

The gRPC server (:mod:`.grpc_h2server`) accepts every connection on the transport's port. One
whose first read is a native lane's opening (:func:`~.native_wire.is_native_opening`) is
handed over before the server wrote a byte to it: its socket and the bytes already read come
here (:meth:`NativeServer.adopt`), and the connection is served in the transport's nursery.
Every message is decoded and given to the engine's handler on this thread, in order, before
the next is read; flow-control credit is returned only for what was handled, so a peer that
sends faster than the engine takes is held back by HTTP/2's windows (the server's SETTINGS are
those of :class:`~.grpc_limits.ServerLimits`).

Answers follow the gRPC server's (:mod:`.grpc_server`): a stream the client ends is answered
``Ack`` and OK; the first message that fails ends its stream at once with the status of
:func:`~.grpc_server.status_for` (trailers, then RST_STREAM NO_ERROR), as does a message that
breaks the framing (:class:`~.native_wire.MessageReader`). A route other than the two lanes'
is UNIMPLEMENTED. Native connections count against ``max_connections`` on their own, apart
from the gRPC server's. Closing the transport cancels them with its nursery.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from typing import Any

import attrs
import trio
from grpclib.const import Status
from h2.config import H2Configuration
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RequestReceived,
    StreamEnded,
    StreamReset,
)
from h2.exceptions import H2Error, ProtocolError

from trio_raft.errors import CodecError
from trio_raft.transport._proto.trio_raft.transport.v1 import RaftMessage
from trio_raft.transport.codec import decode_message
from trio_raft.transport.grpc_limits import ReceiveBudget, ServerLimits, server_connection
from trio_raft.transport.grpc_server import ServerHost, to_grpc_error
from trio_raft.transport.native_wire import (
    EMPTY_MESSAGE,
    GRPC_CONTENT_TYPE,
    NATIVE_ROUTES,
    RESPONSE_HEADERS,
    MessageReader,
    WireError,
    raft_message_frame,
    trailers,
)

log = logging.getLogger(__name__)

_RECEIVE_BYTES = 256 * 1024


@attrs.define(slots=True)
class NativeServerCounters:
    """Counters of the trio thread."""

    native_connections: int = 0
    native_connections_refused: int = 0
    messages_received: int = 0
    messages_rejected: int = 0


class NativeServer:
    """Serves the native lanes' connections handed over by the gRPC server."""

    def __init__(self, host: ServerHost, limits: ServerLimits, nursery: trio.Nursery) -> None:
        self._host = host
        self._limits = limits
        self._nursery = nursery
        self.counters = NativeServerCounters()
        self.open_connections = 0
        #: The bodies being read on native connections (the gRPC server keeps its own).
        self.budget = ReceiveBudget(limits.receive_budget_bytes)

    def adopt(self, sock: socket.socket, data: bytes) -> None:
        """Serve ``sock``, whose first bytes ``data`` were read already (trio thread)."""
        if self.open_connections >= self._limits.max_connections:
            self.counters.native_connections_refused += 1
            log.warning("refused a native lane connection: %d are open (the limit)",
                        self.open_connections)
            sock.close()
            return
        self.open_connections += 1
        self.counters.native_connections += 1
        try:
            self._nursery.start_soon(self._serve, sock, data)
        except RuntimeError:  # the nursery is closing: so is the transport
            self.open_connections -= 1
            sock.close()

    async def _serve(self, sock: socket.socket, data: bytes) -> None:
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        connection = _Connection(self, stream)
        try:
            await connection.run(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.debug("native lane connection ended: %r", exc)
        finally:
            connection.release()
            self.open_connections -= 1
            await trio.aclose_forcefully(stream)

    # what a connection needs from its server
    @property
    def host(self) -> ServerHost:
        return self._host

    @property
    def limits(self) -> ServerLimits:
        return self._limits


def _frame_of(body: bytes) -> bytes:
    """The raft frame a ``RaftMessage`` carries (``protos/transport.proto``)."""
    frame = raft_message_frame(body)
    if frame is not None:
        return frame
    try:
        frame = RaftMessage.parse(body).message
    except Exception as exc:  # betterproto2 raises many kinds on bad input
        raise CodecError(f"undecodable RaftMessage: {type(exc).__name__}: {exc}") from None
    if not isinstance(frame, bytes):
        raise CodecError("the RaftMessage carries no frame")
    return frame


class _Connection:
    """One native connection: its h2 state and the calls still read on it (by stream id; a
    call answered early is forgotten, what more it sends is dropped)."""

    def __init__(self, server: NativeServer, stream: trio.SocketStream) -> None:
        self._server = server
        self._stream = stream
        self._h2 = server_connection(
            H2Configuration(client_side=False, header_encoding="utf-8"), server.limits)
        self._calls: dict[int, MessageReader] = {}
        self._cap = server.host.max_message_bytes
        self._ended = False

    async def run(self, data: bytes) -> None:
        h2 = self._h2
        while data:
            received_at = time.perf_counter()
            try:
                events = h2.receive_data(data)
            except ProtocolError as exc:
                log.info("native lane connection broke HTTP/2: %r", exc)
                await self._flush()  # h2 queued the GOAWAY
                return
            for event in events:
                await self._on_event(event, received_at)
            await self._flush()
            if self._ended:
                return
            data = await self._stream.receive_some(_RECEIVE_BYTES)

    async def _flush(self) -> None:
        out = self._h2.data_to_send()
        if out:
            await self._stream.send_all(out)

    async def _on_event(self, event: Any, received_at: float) -> None:
        if isinstance(event, DataReceived):
            await self._on_data(event, received_at)
        elif isinstance(event, RequestReceived):
            self._on_request(event)
        elif isinstance(event, StreamEnded):
            self._on_end(event.stream_id)
        elif isinstance(event, StreamReset):
            self._drop(event.stream_id)
        elif isinstance(event, ConnectionTerminated):
            self._ended = True

    def _drop(self, sid: int) -> None:
        reader = self._calls.pop(sid, None)
        if reader is not None:
            reader.close()

    def release(self) -> None:
        """The connection is gone: return what its calls held of the budget."""
        for sid in list(self._calls):
            self._drop(sid)

    def _on_request(self, event: RequestReceived) -> None:
        sid = event.stream_id
        headers = {str(k): str(v) for k, v in event.headers or ()}
        if headers.get(":path") not in NATIVE_ROUTES:
            self._answer(sid, Status.UNIMPLEMENTED, "method not found")
            return
        if not str(headers.get("content-type", "")).startswith(GRPC_CONTENT_TYPE):
            self._answer(sid, Status.INVALID_ARGUMENT, "content-type is not application/grpc")
            return
        self._calls[sid] = MessageReader(self._cap, self._server.budget)

    async def _on_data(self, event: DataReceived, received_at: float) -> None:
        sid = event.stream_id
        reader = self._calls.get(sid)
        try:
            if reader is not None:
                await self._deliver(sid, reader, event.data, received_at)
        finally:
            with contextlib.suppress(H2Error):
                self._h2.acknowledge_received_data(event.flow_controlled_length, sid)

    async def _deliver(self, sid: int, reader: MessageReader, data: bytes,
                       received_at: float) -> None:
        counters = self._server.counters
        host = self._server.host
        try:
            bodies = reader.feed(data)
        except WireError as exc:
            self._refuse(sid, reader, exc.status, str(exc))
            return
        for body in bodies:
            try:
                message = decode_message(_frame_of(body), max_bytes=self._cap)
                await host.deliver_inbound(message, received_at)
            except trio.Cancelled:
                raise
            except Exception as exc:
                err = to_grpc_error(exc)
                self._refuse(sid, reader, err.status, err.message or "")
                return
            counters.messages_received += 1

    def _refuse(self, sid: int, reader: MessageReader, status: Status, message: str) -> None:
        self._server.counters.messages_rejected += 1
        reader.close()
        self._answer(sid, status, message)

    def _on_end(self, sid: int) -> None:
        reader = self._calls.pop(sid, None)
        if reader is None:
            return  # answered already
        reader.close()
        if reader.inside_message:
            self._server.counters.messages_rejected += 1
            self._answer(sid, Status.INVALID_ARGUMENT, "the request ended inside a message",
                         reset=False)
            return
        with contextlib.suppress(H2Error):
            self._h2.send_headers(sid, RESPONSE_HEADERS)
            self._h2.send_data(sid, EMPTY_MESSAGE)
            self._h2.send_headers(sid, trailers(Status.OK), end_stream=True)

    def _answer(self, sid: int, status: Status, message: str, *, reset: bool = True) -> None:
        """End call ``sid`` with ``status`` (trailers only); ``reset``: the client's side is
        still open, so the stream is reset (NO_ERROR) after the status."""
        h2 = self._h2
        with contextlib.suppress(H2Error):
            h2.send_headers(sid, RESPONSE_HEADERS + trailers(status, message), end_stream=True)
        if reset:
            with contextlib.suppress(H2Error):
                h2.reset_stream(sid, ErrorCodes.NO_ERROR)
            self._calls.pop(sid, None)
