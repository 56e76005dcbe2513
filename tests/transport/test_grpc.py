"""GRPCTransport over real loopback gRPC: unary, streams, fallback, errors, cancellation, close."""

from __future__ import annotations

import errno
import threading

import pytest
import trio
from grpclib.server import Server

from tests.transport.conftest import app, grpc_pair
from trio_raft.core.messages import Message, MessageType
from trio_raft.errors import (
    DispatchError,
    StepQueueFullError,
    TransportAttachedError,
    TransportBindError,
    TransportClosedError,
    TransportHandlerNilError,
    TransportPeerUnknownError,
)
from trio_raft.transport import GRPCTransport, ServingTransport, Transport, TransportPeer
from trio_raft.transport._proto.trio_raft.transport.v1 import Ack, RaftMessage, RaftTransportBase
from trio_raft.transport.base import error_code
from trio_raft.transport.bridge import AsyncioBridge


def grpc_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("trio-raft-grpc")]


async def test_protocol_conformance() -> None:
    transport: ServingTransport = GRPCTransport()  # mypy checks the signatures
    assert isinstance(transport, Transport)
    assert isinstance(transport, ServingTransport)


@pytest.mark.parametrize("native", [True, False], ids=["native lanes", "grpclib lanes"])
async def test_unary_and_stream_delivery_in_order(native: bool) -> None:
    async with grpc_pair(priority_stream=False, native_lanes=native) as (a, _b, inbox):
        hb = Message(MessageType.HEARTBEAT, to=2, from_=1, term=3, commit=7)
        await a.send(hb)  # priority type, without the priority lane: unary Send
        msgs = [app(i, n_entries=3) for i in range(50)]
        for m in msgs:
            await a.send(m)  # replication: the SendStream lane
        await inbox.wait_for(51)
        assert inbox.messages[0] == hb
        assert inbox.messages[1:] == msgs
        stats = a.stats()
        assert stats["unary_messages"] == 1
        assert stats["stream_messages"] == 50
        assert stats["stream_opens"] == 1
        assert stats["priority_opens"] == 0
        # no connection of the priority lane; the native bulk lane has a connection of its own
        assert stats["channels"] == (2 if native else 1)
        assert a.dispatch_error_counts_by_code() == {}


async def test_send_stream_disabled_uses_unary() -> None:
    async with grpc_pair(send_stream=False) as (a, _b, inbox):
        for i in range(5):
            await a.send(app(i))
        await inbox.wait_for(5)
        assert a.stats()["unary_messages"] == 5
        assert a.stats()["stream_opens"] == 0
        assert a.stats()["stream_messages"] == 0


async def test_handler_errors_come_back_as_status_codes() -> None:
    async with grpc_pair(priority_stream=False) as (a, b, inbox):
        inbox.fail_with = StepQueueFullError()
        with pytest.raises(DispatchError) as info:
            await a.send(Message(MessageType.VOTE, to=2, from_=1, term=4))
        assert info.value.code == "ResourceExhausted"
        assert error_code(info.value) == "ResourceExhausted"
        assert "StepQueueFullError" in str(info.value)
        # On the stream the failing message ends the stream; the next send reports it.
        await a.send(app(1))
        with trio.fail_after(5):
            while True:
                try:
                    await a.send(app(2))
                except DispatchError as exc:
                    assert exc.code == "ResourceExhausted"
                    break
                await trio.sleep(0.01)
        inbox.fail_with = None
        await b.detach()
        with pytest.raises(DispatchError) as info:
            await a.send(Message(MessageType.HEARTBEAT, to=2, from_=1))
        assert info.value.code == "Unavailable"
        assert TransportHandlerNilError.default_message in str(info.value)
        b.attach(inbox, None)
        with pytest.raises(TransportAttachedError):
            b.attach(inbox, None)
        with trio.fail_after(5):  # a new stream is opened and works again
            while True:
                try:
                    await a.send(app(3))
                    break
                except DispatchError:
                    await trio.sleep(0.01)
        await inbox.wait_for(1)
        counts = a.dispatch_error_counts_by_code()
        assert counts["ResourceExhausted"] >= 2
        assert counts["Unavailable"] >= 1
        assert a.dispatch_error_count() == sum(counts.values())
        assert a.stats()["stream_opens"] >= 2


