"""What a gRPC client can make this node hold: the limits of the transport's grpclib server.

:class:`LimitedServer` is the grpclib ``Server`` that :class:`~trio_raft.transport.GRPCTransport`
runs (the raft service and any application services share it, so the limits cover them all).
Its connections speak HTTP/2 through :class:`LimitedProtocol`, whose request streams are
:class:`LimitedStream`.

Invariants (the numbers are :class:`ServerLimits`):

* A message body is read only after its declared length (the 5-byte gRPC message prefix) has
  passed the cap of its route (``max_message_bytes`` for the raft service, the transport's own;
  ``max_app_message_bytes`` for every other route) and has been reserved from the server-wide
  receive budget (``receive_budget_bytes``). A refused message ends its call with
  RESOURCE_EXHAUSTED before a byte of its body is read; the reservation is returned when the
  body has been read (it then belongs to the handler) or the call ends.
* Flow-control credit: a connection starts with ``connection_window`` bytes of credit and each
  stream with ``stream_window`` (HTTP/2 SETTINGS_INITIAL_WINDOW_SIZE); more credit is only
  granted as bytes are read, and bytes are only read into a reserved body. So a stream that
  declared a huge length, or whose handler is not reading, can make the node hold at most the
  windows, not the declared length.
* At most ``max_concurrent_streams`` streams per connection (SETTINGS_MAX_CONCURRENT_STREAMS,
  announced in the server's first SETTINGS frame; a client that opens more loses the
  connection) and at most ``max_connections`` connections per server: one more is answered with
  a GOAWAY (ENHANCE_YOUR_CALM) and closed before any request is read.
* A message with the compressed flag is refused with UNIMPLEMENTED (the server announces no
  compression), a body cut short by the end of the stream with INVALID_ARGUMENT.

Memory bound: received bytes in flight are at most ``receive_budget_bytes`` (bodies being read)
plus ``max_connections * connection_window`` (credit granted but not yet read), plus what the
handlers keep of decoded messages (the raft service's queues are bounded, see
:mod:`.grpc_server`). docs/transport.md (section 3.7) gives the defaults and the figures.

:func:`discard_request` reads and drops what a client still sends on a refused call (bounded),
so that the status can be sent after the client has finished sending: see
:mod:`.grpc_server` for why.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Collection, Mapping
from typing import Any

import attrs
from grpclib.config import Configuration
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.protocol import AbstractHandler, Connection, EventsProcessor, H2Protocol
from grpclib.protocol import Stream as H2Stream
from grpclib.server import Server
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import RequestReceived
from h2.settings import SettingCodes, Settings

log = logging.getLogger(__name__)

_MiB = 1 << 20
#: HTTP/2's bounds of a flow-control window (RFC 9113 section 6.9.1).
_MIN_WINDOW = 65_535
_MAX_WINDOW = (1 << 31) - 1
#: The HTTP/2 default window every stream and connection starts with before SETTINGS apply.
_DEFAULT_WINDOW = 65_535
#: How much of a refused call's body is read per step while discarding it.
_DISCARD_STEP = 64 * 1024
_MESSAGE_PREFIX = 5


def _positive(_: Any, attribute: Any, value: int | float) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name} must be positive, got {value!r}")


def _window(_: Any, attribute: Any, value: int) -> None:
    if not _MIN_WINDOW <= value <= _MAX_WINDOW:
        raise ValueError(f"{attribute.name} must be within {_MIN_WINDOW}-{_MAX_WINDOW}, "
                         f"got {value!r}")


@attrs.frozen(slots=True)
class ServerLimits:
    """Limits of the transport's gRPC server (see the module docstring for what each bounds).

    ``refusal_drain_bytes`` / ``refusal_drain_seconds``: how much a client that sent a malformed
    request may still send, and for how long, before the server stops waiting for the end of
    its request and resets the stream (see :mod:`.grpc_server`).
    """

    max_connections: int = attrs.field(default=128, validator=_positive)
    max_concurrent_streams: int = attrs.field(default=256, validator=_positive)
    connection_window: int = attrs.field(default=4 * _MiB, validator=_window)
    stream_window: int = attrs.field(default=4 * _MiB, validator=_window)
    receive_budget_bytes: int = attrs.field(default=128 * _MiB, validator=_positive)
    max_app_message_bytes: int = attrs.field(default=4 * _MiB, validator=_positive)
    refusal_drain_bytes: int = attrs.field(default=4 * _MiB, validator=_positive)
    refusal_drain_seconds: float = attrs.field(default=5.0, validator=_positive)


class ReceiveBudget:
    """Bytes of message bodies being read, server-wide (touched on the loop thread only)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self.peak = 0
        self.refused = 0

    def take(self, n: int) -> bool:
        if self.used + n > self.capacity:
            self.refused += 1
            return False
        self.used += n
        self.peak = max(self.peak, self.used)
        return True

    def give(self, n: int) -> None:
        self.used -= n


