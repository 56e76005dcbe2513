"""What both ends of the transport's native lanes share: gRPC's message framing, the request
and response headers, and the test that tells a native lane's connection from any other.

The native lanes (docs/transport.md, "Native lanes") are the replication and priority streams
(``SendStream``, ``PriorityStream``) spoken over HTTP/2 with ``h2`` on trio's thread, so that
a message crosses no thread on its way out or in. They are ordinary gRPC calls: a server that
only runs grpclib serves them unchanged, and a gRPC client of the same routes is served by the
gRPC server, never by the native one. What marks a native connection is its opening: the
client preface, then the first request's HEADERS carrying :data:`NATIVE_AGENT` as user-agent
and a lane's route, all in the connection's first read (:func:`is_native_opening`).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from urllib.parse import quote, unquote

import hpack
from grpclib.const import Status

from trio_raft.errors.transport import TransportError
from trio_raft.transport.grpc_limits import MESSAGE_PREFIX, ReceiveBudget
from trio_raft.transport.routes import PRIORITY_ROUTE, STREAM_ROUTE

#: The user-agent of a native lane's requests (the server's routing key, with the route).
NATIVE_AGENT = "trio-raft-native/1"
#: The routes a native lane carries.
NATIVE_ROUTES = frozenset({STREAM_ROUTE, PRIORITY_ROUTE})

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_HEADERS, _CONTINUATION = 0x1, 0x9
_END_HEADERS, _PADDED, _PRIORITY = 0x4, 0x8, 0x20
_PREFIX = struct.Struct(">BI")

GRPC_CONTENT_TYPE = "application/grpc"
#: The body of an ``Ack`` answer: one empty message.
EMPTY_MESSAGE = _PREFIX.pack(0, 0)


class WireError(TransportError):
    """A request that breaks gRPC's framing; ``status`` is the answer's status (the server
    turns it into the call's end, it never leaves the transport)."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.status = status


def _frames(data: bytes, pos: int) -> Iterator[tuple[int, int, bytes]]:
    """(type, flags, payload) of the whole frames of ``data`` from ``pos``."""
    while pos + 9 <= len(data):
        length = int.from_bytes(data[pos:pos + 3], "big")
        ftype, flags = data[pos + 3], data[pos + 4]
        end = pos + 9 + length
        if end > len(data):
            return
        yield ftype, flags, data[pos + 9:end]
        pos = end


def opening_headers(data: bytes) -> dict[str, str] | None:
    """The headers of the first request of a connection whose first bytes are ``data``, or
    ``None`` when ``data`` is not a client preface followed by a whole HEADERS frame (one with
    END_HEADERS: a block continued in CONTINUATION frames does not count)."""
    if not data.startswith(PREFACE):
        return None
    for ftype, flags, payload in _frames(data, len(PREFACE)):
        if ftype == _CONTINUATION:
            return None
        if ftype != _HEADERS:
            continue
        if not flags & _END_HEADERS:
            return None
        start, end = 0, len(payload)
        if flags & _PADDED:
            if not payload:
                return None
            start, end = 1, end - payload[0]
        if flags & _PRIORITY:
            start += 5
        if start > end:
            return None
        try:
            # The first header block of a connection: a fresh decoder reads it exactly.
            decoded = hpack.Decoder().decode(payload[start:end], raw=False)
        except hpack.HPACKError:
            return None
        return {str(k): str(v) for k, v in decoded}
    return None


def is_native_opening(data: bytes) -> bool:
    """Whether a connection opening with ``data`` is a native lane's (see the module doc)."""
    headers = opening_headers(data)
    return (headers is not None and headers.get("user-agent") == NATIVE_AGENT
            and headers.get(":path") in NATIVE_ROUTES)


def request_headers(route: str, authority: str) -> list[tuple[str, str]]:
    return [(":method", "POST"), (":scheme", "http"), (":path", route),
            (":authority", authority), ("content-type", GRPC_CONTENT_TYPE),
            ("te", "trailers"), ("user-agent", NATIVE_AGENT)]


RESPONSE_HEADERS = [(":status", "200"), ("content-type", GRPC_CONTENT_TYPE)]


def trailers(status: Status, message: str = "") -> list[tuple[str, str]]:
    out = [("grpc-status", str(status.value))]
    if message:
        out.append(("grpc-message", quote(message, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~")))
    return out


def status_of(headers: dict[str, str]) -> tuple[Status, str] | None:
    """The status a response's trailers (or trailers-only headers) carry, if any."""
    code = headers.get("grpc-status")
    if code is None:
        return None
    try:
        status = Status(int(code))
    except ValueError:
        status = Status.UNKNOWN
    return status, unquote(headers.get("grpc-message", ""))


#: The key of ``RaftMessage.message`` (field 1, length-delimited): ``protos/transport.proto``.
_MESSAGE_KEY = 0x0A


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def frame_raft_message(frame: bytes) -> bytes:
    """One gRPC message (prefix and body) carrying a ``RaftMessage`` around ``frame``: the
    bytes betterproto2 writes for it (``tests/transport/test_native_wire.py`` compares), built
    directly, since this runs for every message a native lane sends."""
    if not frame:
        return EMPTY_MESSAGE  # protobuf leaves a default (empty) field out
    length = _varint(len(frame))
    return b"".join((_PREFIX.pack(0, 1 + len(length) + len(frame)), b"\x0a", length, frame))


def raft_message_frame(body: bytes) -> bytes | None:
    """The frame of a ``RaftMessage`` body in the one form :func:`frame_raft_message` (and
    betterproto2) writes: the ``message`` field alone, non-empty. ``None`` for any other
    body, which betterproto2 then reads with protobuf's full rules."""
    if len(body) < 2 or body[0] != _MESSAGE_KEY:
        return None
    length = shift = 0
    pos = 1
    while pos < len(body) and pos <= 5:
        byte = body[pos]
        length |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return body[pos:] if length and pos + length == len(body) else None
        shift += 7
    return None


class MessageReader:
    """Splits a request's DATA into gRPC messages, checking each prefix before its body is
    kept: a compressed message is UNIMPLEMENTED (none is announced), any other flag
    INVALID_ARGUMENT, a length over ``cap`` RESOURCE_EXHAUSTED, and so is a body the
    server-wide ``budget`` cannot hold now. A body's reservation is returned once it is
    whole, or by :meth:`close` (the call ended)."""

    def __init__(self, cap: int, budget: ReceiveBudget | None = None) -> None:
        self.cap = cap
        self._budget = budget
        self._held: tuple[int, int] | None = None  # (share, bytes) of the body being read
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf
        buf += data
        out: list[bytes] = []
        pos = 0
        while len(buf) - pos >= MESSAGE_PREFIX:
            flag, length = _PREFIX.unpack_from(buf, pos)
            if flag == 1:
                raise WireError(Status.UNIMPLEMENTED, "compressed messages are not supported")
            if flag != 0:
                raise WireError(Status.INVALID_ARGUMENT, f"invalid message flag {flag}")
            if length > self.cap:
                raise WireError(Status.RESOURCE_EXHAUSTED,
                                f"message of {length} bytes exceeds the limit of {self.cap}")
            end = pos + MESSAGE_PREFIX + length
            if end > len(buf):
                self._reserve(length)
                break
            self.close()
            out.append(bytes(buf[pos + MESSAGE_PREFIX:end]))
            pos = end
        del buf[:pos]
        return out

    def _reserve(self, length: int) -> None:
        if self._held is not None or self._budget is None:
            return
        share = self._budget.take(length)
        if share is None:
            raise WireError(Status.RESOURCE_EXHAUSTED, "server is reading too much at once; "
                            f"message of {length} bytes refused, retry later")
        self._held = (share, length)

    def close(self) -> None:
        """Return the reservation of a body being read (if any)."""
        held, self._held = self._held, None
        if held is not None and self._budget is not None:
            self._budget.give(*held)

    @property
    def inside_message(self) -> bool:
        return bool(self._buf)