async def test_unknown_peer_and_unreachable_peer_are_counted() -> None:
    async with grpc_pair(dispatch_timeout=2.0) as (a, _b, _inbox):
        with pytest.raises(TransportPeerUnknownError):
            await a.send(Message(MessageType.HEARTBEAT, to=9, from_=1))
        # A port nobody listens on.
        with trio.socket.socket() as s:
            await s.bind(("127.0.0.1", 0))
            dead_port = s.getsockname()[1]
        a.upsert_peer(TransportPeer(3, "n3", f"127.0.0.1:{dead_port}"))
        with pytest.raises(DispatchError) as info:
            await a.send(Message(MessageType.HEARTBEAT, to=3, from_=1))
        assert info.value.code == "Unavailable"
        with pytest.raises(DispatchError) as info:
            await a.send(app(1, to=3))
        assert info.value.code == "Unavailable"
        assert a.dispatch_error_counts_by_code() == {"Unknown": 1, "Unavailable": 2}


async def test_deadline_exceeded_is_counted() -> None:
    async with grpc_pair(dispatch_timeout=0.2, priority_stream=False) as (a, _b, inbox):
        async def slow(_m: Message) -> None:
            await trio.sleep(10)
        inbox.hook = slow
        with pytest.raises(DispatchError) as info:
            await a.send(Message(MessageType.HEARTBEAT, to=2, from_=1))
        assert info.value.code == "DeadlineExceeded"


async def test_message_over_the_cap_is_refused_locally() -> None:
    async with grpc_pair(max_message_bytes=4 << 20, snapshot_chunk_bytes=1 << 20) as (
            a, _b, inbox):
        with pytest.raises(DispatchError) as info:
            await a.send(app(1, n_entries=1, size=5 << 20))
        assert info.value.code == "ResourceExhausted"
        await a.send(app(2, n_entries=1, size=3 << 20))
        await inbox.wait_for(1)


