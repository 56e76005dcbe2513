"""The HTTP/2 side of the transport's gRPC server: grpclib's server with the limits of
:mod:`.grpc_limits` applied, and its writes coalesced.

:class:`LimitedServer` is the grpclib ``Server`` that :class:`~trio_raft.transport.GRPCTransport`
runs. Each connection it accepts speaks HTTP/2 through :class:`LimitedProtocol` (its own
SETTINGS and windows, the connection cap), whose request streams are :class:`LimitedStream`
(a message's declared length is checked and reserved before its body is read). grpclib 0.4's
classes are subclassed here, not patched; pyproject.toml caps grpclib below 0.5.

Two costs per call are cut on the way, both measured with many calls in flight on few
connections (docs/benchmarks.md):

* writes: a unary reply is three writes (headers, message, trailers), each a ``send`` system
  call when the socket's buffer is empty. :class:`CoalescingTransport` gathers the writes made
  while the loop runs its ready callbacks and hands them to the socket as one, after them.
* window updates: grpclib wakes every stream of a connection when the client grants
  connection-level credit (grpcio does after each reply). :class:`LimitedStream` sends its data
  itself and, when it must wait for credit, registers with its connection; only those waiting
  are woken.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any

from grpclib.config import Configuration
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.protocol import (
    AbstractHandler,
    AckedData,
    Connection,
    EventsProcessor,
    H2Protocol,
    UnackedData,
)
from grpclib.protocol import Stream as H2Stream
from grpclib.server import Server
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import RequestReceived, WindowUpdated

from trio_raft.transport.grpc_limits import (
    MESSAGE_PREFIX,
    ReceiveBudget,
    ServerLimits,
    server_connection,
)
from trio_raft.transport.native_wire import is_native_opening

log = logging.getLogger(__name__)

class CoalescingTransport:
    """An asyncio transport whose writes are gathered and written once per loop iteration.

    Writes keep their order; :meth:`close` writes what is pending first. Only what grpclib's
    protocol classes use is offered."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._pending: list[bytes] = []
        self._loop = asyncio.get_running_loop()

    def write(self, data: bytes) -> None:
        if not data:
            return
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(data)

    def flush(self) -> None:
        if not self._pending:
            return
        data = b"".join(self._pending) if len(self._pending) > 1 else self._pending[0]
        self._pending.clear()
        if not self._transport.is_closing():
            self._transport.write(data)

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)


def _exhausted(message: str) -> GRPCError:
    return GRPCError(Status.RESOURCE_EXHAUSTED, message)