def _exhausted(message: str) -> GRPCError:
    return GRPCError(Status.RESOURCE_EXHAUSTED, message)


class LimitedStream(H2Stream):
    """A request stream whose message prefixes are checked before their bodies are read.

    grpclib reads a message as ``recv_data(5)`` (the prefix) then ``recv_data(length)`` (the
    body); this class keeps track of which of the two a read is.
    """

    def __init__(self, connection: Connection, h2_connection: H2Connection, transport: Any, *,
                 stream_id: int, cap: int, budget: ReceiveBudget) -> None:
        super().__init__(connection, h2_connection, transport, stream_id=stream_id)
        self.cap = cap
        self._budget = budget
        self._body: int | None = None
        self._held = 0

    async def recv_raw(self, size: int) -> bytes:
        """Exactly ``size`` bytes (b"" at the end of the stream), without the prefix checks."""
        return await super().recv_data(size)

    async def recv_data(self, size: int) -> bytes:
        if self._body is None and size == _MESSAGE_PREFIX:
            return await self._recv_prefix()
        if self._body is not None and size == self._body:
            try:
                return await self._recv_exact(size)
            finally:
                self._body = None
                self.drop_reservation()
        return await self._recv_exact(size)  # not the grpclib framing: no checks apply

    async def _recv_prefix(self) -> bytes:
        meta = await self._recv_exact(_MESSAGE_PREFIX)
        if not meta:
            return meta
        flag, length = meta[0], int.from_bytes(meta[1:], "big")
        if flag == 1:
            raise GRPCError(Status.UNIMPLEMENTED, "compressed messages are not supported")
        if flag != 0:
            raise GRPCError(Status.INVALID_ARGUMENT, f"invalid message flag {flag}")
        if length > self.cap:
            raise _exhausted(f"message of {length} bytes exceeds the limit of {self.cap}")
        if not self._budget.take(length):
            raise _exhausted(f"server is reading too much at once; message of {length} bytes "
                             "refused, retry later")
        self._held, self._body = length, length
        return meta

    async def _recv_exact(self, size: int) -> bytes:
        try:
            return await super().recv_data(size)
        except AssertionError:  # grpclib: the stream ended inside a message
            raise GRPCError(Status.INVALID_ARGUMENT, "the request ended inside a message"
                            ) from None

    def drop_reservation(self) -> None:
        held, self._held = self._held, 0
        if held:
            self._budget.give(held)