class _UnaryOnly(RaftTransportBase):
    """A peer that predates SendStream (the generated base answers UNIMPLEMENTED)."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []

    async def send(self, message: RaftMessage) -> Ack:
        self.frames.append(message.message)
        return Ack()


async def test_stream_falls_back_to_unary_on_unimplemented_and_reprobes() -> None:
    legacy = _UnaryOnly()
    async with AsyncioBridge() as bridge:
        async def start() -> tuple[Server, int]:
            server = Server([legacy])
            await server.start("127.0.0.1", 0)
            return server, server._server.sockets[0].getsockname()[1]

        server, port = await bridge.run(start)
        try:
            a = GRPCTransport(stream_reprobe_after=30.0)
            async with a:
                a.upsert_peer(TransportPeer(2, "n2", f"127.0.0.1:{port}"))
                for i in range(3):
                    await a.send(app(i))
                stats = a.stats()
                assert len(legacy.frames) == 3
                assert stats["unary_messages"] == 3
                assert stats["stream_fallbacks"] == 1  # probed once, then marked unsupported
                assert stats["stream_opens"] == 0
                assert a.bridge is not None
                client = a._client
                assert client is not None

                async def expire() -> None:  # as if stream_reprobe_after had passed
                    for address in client.unsupported:
                        client.unsupported[address] -= 60.0

                await a.bridge.run(expire)
                await a.send(app(4))  # mark expired: probes again, falls back again
                assert a.stats()["stream_fallbacks"] == 2
                assert len(legacy.frames) == 4
                assert a.dispatch_error_count() == 0
        finally:
            async def stop() -> None:
                server.close()
                await server.wait_closed()
            await bridge.run(stop)


async def test_cancelling_a_send_cancels_the_rpc() -> None:
    async with grpc_pair(priority_stream=False) as (a, _b, inbox):
        started = trio.Event()
        handler_cancelled = trio.Event()

        async def block(_m: Message) -> None:
            started.set()
            try:
                await trio.sleep_forever()
            finally:
                handler_cancelled.set()
        inbox.hook = block
        with trio.move_on_after(5) as outer:
            async with trio.open_nursery() as nursery:
                cancel_scope = trio.CancelScope()

                async def send() -> None:
                    with cancel_scope:
                        await a.send(Message(MessageType.HEARTBEAT, to=2, from_=1))
                nursery.start_soon(send)
                await started.wait()
                t0 = trio.current_time()
                cancel_scope.cancel()
            assert trio.current_time() - t0 < 3.0  # not the 5 s dispatch timeout
            await handler_cancelled.wait()  # the server-side handler saw the cancellation
        assert not outer.cancelled_caught
        assert a.dispatch_error_count() == 0  # cancellation is not a dispatch error
        inbox.hook = None
        await a.send(Message(MessageType.HEARTBEAT, to=2, from_=1))  # channel still usable
        await inbox.wait_for(1)


async def test_aclose_with_open_streams_is_fast_and_leaves_no_thread() -> None:
    before = len(grpc_threads())
    with trio.fail_after(10):
        async with grpc_pair() as (a, b, inbox):
            async def block(m: Message) -> None:
                if m.index == 99:
                    await trio.sleep_forever()
            inbox.hook = block
            for i in range(20):
                await a.send(app(i))
            await inbox.wait_for(20)
            outcomes: list[str] = []

            async def send(m: Message) -> None:
                try:
                    await a.send(m)
                    outcomes.append("ok")
                except (DispatchError, TransportClosedError) as exc:
                    outcomes.append(type(exc).__name__)

            async with trio.open_nursery() as nursery:
                # One stream send blocked in the peer's handler, one unary call too.
                nursery.start_soon(send, app(99))
                nursery.start_soon(send, Message(MessageType.HEARTBEAT, to=2, from_=1,
                                                 index=99))
                await trio.sleep(0.2)
                assert len(grpc_threads()) == before + 2
                t0 = trio.current_time()
                await b.aclose()
                await a.aclose()
                elapsed = trio.current_time() - t0
                nursery.cancel_scope.cancel()
            assert elapsed < 3.0, elapsed  # not the 5 s dispatch timeout
            assert len(outcomes) == 2  # both calls ended (the unary one with an error)
    assert len(grpc_threads()) == before
    with pytest.raises(TransportClosedError):
        await a.send(app(1))


async def test_cancelling_serve_stops_everything() -> None:
    before = len(grpc_threads())
    t = GRPCTransport()
    async with trio.open_nursery() as nursery:
        await nursery.start(t.serve, "127.0.0.1", 0)
        nursery.cancel_scope.cancel()
    assert len(grpc_threads()) == before
    with pytest.raises(TransportClosedError):
        await t.serve("127.0.0.1", 0)
    await t.aclose()  # idempotent


async def loop_barrier(t: GRPCTransport) -> None:
    """Return once everything ``t`` queued on its asyncio loop before this call has run."""
    async def nothing() -> None:
        pass

    assert t.bridge is not None
    await t.bridge.run(nothing)  # the loop runs callbacks in the order they were queued


async def test_remove_and_readdress_peer_closes_old_connection() -> None:
    async with grpc_pair() as (a, _b, inbox):
        await a.send(app(1))
        await inbox.wait_for(1)
        assert a.stats()["channels"] == 1
        old = a.peers()[2]
        a.upsert_peer(TransportPeer(2, "n2", "127.0.0.1:1"))
        await loop_barrier(a)
        assert a.stats()["channels"] == 0
        assert a.stats()["open_streams"] == 0
        a.upsert_peer(old)
        await a.send(app(2))
        await inbox.wait_for(2)
        assert a.stats()["stream_reconnects"] == 0  # marks were dropped with the address
        a.remove_peer(2)
        await loop_barrier(a)
        assert a.stats()["channels"] == 0
        with pytest.raises(TransportPeerUnknownError):
            await a.send(app(3))


async def test_serve_with_extra_handlers_and_register() -> None:
    legacy = _UnaryOnly()
    t = GRPCTransport()
    handlers: list[object] = []
    t.register(handlers)
    assert handlers == [t.service]
    async with trio.open_nursery() as nursery:
        # The application's own service shares the transport's port and loop.
        port = await nursery.start(lambda task_status: t.serve(
            "127.0.0.1", 0, handlers=[], task_status=task_status))
        assert isinstance(port, int) and port > 0
        await t.aclose()
    assert legacy.frames == []
    with pytest.raises(TypeError):
        t.register(object())


async def test_serve_on_an_address_in_use_raises_a_typed_error_naming_it() -> None:
    with trio.socket.socket() as taken:
        await taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        transport = GRPCTransport([TransportPeer(2, "n2", "127.0.0.1:1")],
                                  local_address=f"127.0.0.1:{port}")
        async with trio.open_nursery() as nursery:
            with pytest.raises(TransportBindError) as info:
                await nursery.start(transport.serve)
    err = info.value
    assert err.address == f"127.0.0.1:{port}"
    assert f"127.0.0.1:{port}" in str(err)
    assert isinstance(err.__cause__, OSError) and err.__cause__.errno == errno.EADDRINUSE
    assert isinstance(err, OSError)  # callers that catch a failed bind as OSError still do
    assert grpc_threads() == []  # everything serve started is stopped
    with pytest.raises(TransportClosedError):
        await transport.send(Message(MessageType.HEARTBEAT, to=2, from_=1))