class LimitedStream(H2Stream):
    """A request stream whose message prefixes are checked before their bodies are read.

    grpclib reads a message as ``recv_data(5)`` (the prefix) then ``recv_data(length)`` (the
    body); this class keeps track of which of the two a read is. ``waiting`` is the set of the
    connection's streams waiting for flow-control credit (see the module docstring).
    """

    def __init__(self, connection: Connection, h2_connection: H2Connection, transport: Any, *,
                 stream_id: int, cap: int, budget: ReceiveBudget,
                 waiting: set[LimitedStream]) -> None:
        super().__init__(connection, h2_connection, transport, stream_id=stream_id)
        self.cap = cap
        self._budget = budget
        self._waiting = waiting
        self._body: int | None = None
        self._held = 0
        self._share = 0
        #: The body of a message refused on its prefix, still to come (skipped by a drain).
        self.unread_body = 0
        #: The client ended its request inside a message: nothing more will come.
        self.ended_inside_message = False

    # -- receiving ----------------------------------------------------------------------------

    async def recv_raw(self, size: int) -> bytes:
        """Exactly ``size`` bytes (b"" at the end of the stream), without the prefix checks."""
        return await super().recv_data(size)

    async def recv_data(self, size: int) -> bytes:
        if self._body is None and size == MESSAGE_PREFIX:
            return await self._recv_prefix()
        if self._body is not None and size == self._body:
            try:
                return await self._recv_exact(size)
            finally:
                self._body = None
                self.drop_reservation()
        return await self._recv_exact(size)  # not the grpclib framing: no checks apply

    async def _recv_prefix(self) -> bytes:
        meta = await self._recv_exact(MESSAGE_PREFIX)
        if not meta:
            return meta
        flag, length = meta[0], int.from_bytes(meta[1:], "big")
        if flag or length > self.cap:
            self.unread_body = length
        if flag == 1:
            raise GRPCError(Status.UNIMPLEMENTED, "compressed messages are not supported")
        if flag != 0:
            raise GRPCError(Status.INVALID_ARGUMENT, f"invalid message flag {flag}")
        if length > self.cap:
            raise _exhausted(f"message of {length} bytes exceeds the limit of {self.cap}")
        share = self._budget.take(length)
        if share is None:
            raise _exhausted(f"server is reading too much at once; message of {length} bytes "
                             "refused, retry later")
        self._share, self._held, self._body = share, length, length
        return meta

    async def _recv_exact(self, size: int) -> bytes:
        try:
            return await super().recv_data(size)
        except AssertionError:  # grpclib: the stream ended inside a message
            self.ended_inside_message = True
            raise GRPCError(Status.INVALID_ARGUMENT, "the request ended inside a message"
                            ) from None

    def take_ready_messages(self) -> list[bytes]:
        """The bodies of the request messages already complete in this stream's buffer, taken
        without waiting (grpclib would read each as two awaited reads: prefix, then body).

        Only between messages (no body is being read), and only as far as every check of
        :meth:`_recv_prefix` passes: at a compressed or flagged message, one over the cap, one
        the receive budget refuses or one not wholly received, it stops and leaves the rest to
        the ordinary reads, which refuse or wait as they always do. Credit for the data taken
        into the buffer's read side is returned as grpclib's buffer returns it.
        """
        buf = self.buffer  # grpclib 0.4's Buffer (pinned below 0.5 in pyproject.toml)
        if self._body is not None:
            return []
        arrived = buf._unacked
        while not arrived.empty():
            data, size, ack = arrived.get_nowait()
            if not ack:  # the end of the request: stays for the ordinary read
                arrived.put_nowait(UnackedData(data, size, ack))
                break
            buf._acked.append(AckedData(memoryview(data), size))
            buf._acked_size += size
            buf._ack_callback(ack)
        if buf._acked_size < MESSAGE_PREFIX:
            return []
        blob = b"".join(chunk for chunk, _ in buf._acked)
        bodies: list[bytes] = []
        pos, end = 0, len(blob)
        while end - pos >= MESSAGE_PREFIX:
            flag, length = blob[pos], int.from_bytes(blob[pos + 1:pos + MESSAGE_PREFIX], "big")
            start = pos + MESSAGE_PREFIX
            if flag or length > self.cap or end - start < length:
                break
            share = self._budget.take(length)
            if share is None:
                break
            self._budget.give(share, length)  # read whole already: nothing stays reserved
            bodies.append(blob[start:start + length])
            pos = start + length
        if pos:
            buf._acked.clear()
            rest = blob[pos:]
            if rest:
                buf._acked.append(AckedData(memoryview(rest), len(rest)))
            buf._acked_size = len(rest)
        return bodies

    def drop_reservation(self) -> None:
        held, self._held = self._held, 0
        if held:
            self._budget.give(self._share, held)

    # -- sending ------------------------------------------------------------------------------

    async def send_data(self, data: bytes, end_stream: bool = False) -> None:
        """Write ``data`` as DATA frames as flow control allows (``end_stream`` on the last)."""
        assert self.id is not None
        h2 = self._h2_connection
        pos, size = 0, len(data)
        while True:
            await self.connection.write_ready.wait()
            window = h2.local_flow_control_window(self.id)
            if window <= 0 and pos < size:
                await self._wait_for_credit()
                continue  # other streams may have used the credit meanwhile
            n = max(0, min(window, h2.max_outbound_frame_size, size - pos))
            last = pos + n == size
            h2.send_data(self.id, data[pos:pos + n], end_stream=end_stream and last)
            self._transport.write(h2.data_to_send())
            pos += n
            self.data_sent += n
            self.connection.data_sent += n
            self.connection.data_send_process()
            if last:
                return

    async def _wait_for_credit(self) -> None:
        self.window_updated.clear()
        self._waiting.add(self)
        try:
            await self.window_updated.wait()
        finally:
            self._waiting.discard(self)