class LimitedEventsProcessor(EventsProcessor):
    """grpclib's HTTP/2 event dispatch, creating :class:`LimitedStream` request streams."""

    def __init__(self, handler: AbstractHandler, connection: Connection,
                 h2_connection: H2Connection, transport: Any,
                 cap_for: Callable[[str], int], budget: ReceiveBudget) -> None:
        super().__init__(handler, connection)
        self._h2 = h2_connection
        self._transport = transport
        self._cap_for = cap_for
        self._budget = budget

    def process_request_received(self, event: RequestReceived) -> None:
        path = next((v for k, v in event.headers or () if k == ":path"), "")
        assert event.stream_id is not None
        stream = LimitedStream(self.connection, self._h2, self._transport,
                               stream_id=event.stream_id, cap=self._cap_for(str(path)),
                               budget=self._budget)
        release = self.register(stream)

        def release_stream() -> None:
            stream.drop_reservation()
            release()

        self.handler.accept(stream, event.headers, release_stream)  # type: ignore[arg-type]


class LimitedProtocol(H2Protocol):
    """One server connection: the limits' SETTINGS and windows, and the connection cap."""

    def __init__(self, handler: AbstractHandler, config: Configuration,
                 h2_config: H2Configuration, server: LimitedServer) -> None:
        super().__init__(handler, config, h2_config)
        self._server = server
        self._refused = False
        self._counted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        server = self._server
        if server.open_connections >= server.limits.max_connections:
            self._refuse(transport)
            return
        server.open_connections += 1
        self._counted = True
        limits = server.limits
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        h2 = H2Connection(config=self.h2_config)
        h2.local_settings = Settings(client=False, initial_values={
            SettingCodes.MAX_CONCURRENT_STREAMS: limits.max_concurrent_streams,
            SettingCodes.INITIAL_WINDOW_SIZE: limits.stream_window,
            SettingCodes.MAX_HEADER_LIST_SIZE: H2Connection.DEFAULT_MAX_HEADER_LIST_SIZE,
        })
        h2.initiate_connection()
        if limits.connection_window > _DEFAULT_WINDOW:
            h2.increment_flow_control_window(limits.connection_window - _DEFAULT_WINDOW)
        self.connection = Connection(h2, transport, config=self.config)  # type: ignore[arg-type]
        self.connection.flush()
        self.connection.initialize()
        self.processor = LimitedEventsProcessor(self.handler, self.connection, h2, transport,
                                                server.cap_for, server.budget)

    def _refuse(self, transport: asyncio.BaseTransport) -> None:
        self._refused = True
        self._server.refused_connections += 1
        log.warning("refused a gRPC connection from %s: %d connections are open (the limit)",
                    transport.get_extra_info("peername"), self._server.open_connections)
        h2 = H2Connection(config=self.h2_config)
        h2.initiate_connection()
        h2.close_connection(error_code=ErrorCodes.ENHANCE_YOUR_CALM,
                            additional_data=b"connection limit reached")
        if isinstance(transport, asyncio.WriteTransport):
            transport.write(h2.data_to_send())
        transport.close()

    def data_received(self, data: bytes) -> None:
        if not self._refused:
            super().data_received(data)

    def pause_writing(self) -> None:
        if not self._refused:
            super().pause_writing()

    def resume_writing(self) -> None:
        if not self._refused:
            super().resume_writing()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._counted:
            self._counted = False
            self._server.open_connections -= 1
        if not self._refused:
            super().connection_lost(exc)


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


async def discard_request(stream: Any, max_bytes: int) -> bool:
    """Read and drop what the client still sends on a call (``stream``: grpclib's server
    stream), message by message, at most ``max_bytes``; True once the client has ended its
    side. Nothing is kept: a body is read in small steps."""
    inner = getattr(stream, "_stream", None)
    if inner is None:
        return False
    read = getattr(inner, "recv_raw", inner.recv_data)
    seen = 0
    try:
        while seen <= max_bytes:
            meta = await read(_MESSAGE_PREFIX)
            if not meta:
                return True
            left = int.from_bytes(meta[1:], "big")
            seen += _MESSAGE_PREFIX + left
            while left and seen <= max_bytes:
                step = min(left, _DISCARD_STEP)
                if len(await read(step)) < step:
                    return True
                left -= step
    except (AssertionError, GRPCError):  # the client ended inside a message
        return True
    return False
