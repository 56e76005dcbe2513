"""A raw HTTP/2 gRPC client for the tests: it writes whatever the test asks for on the wire.

grpcio always frames a message it was given whole; a hostile client does not have to. With
:class:`RawConnection` a test opens calls, sends a gRPC message prefix that declares any length,
then as much (or as little) of the body as it likes, and reads back what the server answered:
the call's ``grpc-status`` (from the trailers), a reset, or the connection's GOAWAY. Blocking
sockets; every read has a deadline.
"""

from __future__ import annotations

import socket
import struct
import time

import attrs
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
)
from h2.exceptions import FlowControlError, ProtocolError, StreamClosedError


@attrs.define
class CallState:
    status: int | None = None
    message: str = ""
    reset: bool = False
    ended: bool = False
    #: The DATA the server sent on the call (its length-prefixed messages).
    data: bytearray = attrs.Factory(bytearray)

    def messages(self) -> list[bytes]:
        """The gRPC messages in :attr:`data` (whole ones)."""
        out, pos = [], 0
        while len(self.data) - pos >= 5:
            _flag, length = struct.unpack_from(">?I", self.data, pos)
            if len(self.data) - pos - 5 < length:
                break
            out.append(bytes(self.data[pos + 5:pos + 5 + length]))
            pos += 5 + length
        return out


class RawConnection:
    """One HTTP/2 connection to ``host:port`` speaking just enough gRPC."""

    def __init__(self, address: str, *, timeout: float = 10.0) -> None:
        host, port = address.rsplit(":", 1)
        self.address = address
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        self.h2 = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
        self.h2.initiate_connection()
        self.calls: dict[int, CallState] = {}
        self.goaway: int | None = None
        self.closed = False
        self._flush()

    def _flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            try:
                self.sock.sendall(data)
            except OSError:
                self.closed = True

    def open_call(self, path: str) -> int:
        sid = self.h2.get_next_available_stream_id()
        self.h2.send_headers(sid, [
            (":method", "POST"), (":scheme", "http"), (":path", path),
            (":authority", self.address), ("content-type", "application/grpc"),
            ("te", "trailers")])
        self.calls[sid] = CallState()
        self._flush()
        return sid

    def send_prefix(self, sid: int, declared: int) -> None:
        self.send(sid, struct.pack(">?I", False, declared))

    def send(self, sid: int, data: bytes, *, end: bool = False) -> int:
        """Send as much of ``data`` as flow control allows now; returns the bytes sent."""
        try:
            n = min(len(data), self.h2.local_flow_control_window(sid),
                    self.h2.max_outbound_frame_size)
            self.h2.send_data(sid, data[:n], end_stream=end and n == len(data))
        except (StreamClosedError, FlowControlError, ProtocolError):
            return 0
        self._flush()
        return n

    def send_all(self, sid: int, data: bytes, *, timeout: float = 10.0) -> bool:
        """Send all of ``data``, reading what the server sends while flow control holds it
        back; False if the call or the connection ended first."""
        deadline = time.monotonic() + timeout
        view = memoryview(data)
        while view:
            call = self.calls[sid]
            if self.closed or call.reset or call.status is not None:
                return False
            n = self.send(sid, bytes(view))
            view = view[n:]
            if view:
                if time.monotonic() > deadline:
                    return False
                self.pump(0.01)
        return True

    def pump(self, seconds: float) -> None:
        """Read and handle what the server sends for ``seconds`` (or until it closes)."""
        deadline = time.monotonic() + seconds
        while not self.closed:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(1 << 16)
            except TimeoutError:
                return
            except OSError:
                self.closed = True
                return
            if not data:
                self.closed = True
                return
            try:
                events = self.h2.receive_data(data)
            except ProtocolError:
                self.closed = True
                return
            for event in events:
                self._handle(event)
            self._flush()

    def _handle(self, event: object) -> None:
        if isinstance(event, ConnectionTerminated):
            self.goaway = int(event.error_code or 0)
            return
        sid = getattr(event, "stream_id", None)
        call = self.calls.get(sid) if sid is not None else None
        if call is None:
            return
        if isinstance(event, ResponseReceived | TrailersReceived):
            headers = dict(event.headers or ())
            if "grpc-status" in headers:
                call.status = int(headers["grpc-status"])
                call.message = str(headers.get("grpc-message", ""))
        elif isinstance(event, DataReceived):
            call.data += event.data or b""
            self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, StreamEnded):
            call.ended = True
        elif isinstance(event, StreamReset):
            call.reset = True

    def wait_status(self, sid: int, timeout: float) -> CallState:
        deadline = time.monotonic() + timeout
        call = self.calls[sid]
        while call.status is None and not call.reset and not self.closed:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.pump(min(left, 0.2))
        return call

    def close(self) -> None:
        self.closed = True
        self.sock.close()