class LimitedEventsProcessor(EventsProcessor):
    """grpclib's HTTP/2 event dispatch, creating :class:`LimitedStream` request streams and
    waking only the streams that wait for credit."""

    def __init__(self, handler: AbstractHandler, connection: Connection,
                 h2_connection: H2Connection, transport: Any,
                 cap_for: Callable[[str], int], budget: ReceiveBudget) -> None:
        super().__init__(handler, connection)
        self._h2 = h2_connection
        self._transport = transport
        self._cap_for = cap_for
        self._budget = budget
        self.waiting: set[LimitedStream] = set()

    def process_request_received(self, event: RequestReceived) -> None:
        path = next((v for k, v in event.headers or () if k == ":path"), "")
        assert event.stream_id is not None
        stream = LimitedStream(self.connection, self._h2, self._transport,
                               stream_id=event.stream_id, cap=self._cap_for(str(path)),
                               budget=self._budget, waiting=self.waiting)
        release = self.register(stream)

        def release_stream() -> None:
            stream.drop_reservation()
            release()

        self.handler.accept(stream, event.headers, release_stream)  # type: ignore[arg-type]

    def process_window_updated(self, event: WindowUpdated) -> None:
        if event.stream_id:
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.window_updated.set()
            return
        for waiting in list(self.waiting):
            waiting.window_updated.set()


class LimitedProtocol(H2Protocol):
    """One server connection: the limits' SETTINGS and windows, and the connection cap."""

    def __init__(self, handler: AbstractHandler, config: Configuration,
                 h2_config: H2Configuration, server: LimitedServer) -> None:
        super().__init__(handler, config, h2_config)
        self._server = server
        self._refused = False
        self._deciding = False
        self._handed_over = False
        self._counted = False
        self._accepted: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        server = self._server
        assert isinstance(transport, asyncio.Transport)
        if server.open_connections >= server.limits.max_connections:
            self._refuse(transport)
            return
        server.open_connections += 1
        self._counted = True
        server.connections.add(transport)
        self._accepted = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if server.adopt is not None and transport.get_extra_info("sslcontext") is None:
            self._deciding = True  # the first read tells whether it is a native lane's
            return
        self._start_h2(transport)

    def _start_h2(self, transport: asyncio.Transport) -> None:
        h2 = server_connection(self.h2_config, self._server.limits)
        writer = CoalescingTransport(transport)
        self.connection = Connection(h2, writer, config=self.config)  # type: ignore[arg-type]
        self.connection.flush()
        self.connection.initialize()
        self.processor = LimitedEventsProcessor(self.handler, self.connection, h2, writer,
                                                self._server.cap_for, self._server.budget)

    def _hand_over(self, transport: asyncio.Transport, data: bytes) -> bool:
        """Give a native lane's connection (nothing written to it yet) to the native server:
        a duplicate of its socket goes with the bytes read; this side closes its own."""
        adopt = self._server.adopt
        sock = transport.get_extra_info("socket")
        if adopt is None or sock is None:
            return False
        try:
            dup = socket.socket(fileno=os.dup(sock.fileno()))
        except OSError as exc:
            log.warning("could not hand a native lane connection over: %r", exc)
            return False
        self._handed_over = True
        self.handler.close()  # no request will reach it: grpclib's server may forget it
        transport.pause_reading()
        transport.abort()  # closes this side's descriptor only: the duplicate keeps the TCP
        try:
            adopt(dup, data)
        except Exception as exc:
            log.warning("native lane connection dropped: %r", exc)
            dup.close()
        return True

    def _refuse(self, transport: asyncio.Transport) -> None:
        self._refused = True
        self.handler.close()  # no request will reach it: grpclib's server may forget it
        self._server.refused_connections += 1
        log.warning("refused a gRPC connection from %s: %d connections are open (the limit)",
                    transport.get_extra_info("peername"), self._server.open_connections)
        h2 = H2Connection(config=self.h2_config)
        h2.initiate_connection()
        h2.close_connection(error_code=ErrorCodes.ENHANCE_YOUR_CALM,
                            additional_data=b"connection limit reached")
        transport.write(h2.data_to_send())
        transport.close()

    def data_received(self, data: bytes) -> None:
        if self._deciding:
            self._deciding = False
            transport = self._accepted
            assert transport is not None
            if is_native_opening(data) and self._hand_over(transport, data):
                return
            self._start_h2(transport)
        if not self._refused and not self._handed_over:
            super().data_received(data)

    def _idle(self) -> bool:
        """No HTTP/2 connection runs here (refused, handed over, or not started yet)."""
        return self._refused or self._handed_over or self._deciding

    def pause_writing(self) -> None:
        if not self._idle():
            super().pause_writing()

    def resume_writing(self) -> None:
        if not self._idle():
            super().resume_writing()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._counted:
            self._counted = False
            self._server.open_connections -= 1
        if self._accepted is not None:
            self._server.connections.discard(self._accepted)
            self._accepted = None
        if not self._idle():
            super().connection_lost(exc)
        elif self._deciding:
            self.handler.close()


