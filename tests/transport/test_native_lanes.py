"""The native lanes (docs/transport.md, "Native lanes"): the replication and priority streams
written and served on trio's thread with h2, routed by the connection's opening, interoperable
with grpclib at both ends, and refusing bad input with a status while the server keeps serving."""

from __future__ import annotations

import random
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
from grpclib.client import Channel
from grpclib.const import Cardinality, Status
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import ResponseReceived, StreamEnded, TrailersReceived
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.transport.conftest import Inbox, app, grpc_pair
from trio_raft.core.messages import Message, MessageType
from trio_raft.errors import DispatchError, PeerStreamClosedError
from trio_raft.transport import GRPCTransport
from trio_raft.transport._proto.trio_raft.transport.v1 import Ack, RaftMessage
from trio_raft.transport.codec import encode_message
from trio_raft.transport.grpc import classify
from trio_raft.transport.grpc_client import BULK
from trio_raft.transport.grpc_limits import ServerLimits
from trio_raft.transport.native_client import NativeStream
from trio_raft.transport.native_wire import (
    NATIVE_AGENT,
    PREFACE,
    MessageReader,
    WireError,
    frame_raft_message,
    is_native_opening,
    opening_headers,
    request_headers,
)
from trio_raft.transport.routes import PRIORITY_ROUTE, SEND_ROUTE, STREAM_ROUTE


def opening(route: str = STREAM_ROUTE, agent: str = NATIVE_AGENT, **kwargs: object) -> bytes:
    h2 = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
    h2.initiate_connection()
    headers = [(k, agent if k == "user-agent" else v) for k, v in request_headers(route, "x")]
    h2.send_headers(1, headers, **kwargs)  # type: ignore[arg-type]
    return h2.data_to_send()


# -- routing ---------------------------------------------------------------------------------

def test_a_native_opening_is_told_from_any_other() -> None:
    assert is_native_opening(opening(STREAM_ROUTE))
    assert is_native_opening(opening(PRIORITY_ROUTE))
    assert is_native_opening(opening(STREAM_ROUTE, priority_weight=16))  # PRIORITY flag
    assert not is_native_opening(opening(SEND_ROUTE))  # a unary call stays with grpclib
    assert not is_native_opening(opening(STREAM_ROUTE, agent="grpc-python-grpclib/0.4.9"))
    full = opening()
    assert opening_headers(full) is not None
    for cut in (len(PREFACE), len(PREFACE) + 9, len(full) - 1):  # split first reads
        assert not is_native_opening(full[:cut])
    assert not is_native_opening(b"GET / HTTP/1.1\r\n\r\n")
    assert not is_native_opening(PREFACE + b"\x00\x00\x04\x01\x04\x00\x00\x00\x01\xff\xff\xff\xff")


def test_the_message_reader_checks_each_prefix_before_keeping_its_body() -> None:
    reader = MessageReader(cap=100)
    one, two = frame_raft_message(b"a" * 10), frame_raft_message(b"b" * 20)
    data = one + two
    assert reader.feed(data[:3]) == []
    assert reader.inside_message
    got = reader.feed(data[3:len(one) + 4])
    assert [RaftMessage.parse(b).message for b in got] == [b"a" * 10]
    got = reader.feed(data[len(one) + 4:])
    assert [RaftMessage.parse(b).message for b in got] == [b"b" * 20]
    assert not reader.inside_message
    cases = [(b"\x01" + struct.pack(">I", 1), Status.UNIMPLEMENTED),
             (b"\x07" + struct.pack(">I", 1), Status.INVALID_ARGUMENT),
             (b"\x00" + struct.pack(">I", 101), Status.RESOURCE_EXHAUSTED)]
    for prefix, status in cases:
        with pytest.raises(WireError) as info:
            MessageReader(cap=100).feed(prefix)
        assert info.value.status is status


# -- through GRPCTransport -----------------------------------------------------------------------

async def loop_noop() -> None:
    """Run on a transport's loop: everything queued there before it has run."""

