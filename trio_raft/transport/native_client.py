"""The client end of the native lanes: one HTTP/2 connection per lane and peer, one long-lived
``SendStream`` or ``PriorityStream`` call on it, written on trio's thread with ``h2``.

A message goes from the engine's sender task to the socket without crossing a thread
(docs/transport.md, "Native lanes"), or from the run loop itself when the stream is free
(:meth:`NativeStream.try_send`, docs/transport.md 3.9). Each :class:`NativeStream` has a
reader task in the transport's nursery that takes the peer's SETTINGS, window updates and
pings, and the end of the call. Whatever ends the call (the peer's status, a reset, a lost
connection, a failed or cancelled write, which leaves a message half-written) makes the stream
terminal and closes its connection: the next send on the lane raises what ended it (a status
other than OK as :class:`grpclib.exceptions.GRPCError`), the one after opens a new connection.
Opening is single-flight per lane and address.

A peer that answers the lane's route UNIMPLEMENTED (a server without that RPC) is marked for
``reprobe_after`` seconds; meanwhile :meth:`NativeClient.usable` is false and the transport
sends that lane's messages through the gRPC client instead, which has its own fallbacks.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
import time
from typing import Any

import trio
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import H2Error

from trio_raft.errors import PeerStreamClosedError, TransportClosedError
from trio_raft.transport.base import split_address
from trio_raft.transport.grpc_client import BULK, PRIORITY, ClientCounters, Lane
from trio_raft.transport.native_wire import frame_raft_message, request_headers, status_of

log = logging.getLogger(__name__)

_RECEIVE_BYTES = 64 * 1024
_Key = tuple[str, str]
#: The stream ids of the probe and of the long-lived call on a lane's connection.
_PROBE, _CALL = 1, 3


async def _acquire(lock: trio.Lock) -> None:
    """Take ``lock`` without yielding when it is free: a message's write then reaches the
    socket within the sender's current step, before the run loop gets the thread back (it
    may spend it on an fsync, ``engine/persist.py``)."""
    try:
        lock.acquire_nowait()
    except trio.WouldBlock:
        await lock.acquire()


def _headers(raw: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in raw or ()}


class NativeStream:
    """One lane's call to one address, on its own connection."""

    def __init__(self, lane: Lane, address: str, sock: trio.abc.Stream) -> None:
        self.lane = lane
        self.address = address
        self._sock = sock
        self._h2 = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
        self._sid = _CALL
        self._probe: tuple[Status, str] | None = None
        self._probed = trio.Event()
        self._send_lock = trio.Lock()
        self._write_lock = trio.Lock()
        self._credit = trio.Event()
        #: Bytes a direct write (:meth:`try_send`) could not hand to the socket at once: the
        #: next flush writes them before anything else.
        self._backlog = b""
        self._nursery: trio.Nursery | None = None
        self.closed = False
        self.error: BaseException | None = None
        #: True when the peer (or the connection) ended the call, not a local close.
        self.remote_end = False

    async def start(self, nursery: trio.Nursery) -> None:
        """Probe, then open the call. The preface, SETTINGS and an empty call of the lane's
        route go in one write (the server routes the connection on its first read); its
        answer tells whether the peer serves the route before any message is committed to a
        call that would be refused (a status other than OK is raised). Then the long-lived
        call is opened on the same connection."""
        h2 = self._h2
        headers = request_headers(self.lane.route, self.address)
        h2.initiate_connection()
        h2.send_headers(_PROBE, headers, end_stream=True)
        await self._flush()
        self._nursery = nursery
        nursery.start_soon(self._read)
        await self._probed.wait()
        if self._probe is None or self._probe[0] is not Status.OK:
            status, message = self._probe or (Status.UNAVAILABLE, "connection lost")
            self.close()
            raise GRPCError(status, message)
        h2.send_headers(self._sid, headers)
        await self._flush()

    async def _flush(self) -> None:
        await _acquire(self._write_lock)
        try:
            out = self._h2.data_to_send()
            if self._backlog:
                out, self._backlog = self._backlog + out, b""
            if out:
                await self._sock.send_all(out)
        finally:
            self._write_lock.release()

    async def _read(self) -> None:
        try:
            while not self.closed:
                data = await self._sock.receive_some(_RECEIVE_BYTES)
                if not data:
                    self._end(PeerStreamClosedError(f"address={self.address} (connection "
                                                    "closed by the peer)"))
                    return
                for event in self._h2.receive_data(data):
                    if getattr(event, "stream_id", None) == _PROBE:
                        self._on_probe_event(event)
                    else:
                        self._on_event(event)
                await self._flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, H2Error) as exc:
            if not self.closed:
                self._end(PeerStreamClosedError(f"address={self.address}: {exc!r}"))
        finally:
            self._probed.set()
            await self._close_socket()

    def _on_probe_event(self, event: Any) -> None:
        if isinstance(event, ResponseReceived | TrailersReceived):
            ended = status_of(_headers(event.headers))
            if ended is not None:
                self._probe = ended
                self._probed.set()
        elif isinstance(event, DataReceived):
            with contextlib.suppress(H2Error):
                self._h2.acknowledge_received_data(event.flow_controlled_length, _PROBE)
        elif isinstance(event, StreamReset):
            self._probed.set()

    def _on_event(self, event: Any) -> None:
        if isinstance(event, WindowUpdated | RemoteSettingsChanged):
            self._credit.set()  # more credit (new SETTINGS may widen every stream's window)
        elif isinstance(event, ResponseReceived | TrailersReceived):
            ended = status_of(_headers(event.headers))
            if ended is not None:
                status, message = ended
                self._end(PeerStreamClosedError(f"address={self.address} (ended)")
                          if status is Status.OK else GRPCError(status, message))
        elif isinstance(event, DataReceived):
            with contextlib.suppress(H2Error):
                self._h2.acknowledge_received_data(event.flow_controlled_length,
                                                   event.stream_id)
        elif isinstance(event, StreamEnded | StreamReset):
            self._end(PeerStreamClosedError(f"address={self.address} (stream ended)"))
        elif isinstance(event, ConnectionTerminated):
            self._end(PeerStreamClosedError(f"address={self.address} (GOAWAY "
                                            f"{event.error_code!r})"))

    def _end(self, error: BaseException) -> None:
        """The peer or the connection ended the call (the first cause is kept)."""
        if self.error is None:
            self.error = error
            self.remote_end = True
        self.closed = True
        self._credit.set()
        self._probed.set()

    async def _close_socket(self) -> None:
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(self._sock)

    def close(self) -> None:
        """End the call from this side (its reader closes the connection)."""
        if self.error is None:
            self.error = PeerStreamClosedError(f"address={self.address} (closed)")
        self.closed = True
        self._credit.set()
        tcp: Any = self._sock.transport_stream if isinstance(self._sock, trio.SSLStream) \
            else self._sock
        with contextlib.suppress(Exception):
            tcp.socket.shutdown(socket.SHUT_RDWR)

    def terminal_error(self) -> BaseException:
        return self.error or PeerStreamClosedError(f"address={self.address}")

    async def send(self, frame: bytes) -> float:
        """Write one message; returns the ``time.perf_counter()`` instant it was written."""
        data = frame_raft_message(frame)
        await _acquire(self._send_lock)
        try:
            if self.closed:
                raise self.terminal_error()
            try:
                await self._write(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self.close()
                raise PeerStreamClosedError(f"address={self.address}: {exc!r}") from exc
            except BaseException:
                self.close()  # a message may be half-written: the call cannot go on
                raise
            # Written. If the call ended meanwhile (its reader saw the peer's status while the
            # write yielded), the next send reports it, as docs/transport.md 3.3 says.
            return time.perf_counter()
        finally:
            self._send_lock.release()

    def try_send(self, frame: bytes) -> float | None:
        """Write one message now, without yielding: when the call is open on a plain TCP
        connection, no send or flush holds it, nothing is left over from the last direct write
        and the flow-control windows take the message whole. Returns the instant it was handed
        to the socket, or ``None`` when nothing was written (the caller sends it with
        :meth:`send`, which waits as needed). What the socket does not take at once stays in
        ``_backlog``; a flush task writes it before any other byte (every write goes through
        :meth:`_flush`), and direct writes wait until it has. A failed write closes the call
        and raises ``OSError`` (no byte of the message left)."""
        if (self.closed or self._backlog or self._send_lock.locked()
                or self._write_lock.locked() or type(self._sock) is not trio.SocketStream
                or self._nursery is None):
            return None
        h2, sid = self._h2, self._sid
        data = frame_raft_message(frame)
        if len(data) > min(h2.local_flow_control_window(sid), h2.max_outbound_frame_size):
            return None
        try:
            h2.send_data(sid, data)
        except H2Error:
            return None
        out = h2.data_to_send()
        try:
            n = os.write(self._sock.socket.fileno(), out)
        except BlockingIOError:
            n = 0
        except OSError:
            self.close()
            raise
        written = time.perf_counter()
        if n < len(out):
            self._backlog = out[n:]
            try:
                self._nursery.start_soon(self._flush_backlog)
            except RuntimeError:  # the transport is closing: so is this call
                self.close()
        return written

    async def _flush_backlog(self) -> None:
        try:
            await self._flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self.close()  # a message is half-written: the call cannot go on
            log.debug("native lane to %s: write failed: %r", self.address, exc)

    async def _write(self, data: bytes) -> None:
        h2, sid = self._h2, self._sid
        pos, size = 0, len(data)
        while pos < size:
            window = min(h2.local_flow_control_window(sid), h2.max_outbound_frame_size)
            if window <= 0:  # what the windows allowed goes out, then wait for more credit
                await self._flush()
                self._credit = trio.Event()
                if h2.local_flow_control_window(sid) <= 0:
                    await self._credit.wait()
                if self.closed:
                    raise self.terminal_error()
                continue
            n = min(window, size - pos)
            h2.send_data(sid, data[pos:pos + n])
            pos += n
        await self._flush()


class NativeClient:
    """The native lanes to every address (trio thread); see the module docstring."""

    def __init__(self, nursery: trio.Nursery, *, reprobe_after: float,
                 ssl_context: ssl.SSLContext | None = None,
                 server_name: str | None = None) -> None:
        self._nursery = nursery
        self._reprobe_after = reprobe_after
        self._ssl = ssl_context
        self._server_name = server_name
        self.counters = ClientCounters()
        self.streams: dict[_Key, NativeStream] = {}
        self._opening: dict[_Key, trio.Lock] = {}
        self._unsupported: dict[_Key, float] = {}
        self._had_stream: set[_Key] = set()
        self.closed = False

    @staticmethod
    def lane_for(priority: bool) -> Lane:
        return PRIORITY if priority else BULK

    def usable(self, lane: Lane, address: str) -> bool:
        """False while ``address`` is marked as not serving ``lane``'s route."""
        key = (lane.name, address)
        marked = self._unsupported.get(key)
        if marked is None:
            return True
        if trio.current_time() - marked >= self._reprobe_after:
            del self._unsupported[key]
            return True
        return False

    async def deliver(self, lane: Lane, address: str, frame: bytes) -> float:
        """Write ``frame`` on ``lane``'s stream to ``address``; the instant it was written."""
        key = (lane.name, address)
        stream = self.streams.get(key)
        if stream is not None and stream.closed:
            del self.streams[key]
            if stream.remote_end:
                raise self._reported(key, stream.terminal_error())  # once; then a new one
            stream = None
        if stream is None:
            stream = await self._stream(key, lane, address)
        try:
            written = await stream.send(frame)
        except BaseException as exc:
            if stream.closed and self.streams.get(key) is stream:
                del self.streams[key]
            if isinstance(exc, GRPCError):
                raise self._reported(key, exc) from None
            raise
        self.counters.lane_message(lane)
        return written

    def _reported(self, key: _Key, err: BaseException) -> BaseException:
        """``err`` as raised to a sender (a fresh copy of a stored status); an UNIMPLEMENTED
        status marks the address."""
        if not isinstance(err, GRPCError):
            return err
        if err.status is Status.UNIMPLEMENTED:
            # counted as a fallback by the gRPC client, which probes for itself
            log.info("peer %s does not serve the %s lane's route; using the gRPC client",
                     key[1], key[0])
            self._unsupported[key] = trio.current_time()
        return GRPCError(err.status, err.message, err.details)

    def try_deliver(self, lane: Lane, address: str, frame: bytes) -> float | None:
        """:meth:`deliver` without yielding, on an open stream that is free now (see
        :meth:`NativeStream.try_send`); ``None``: not sent."""
        stream = self.streams.get((lane.name, address))
        if stream is None:
            return None
        try:
            written = stream.try_send(frame)
        except OSError:
            return None
        if written is not None:
            self.counters.lane_message(lane)
        return written

    async def _stream(self, key: _Key, lane: Lane, address: str) -> NativeStream:
        lock = self._opening.setdefault(key, trio.Lock())
        async with lock:
            stream = self.streams.get(key)
            if stream is not None and not stream.closed:
                return stream
            if self.closed:
                raise TransportClosedError()
            sock = await self._connect(address)
            try:
                stream = NativeStream(lane, address, sock)
                await stream.start(self._nursery)
            except GRPCError as exc:
                await trio.aclose_forcefully(sock)
                raise self._reported(key, exc) from None
            except BaseException:
                await trio.aclose_forcefully(sock)
                raise
            self.counters.lane_opened(lane, reconnect=key in self._had_stream)
            self._had_stream.add(key)
            self.streams[key] = stream
            return stream

    async def _connect(self, address: str) -> trio.abc.Stream:
        """A connection to ``address``: TCP (no Nagle delay), in TLS when configured (ALPN
        h2, the server name checked as the gRPC client checks it)."""
        host, port = split_address(address)
        tcp = await trio.open_tcp_stream(host, port)
        tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._ssl is None:
            return tcp
        tls = trio.SSLStream(tcp, self._ssl, server_hostname=self._server_name or host,
                             https_compatible=True)
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError as exc:
            await trio.aclose_forcefully(tcp)
            raise PeerStreamClosedError(f"address={address}: TLS handshake failed: "
                                        f"{exc.__cause__ or exc!r}") from exc
        except BaseException:
            await trio.aclose_forcefully(tcp)
            raise
        if tls.selected_alpn_protocol() not in (None, "h2"):
            await trio.aclose_forcefully(tls)
            raise PeerStreamClosedError(f"address={address}: the peer chose ALPN "
                                        f"{tls.selected_alpn_protocol()!r}, not h2")
        return tls

    def close_address(self, address: str) -> None:
        """Close the lanes to ``address`` and forget its marks."""
        for lane in (BULK, PRIORITY):
            key = (lane.name, address)
            stream = self.streams.pop(key, None)
            if stream is not None:
                stream.close()
            self._unsupported.pop(key, None)
            self._had_stream.discard(key)

    def aclose(self) -> None:
        self.closed = True
        for stream in list(self.streams.values()):
            stream.close()
        self.streams.clear()
