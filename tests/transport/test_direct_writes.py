"""Direct writes on the native lanes (docs/transport.md 3.9): ``GRPCTransport.send_nowait``
over real loopback connections, the order kept when the socket takes only part of a write, and
the ``RaftMessage`` wrapper written and read without betterproto2's reflection."""

from __future__ import annotations

import socket

import pytest
import trio
import trio.testing
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import DataReceived
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.transport.conftest import app, grpc_pair
from trio_raft.core.messages import Message, MessageType
from trio_raft.errors import CodecError, PeerStreamClosedError
from trio_raft.transport._proto.trio_raft.transport.v1 import RaftMessage
from trio_raft.transport.base import DirectSend
from trio_raft.transport.grpc_client import BULK
from trio_raft.transport.native_client import NativeStream
from trio_raft.transport.native_server import _frame_of
from trio_raft.transport.native_wire import (
    MessageReader,
    frame_raft_message,
    raft_message_frame,
    request_headers,
)
from trio_raft.transport.routes import STREAM_ROUTE


async def test_a_free_open_lane_is_written_without_yielding_and_arrives_in_order() -> None:
    async with grpc_pair() as (a, _b, inbox):
        assert isinstance(a, DirectSend)
        first = app(1)
        assert a.send_nowait(first) is None  # no stream yet: the sender task opens it
        await a.send(first)
        before = a.stats()["stream_messages"]
        with trio.testing.assert_no_checkpoints():
            written = [a.send_nowait(app(i)) for i in range(2, 12)]
        assert all(isinstance(w, float) for w in written)
        assert a.stats()["stream_messages"] == before + 10
        beat = Message(MessageType.HEARTBEAT, to=2, from_=1, term=3, commit=7)
        assert a.send_nowait(beat) is None  # the priority lane has no stream yet
        await inbox.wait_for(11)
        assert [m.index for m in inbox.messages] == list(range(1, 12))
        assert [m.entries for m in inbox.messages] == [app(i).entries for i in range(1, 12)]

        unknown = Message(MessageType.APP, to=9, from_=1, term=3)
        assert a.send_nowait(unknown) is None  # no such peer: left to send(), which reports
        snap = Message(MessageType.SNAP, to=2, from_=1, term=3)
        assert a.send_nowait(snap) is None


async def test_a_lane_busy_with_a_send_is_not_written_over() -> None:
    async with grpc_pair() as (a, _b, inbox):
        await a.send(app(1))
        native = a._native
        assert native is not None and native.client is not None
        stream = native.client.streams[(BULK.name, b_address(a))]
        async with stream._send_lock:  # a sender task in the middle of its write
            assert a.send_nowait(app(2)) is None
        assert a.send_nowait(app(2)) is not None
        stream.close()
        assert a.send_nowait(app(3)) is None  # a closed stream: send() reports and reopens
        await inbox.wait_for(2)
        assert [m.index for m in inbox.messages] == [1, 2]


def b_address(a: object) -> str:
    peers = a._peers  # type: ignore[attr-defined]
    return str(peers[2].address)


async def test_what_the_socket_does_not_take_goes_out_first_and_whole() -> None:
    """A socket that stops taking bytes mid-message: the rest is written by a flush task
    before anything else, direct writes wait for it, and the peer reads every message whole
    and in order."""
    left, right = socket.socketpair()
    left.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    left.setblocking(False)
    stream = NativeStream(BULK, "peer", trio.SocketStream(trio.socket.from_stdlib_socket(left)))
    h2 = stream._h2
    h2.initiate_connection()
    h2.send_headers(3, request_headers(STREAM_ROUTE, "peer"))  # the call a start() opens
    frames = [bytes([i]) * 900 for i in range(60)]  # within the default 64 KiB window
    sent: list[bytes] = []
    async with trio.open_nursery() as nursery:
        stream._nursery = nursery
        for frame in frames:
            if stream.try_send(frame) is None:
                break
            sent.append(frame)
        assert 0 < len(sent) < len(frames)  # the socket filled up within the window
        assert stream._backlog  # part of a message waits for the flush task
        assert stream.try_send(frames[len(sent)]) is None  # nothing may overtake it

        async def send_rest() -> None:
            for frame in frames[len(sent):]:
                await stream.send(frame)

        nursery.start_soon(send_rest)
        server = H2Connection(H2Configuration(client_side=False))
        reader = MessageReader(cap=1 << 20)
        got: list[bytes] = []
        peer = trio.socket.from_stdlib_socket(right)
        with trio.fail_after(10):
            while len(got) < len(frames):
                data = await peer.recv(65536)
                assert data
                for event in server.receive_data(data):
                    if isinstance(event, DataReceived):
                        got.extend(_frame_of(body) for body in reader.feed(event.data))
        assert got == frames
    await stream._close_socket()  # what its reader task would do (a start() runs one)
    peer.close()


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.sampled_from([1, 127, 128, 16383, 16384, 70000]))
def test_the_wrapper_is_written_as_betterproto2_writes_it(frame: bytes, pad: int) -> None:
    for f in (frame, frame + b"z" * pad):
        body = bytes(RaftMessage(message=f))
        assert frame_raft_message(f) == b"\x00" + len(body).to_bytes(4, "big") + body
        assert raft_message_frame(body) == (f or None)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=40))
def test_any_body_is_read_as_betterproto2_reads_it(body: bytes) -> None:
    """The quick reading only takes the message field alone; every other body gets protobuf's
    full rules (repeated or unknown fields), or a typed error."""
    quick = raft_message_frame(body)
    try:
        parsed = RaftMessage.parse(body).message
    except Exception:
        parsed = None
    reference = parsed if isinstance(parsed, bytes) else None
    if quick is not None:
        assert quick == reference
    if reference is not None:
        assert _frame_of(body) == reference
    else:
        with pytest.raises(CodecError):
            _frame_of(body)


def test_bodies_outside_the_canonical_form_take_the_reference_path() -> None:
    repeated = b"\x0a\x01a\x0a\x01b"  # a field seen twice: protobuf keeps the last
    unknown = b"\x0a\x01a\x12\x01b"  # field 2 is unknown and skipped
    empty = b"\x0a\x00"  # an empty frame, written out
    for body in (repeated, unknown, empty):
        assert raft_message_frame(body) is None
    assert _frame_of(repeated) == b"b"
    assert _frame_of(unknown) == b"a"
    assert _frame_of(empty) == b""  # the codec refuses it next (docs/transport.md 3.8)
    assert raft_message_frame(b"\x0a\x81\x00a") == b"a"  # a length in two bytes: same value


async def test_a_peer_gone_while_a_message_is_half_written_closes_only_that_call() -> None:
    left, right = socket.socketpair()
    left.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    left.setblocking(False)
    stream = NativeStream(BULK, "peer", trio.SocketStream(trio.socket.from_stdlib_socket(left)))
    stream._h2.initiate_connection()
    stream._h2.send_headers(3, request_headers(STREAM_ROUTE, "peer"))
    async with trio.open_nursery() as nursery:
        stream._nursery = nursery
        for i in range(60):
            if stream.try_send(bytes([i]) * 900) is None:
                break
        assert stream._backlog and not stream.closed
        right.close()  # the flush task's write now fails
        with trio.fail_after(5):
            while not stream.closed:
                await trio.sleep(0.001)
        assert stream.try_send(b"x") is None
        with pytest.raises(PeerStreamClosedError):
            await stream.send(b"x")
    await stream._close_socket()