async def test_both_lanes_go_native_and_never_touch_the_grpclib_client() -> None:
    async with grpc_pair() as (a, b, inbox):
        beats = [Message(MessageType.HEARTBEAT, to=2, from_=1, term=3, commit=i)
                 for i in range(20)]
        appends = [app(i, n_entries=2) for i in range(20)]
        for hb, m in zip(beats, appends):
            await a.send(hb)
            await a.send(m)
        await inbox.wait_for(40)
        assert [m for m in inbox.messages if m.type is MessageType.HEARTBEAT] == beats
        assert [m for m in inbox.messages if m.type is MessageType.APP] == appends
        assert b.bridge is not None
        await b.bridge.run(loop_noop)  # the gRPC server's loop has seen the hand-overs
        sent, got = a.stats(), b.stats()
        assert sent["stream_opens"] == 1 and sent["priority_opens"] == 1
        assert sent["stream_messages"] == 20 and sent["priority_messages"] == 20
        assert a._client is not None and a._client.channels == {}  # no grpclib connection
        assert got["native_connections"] == 2
        assert got["messages_received"] == 40
        assert got["open_connections"] == 0  # handed over: the gRPC server holds none


async def test_a_grpclib_client_of_the_same_route_is_served_by_grpclib() -> None:
    inbox = Inbox()
    server = GRPCTransport()
    server.attach(inbox, None)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve, "127.0.0.1", 0)
        frames = [encode_message(app(i)) for i in range(3)]
        bridge = server.bridge
        assert bridge is not None

        async def call() -> None:
            channel = Channel("127.0.0.1", port)
            try:
                async with channel.request(STREAM_ROUTE, Cardinality.STREAM_UNARY,
                                           RaftMessage, Ack) as stream:
                    for frame in frames:
                        await stream.send_message(RaftMessage(message=frame))
                    await stream.end()
                    await stream.recv_message()
            finally:
                channel.close()

        await bridge.run(call)
        await inbox.wait_for(3)
        assert inbox.messages == [app(i) for i in range(3)]
        assert server.stats()["native_connections"] == 0
        await server.aclose()


async def test_the_native_client_talks_to_a_server_without_native_lanes() -> None:
    async with grpc_pair(b_kwargs={"native_lanes": False}) as (a, b, inbox):
        await a.send(Message(MessageType.VOTE, to=2, from_=1, term=4))
        for i in range(5):
            await a.send(app(i))
        await inbox.wait_for(6)
        assert a.stats()["stream_opens"] == 1 and a.stats()["priority_opens"] == 1
        assert a._client is not None and a._client.channels == {}
        assert "native_connections" not in b.stats()


# -- the native server against a raw HTTP/2 client ---------------------------------------------