class LimitedServer(Server):
    """A grpclib ``Server`` enforcing :class:`ServerLimits` on every connection it accepts.

    ``route_caps`` maps a route (``/package.Service/Method``) to its message cap; other routes
    get ``limits.max_app_message_bytes``.
    """

    def __init__(self, handlers: Collection[Any], *, codec: Any, limits: ServerLimits,
                 route_caps: Mapping[str, int]) -> None:
        super().__init__(handlers, codec=codec, config=Configuration(
            http2_connection_window_size=limits.connection_window,
            http2_stream_window_size=limits.stream_window))
        self.limits = limits
        self.budget = ReceiveBudget(limits.receive_budget_bytes)
        self._route_caps = dict(route_caps)
        self.open_connections = 0
        self.refused_connections = 0
        #: The accepted connections still open.
        self.connections: set[asyncio.Transport] = set()
        #: Called on the loop with the socket and first bytes of a native lane's connection
        #: (:mod:`.native_server`); ``None``: every connection is served here.
        self.adopt: Callable[[socket.socket, bytes], None] | None = None

    async def stop_accepting(self) -> None:
        """Stop taking new connections, then let the ones already accepted be set up; call it
        before :meth:`close`.

        asyncio's server (Python 3.11) builds the transport of an accepted connection in a task
        that runs one loop iteration after the accept, and that transport asserts the server is
        still open: a connection accepted in the iteration the server closes in fails that
        assertion, and its socket is left open with no transport that will ever close it (the
        garbage collector does, later, with a ``ResourceWarning``). So the listening sockets
        leave the selector first, and two iterations pass (the accept tasks run, then the
        protocols' ``connection_made``, which registers each connection in
        :attr:`connections` for :meth:`wait_closed` to close)."""
        listener = self._server
        if listener is None:
            return
        loop = asyncio.get_running_loop()
        for sock in getattr(listener, "sockets", ()):
            loop.remove_reader(sock.fileno())
        for _ in range(2):
            await asyncio.sleep(0)

    async def wait_closed(self) -> None:
        """Wait for the handlers to end, then close every connection still open: grpclib
        stops listening and cancels requests but leaves accepted connections to their peers,
        whose sockets would then outlive the event loop."""
        await super().wait_closed()
        for transport in list(self.connections):
            transport.close()
        self.connections.clear()
        await asyncio.sleep(0)  # the loop runs the close callbacks (the sockets close there)

    def cap_for(self, path: str) -> int:
        return self._route_caps.get(path, self.limits.max_app_message_bytes)

    def _protocol_factory(self) -> H2Protocol:
        plain = super()._protocol_factory()  # registers grpclib's request handler
        return LimitedProtocol(plain.handler, plain.config, plain.h2_config, self)

    def stats(self) -> dict[str, int]:
        return {"open_connections": self.open_connections,
                "refused_connections": self.refused_connections,
                "receive_budget_used": self.budget.used,
                "receive_budget_peak": self.budget.peak,
                "receive_budget_refusals": self.budget.refused}


def ready_requests(stream: Any) -> Iterator[Any]:
    """For a grpclib server stream of a request-streaming call served here: the request
    messages that have arrived whole behind the one just received, each decoded with the
    stream's codec when its turn comes (so a message that does not decode raises in its place,
    after the ones before it) and counted as received. Nothing for a stream that is not
    :class:`LimitedStream`'s, so a caller can use it after each ``recv_message`` and get
    every message once, in order."""
    inner = getattr(stream, "_stream", None)
    if not isinstance(inner, LimitedStream):
        return
    for body in inner.take_ready_messages():
        stream._messages_received += 1
        inner.connection.messages_received += 1
        yield stream._codec.decode(body, stream._recv_type)