class RawCall:
    """An h2 client of one native connection, written by hand to send what a well-behaved
    client never would."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.sock = stream
        self.h2 = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))

    async def open(self, route: str = STREAM_ROUTE, sid: int = 1) -> None:
        if sid == 1:
            self.h2.initiate_connection()
        self.h2.send_headers(sid, request_headers(route, "x"))
        await self.flush()

    async def flush(self) -> None:
        out = self.h2.data_to_send()
        if out:
            await self.sock.send_all(out)

    async def send(self, data: bytes, sid: int = 1, end: bool = False) -> None:
        self.h2.send_data(sid, data, end_stream=end)
        await self.flush()

    async def status(self, sid: int = 1) -> tuple[int, str]:
        """The grpc-status and grpc-message that end call ``sid``."""
        found: dict[str, str] = {}
        with trio.fail_after(5):
            while True:
                data = await self.sock.receive_some(65536)
                assert data, "the server closed the connection"
                for ev in self.h2.receive_data(data):
                    if isinstance(ev, ResponseReceived | TrailersReceived) and \
                            ev.stream_id == sid:
                        found.update({str(k): str(v) for k, v in ev.headers or ()})
                    if isinstance(ev, StreamEnded) and ev.stream_id == sid:
                        await self.flush()
                        return int(found["grpc-status"]), found.get("grpc-message", "")
                await self.flush()


@asynccontextmanager
async def native_server(**kwargs: object) -> AsyncIterator[tuple[GRPCTransport, Inbox, int]]:
    inbox = Inbox()
    server = GRPCTransport(**kwargs)  # type: ignore[arg-type]
    server.attach(inbox, None)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve, "127.0.0.1", 0)
        try:
            yield server, inbox, port
        finally:
            await server.aclose()


@pytest.mark.parametrize(("body", "status"), [
    (b"\x01" + struct.pack(">I", 3) + b"abc", Status.UNIMPLEMENTED),  # compressed
    (frame_raft_message(b"\xff\xfe not a raft frame"), Status.INVALID_ARGUMENT),
    (b"\x00" + struct.pack(">I", 3) + b"\xff\xff\xff", Status.INVALID_ARGUMENT),  # protobuf
    (b"\x00" + struct.pack(">I", 1) + b"\x0b", Status.INVALID_ARGUMENT),  # no frame in it
    (b"\x00" + struct.pack(">I", 9 << 20), Status.RESOURCE_EXHAUSTED),  # over the cap
], ids=["compressed", "bad frame", "bad protobuf", "no frame", "over the cap"])
async def test_bad_input_ends_the_call_with_a_status_and_the_server_keeps_serving(
        body: bytes, status: Status) -> None:
    async with native_server(max_message_bytes=8 << 20) as (server, inbox, port):
        raw = RawCall(await trio.open_tcp_stream("127.0.0.1", port))
        await raw.open()
        await raw.send(frame_raft_message(encode_message(app(1))))
        await raw.send(body)
        code, _ = await raw.status()
        assert code == status.value
        assert inbox.messages == [app(1)]  # what came before the bad message was handled
        await raw.open(sid=3)  # the same connection serves a new call
        await raw.send(frame_raft_message(encode_message(app(2))), sid=3, end=True)
        assert await raw.status(3) == (0, "")
        assert inbox.messages == [app(1), app(2)]
        assert server.stats()["messages_rejected"] == 1
        await raw.sock.aclose()


async def test_a_call_that_ends_inside_a_message_or_on_another_route_is_refused() -> None:
    async with native_server() as (_server, inbox, port):
        raw = RawCall(await trio.open_tcp_stream("127.0.0.1", port))
        await raw.open()
        await raw.send(frame_raft_message(encode_message(app(1)))[:-2], end=True)
        code, message = await raw.status()
        assert code == Status.INVALID_ARGUMENT.value and "inside a message" in message
        await raw.open(SEND_ROUTE, sid=3)  # unary routes are grpclib's, not on this connection
        assert (await raw.status(3))[0] == Status.UNIMPLEMENTED.value
        assert inbox.messages == []
        await raw.sock.aclose()


async def test_handler_errors_end_the_native_call_and_the_next_send_reports_them() -> None:
    async with grpc_pair() as (a, _b, inbox):
        await a.send(app(1))
        await inbox.wait_for(1)
        inbox.fail_with = OSError("disk gone")
        await a.send(app(2))  # written; the handler's error ends the call
        with trio.fail_after(5):
            while True:
                try:
                    await a.send(app(3))
                except DispatchError as exc:
                    assert exc.code == "Internal" and "disk gone" in str(exc)
                    break
                await trio.sleep(0.01)
        inbox.fail_with = None
        await a.send(app(4))  # a new call on a new connection
        await inbox.wait_for(2)
        assert inbox.messages[-1] == app(4)
        assert a.stats()["stream_reconnects"] == 1


async def test_a_send_cancelled_while_waiting_for_credit_closes_its_call() -> None:
    gate = trio.Event()
    limits = ServerLimits(stream_window=64 * 1024, connection_window=64 * 1024)
    async with grpc_pair(b_kwargs={"limits": limits}) as (a, _b, inbox):
        async def held(_m: Message) -> None:
            await gate.wait()

        inbox.hook = held
        big = app(1, n_entries=1, size=200 * 1024)  # more than the windows let through
        await a.send(app(0))
        with trio.move_on_after(0.5) as scope:
            await a.send(big)
        assert scope.cancelled_caught
        assert a.stats()["open_streams"] == 0  # half-written: the call is gone
        inbox.hook = None
        gate.set()
        await a.send(app(2))
        await inbox.wait_for(2)
        assert inbox.messages[-1] == app(2)


async def test_the_native_server_has_its_own_connection_cap() -> None:
    async with native_server(limits=ServerLimits(max_connections=1)) as (server, inbox, port):
        first = RawCall(await trio.open_tcp_stream("127.0.0.1", port))
        await first.open()
        await first.send(frame_raft_message(encode_message(app(1))))
        await inbox.wait_for(1)
        second = RawCall(await trio.open_tcp_stream("127.0.0.1", port))
        await second.open()
        with trio.fail_after(5):
            assert await second.sock.receive_some(65536) == b""  # closed unanswered
        assert server.stats()["native_connections_refused"] == 1
        await first.sock.aclose()
        await second.sock.aclose()


async def test_bodies_being_read_are_bounded_by_the_native_servers_budget() -> None:
    limits = ServerLimits(receive_budget_bytes=10 << 20, max_app_message_bytes=1 << 20)
    big = b"\x00" + struct.pack(">I", 8 << 20) + b"x" * 1024  # 8 MiB declared, 1 KiB sent
    async with native_server(max_message_bytes=8 << 20, limits=limits) as (server, _inbox, port):
        native = server._native.server if server._native is not None else None
        assert native is not None
        first = RawCall(await trio.open_tcp_stream("127.0.0.1", port))
        await first.open()
        await first.send(big)
        with trio.fail_after(5):  # the first body is being read: its length is reserved
            while native.budget.used != 8 << 20:
                await trio.sleep(0.01)
        second = RawCall(await trio.open_tcp_stream("127.0.0.1", port))
        await second.open()
        await second.send(big)
        code, message = await second.status()
        assert code == Status.RESOURCE_EXHAUSTED.value and "retry later" in message
        assert native.budget.used == 8 << 20
        await first.sock.aclose()  # the connection goes: its reservation comes back
        with trio.fail_after(5):
            while native.budget.used:
                await trio.sleep(0.01)
        await second.open(sid=3)
        await second.send(big, sid=3)
        with trio.fail_after(5):
            while native.budget.used != 8 << 20:
                await trio.sleep(0.01)
        await second.sock.aclose()


async def test_a_write_on_a_broken_connection_ends_the_call_as_unavailable() -> None:
    ours, theirs = trio.socket.socketpair()
    stream = NativeStream(BULK, "peer", trio.SocketStream(ours))
    stream._h2.initiate_connection()  # as start() leaves it, without the peer's answers
    stream._h2.send_headers(3, request_headers(STREAM_ROUTE, "peer"))
    theirs.close()
    with pytest.raises(PeerStreamClosedError) as info:
        await stream.send(encode_message(app(1)))
    assert isinstance(info.value.__cause__, trio.BrokenResourceError)
    assert stream.closed
    assert classify(info.value) == "Unavailable"  # how the transport counts it
    with pytest.raises(PeerStreamClosedError):
        await stream.send(encode_message(app(2)))
    ours.close()


# -- properties: whatever arrives, a typed answer ------------------------------------------------

@given(st.binary(max_size=700))
@settings(max_examples=400, deadline=None)
def test_any_first_read_is_routed_without_raising(data: bytes) -> None:
    for first in (data, PREFACE + data, opening()[:len(PREFACE) + 9] + data):
        assert isinstance(is_native_opening(first), bool)


@given(st.data())
@settings(max_examples=300, deadline=None)
def test_a_damaged_opening_is_routed_without_raising(data: st.DataObject) -> None:
    raw = bytearray(opening())
    for _ in range(data.draw(st.integers(1, 6))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    assert isinstance(is_native_opening(bytes(raw)), bool)


@given(st.lists(st.binary(max_size=300), max_size=8), st.data())
@settings(max_examples=300, deadline=None)
def test_the_reader_returns_exactly_the_messages_however_they_are_split(
        bodies: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(b"\x00" + struct.pack(">I", len(b)) + b for b in bodies)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    reader, got, last = MessageReader(cap=300), [], 0
    for cut in [*cuts, len(stream)]:
        got += reader.feed(stream[last:cut])
        last = cut
    assert got == bodies
    assert not reader.inside_message


@given(st.binary(max_size=400))
@settings(max_examples=1000, deadline=None)
def test_the_reader_refuses_garbage_only_with_a_status(data: bytes) -> None:
    try:
        MessageReader(cap=100).feed(data)
    except WireError as exc:
        assert exc.status in (Status.UNIMPLEMENTED, Status.INVALID_ARGUMENT,
                              Status.RESOURCE_EXHAUSTED)


async def test_garbage_after_a_native_opening_leaves_the_server_serving() -> None:
    rng = random.Random(1414)
    async with native_server() as (server, inbox, port):
        for _ in range(20):
            sock = await trio.open_tcp_stream("127.0.0.1", port)
            await sock.send_all(opening() + rng.randbytes(rng.randrange(1, 2000)))
            await sock.aclose()  # whatever the server made of it, the client is gone
        raw = RawCall(await trio.open_tcp_stream("127.0.0.1", port))
        await raw.open()
        await raw.send(frame_raft_message(encode_message(app(7))), end=True)
        assert await raw.status() == (0, "")
        assert inbox.messages[-1] == app(7)
        await raw.sock.aclose()
        native = server._native.server if server._native is not None else None
        assert native is not None
        with trio.fail_after(5):  # every connection ended, none left behind
            while native.open_connections:
                await trio.sleep(0.01)
