"""The priority lane: heartbeats, votes, read-index and timeout-now on a stream and a connection
of their own (docs/transport.md, section 3.3), with unary ``Send`` for peers without it."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from grpclib.const import Handler

from tests.transport.conftest import Inbox, app, grpc_pair
from tests.transport.snapshot_helpers import SPOOL_WRITES, ProbedExchange, snap_msg, write_fsm
from trio_raft.core.messages import PRIORITY_MESSAGE_TYPES, Message, MessageType
from trio_raft.errors import DispatchError
from trio_raft.testing.faults import Hold
from trio_raft.transport import GRPCTransport, TransportPeer
from trio_raft.transport.grpc_limits import ServerLimits
from trio_raft.transport.grpc_server import RaftTransportService
from trio_raft.transport.routes import PRIORITY_ROUTE
from trio_raft.transport.snapshot_transfer import ChunkPipe

MiB = 1 << 20


def priority_messages(n: int, term: int = 5) -> list[Message]:
    kinds = [MessageType.HEARTBEAT, MessageType.VOTE, MessageType.READ_INDEX,
             MessageType.HEARTBEAT_RESP, MessageType.PRE_VOTE, MessageType.TIMEOUT_NOW]
    assert set(kinds) <= PRIORITY_MESSAGE_TYPES
    return [Message(kinds[i % len(kinds)], to=2, from_=1, term=term, commit=i,
                    context=i.to_bytes(4, "big") if kinds[i % len(kinds)]
                    is MessageType.READ_INDEX else b"")
            for i in range(n)]


class OlderService(RaftTransportService):
    """The service of a node from before the priority lane: no ``PriorityStream``."""

    def __mapping__(self) -> dict[str, Handler]:
        routes = super().__mapping__()
        del routes[PRIORITY_ROUTE]
        return routes


@asynccontextmanager
async def serving(port: int, inbox: Inbox, *, older: bool = False,
                  **kwargs: Any) -> AsyncIterator[GRPCTransport]:
    if older:  # nor did such a node serve the native lanes
        kwargs.setdefault("native_lanes", False)
    t = GRPCTransport(**kwargs)
    if older:
        t.service = OlderService(t)
    t.attach(inbox, None)
    async with trio.open_nursery() as nursery:
        await nursery.start(t.serve, "127.0.0.1", port)
        try:
            yield t
        finally:
            await t.aclose()


async def free_port() -> int:
    with trio.socket.socket() as s:
        await s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_priority_messages_keep_their_order_on_their_own_stream_and_connection() -> None:
    async with grpc_pair() as (a, _b, inbox):
        prio = priority_messages(60)
        bulk = [app(i, n_entries=2) for i in range(60)]
        for p, m in zip(prio, bulk):  # interleaved, one task: each lane keeps its order
            await a.send(p)
            await a.send(m)
        await inbox.wait_for(120)
        got_prio = [m for m in inbox.messages if m.type in PRIORITY_MESSAGE_TYPES]
        got_bulk = [m for m in inbox.messages if m.type not in PRIORITY_MESSAGE_TYPES]
        assert got_prio == prio
        assert got_bulk == bulk
        stats = a.stats()
        assert stats["priority_messages"] == 60 and stats["priority_opens"] == 1
        assert stats["stream_messages"] == 60 and stats["stream_opens"] == 1
        assert stats["unary_messages"] == 0
        assert stats["channels"] == 2  # the main connection and the priority one
        assert a.dispatch_error_counts_by_code() == {}


async def test_concurrent_priority_senders_each_deliver_exactly_once() -> None:
    async with grpc_pair() as (a, _b, inbox):
        async with trio.open_nursery() as nursery:
            for k in range(8):
                async def sender(k: int = k) -> None:
                    for i in range(25):
                        await a.send(Message(MessageType.HEARTBEAT, to=2, from_=1, term=k,
                                             commit=i))
                nursery.start_soon(sender)
        await inbox.wait_for(200)
        for k in range(8):  # each task's messages in the order it sent them
            assert [m.commit for m in inbox.messages if m.term == k] == list(range(25))
        assert a.stats()["priority_opens"] == 1


async def test_a_peer_without_the_rpc_gets_unary_calls_on_the_priority_connection() -> None:
    port = await free_port()
    inbox = Inbox()
    async with serving(port, inbox, older=True), GRPCTransport(
            [TransportPeer(2, "n2", f"127.0.0.1:{port}")]) as a:
        prio = priority_messages(10)
        for m in prio:
            await a.send(m)
        await a.send(app(1))  # the replication lane is unaffected
        await inbox.wait_for(11)
        assert [m for m in inbox.messages if m.type in PRIORITY_MESSAGE_TYPES] == prio
        stats = a.stats()
        assert stats["priority_fallbacks"] == 1  # probed once, marked, then unary
        assert stats["unary_messages"] == 10
        assert stats["priority_opens"] == 0 and stats["priority_messages"] == 0
        assert stats["stream_messages"] == 1
        assert stats["channels"] == 2  # the unary calls still avoid the main connection
        assert a.dispatch_error_counts_by_code() == {}


async def test_the_lane_is_probed_again_once_the_mark_expires() -> None:
    port = await free_port()
    old_inbox, new_inbox = Inbox(), Inbox()
    async with GRPCTransport([TransportPeer(2, "n2", f"127.0.0.1:{port}")],
                             stream_reprobe_after=0.2) as a:
        async with serving(port, old_inbox, older=True):
            await a.send(Message(MessageType.HEARTBEAT, to=2, from_=1))
            await old_inbox.wait_for(1)
            assert a.stats()["priority_fallbacks"] == 1
        # The peer is upgraded (restarted with the lane): once the mark has expired, the next
        # priority message probes again and opens the stream.
        async with serving(port, new_inbox):
            with trio.fail_after(10):
                while a.stats()["priority_opens"] == 0:
                    with contextlib.suppress(DispatchError):  # the old connection's end
                        await a.send(Message(MessageType.HEARTBEAT, to=2, from_=1))
                    await trio.sleep(0.05)
            assert a.stats()["priority_messages"] >= 1
            await new_inbox.wait_for(1)


async def test_the_priority_stream_recovers_after_the_peer_restarts() -> None:
    port = await free_port()
    first, second = Inbox(), Inbox()
    async with GRPCTransport([TransportPeer(2, "n2", f"127.0.0.1:{port}")],
                             dispatch_timeout=2.0) as a:
        async with serving(port, first):
            for m in priority_messages(5):
                await a.send(m)
            await first.wait_for(5)
        failures = 0
        async with serving(port, second):
            delivered = 0
            with trio.fail_after(20):
                while delivered < 5:
                    try:
                        await a.send(Message(MessageType.HEARTBEAT, to=2, from_=1,
                                             commit=100 + delivered))
                        delivered += 1
                    except DispatchError as exc:
                        assert exc.code == "Unavailable"
                        failures += 1
                        await trio.sleep(0.02)
            await second.wait_for(5)
        assert [m.commit for m in second.messages][-5:] == [100, 101, 102, 103, 104]
        stats = a.stats()
        assert stats["priority_opens"] == 2 and stats["priority_reconnects"] == 1
        assert failures <= 3
        assert a.dispatch_error_counts_by_code().get("Unavailable", 0) == failures


@pytest.mark.parametrize("lane", ["priority stream", "unary on the main connection"])
async def test_a_heartbeat_does_not_wait_behind_a_stalled_snapshot(
        tmp_path: Path, lane: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The receiver holds the transfer after spooling 2 MiB and grants the same credit to a
    # stream as to a connection, so the snapshot stalls the whole main connection: nothing can
    # be sent on it until the receiver reads again.
    src = ProbedExchange(tmp_path / "src")
    dst = ProbedExchange(tmp_path / "dst")
    held = dst.io.add(Hold("write", path=SPOOL_WRITES, after=1))
    # Once the receiver's hand-off is full its handler stops reading the stream, so the
    # sender's credit, once spent, stays spent (white box: the pipe's put waits for room).
    pipe_full = threading.Event()
    real_put = ChunkPipe.put

    async def put(self: ChunkPipe, data: bytes) -> bool:
        if self.pending >= self.LIMIT:
            pipe_full.set()
        return await real_put(self, data)

    monkeypatch.setattr(ChunkPipe, "put", put)
    token = write_fsm(tmp_path / "src", 40, os.urandom(16 * MiB))
    window = ServerLimits(connection_window=MiB, stream_window=MiB)
    priority = lane == "priority stream"
    async with grpc_pair(snapshot_chunk_bytes=MiB, a_snapshots=src, b_snapshots=dst,
                         priority_stream=priority, dispatch_timeout=1.0,
                         b_kwargs={"limits": window}) as (a, _b, inbox):
        assert a._client is not None and a.bridge is not None
        address = a.peers()[2].address
        await a.send(Message(MessageType.HEARTBEAT, to=2, from_=1, commit=1))  # lanes open
        await inbox.wait_for(1)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(a.send_snapshot, snap_msg(40, token))
                with trio.fail_after(30):
                    await held.wait_reached()
                    await trio.to_thread.run_sync(pipe_full.wait, abandon_on_cancel=True)
                    while await a.bridge.run(_main_credit, a._client, address) > 0:
                        await trio.sleep(0.01)  # the sender is blocked on flow control
                hb = Message(MessageType.HEARTBEAT, to=2, from_=1, commit=2)
                if priority:
                    with trio.fail_after(5):
                        await a.send(hb)
                        await inbox.wait_for(2)
                    assert inbox.messages[-1] == hb
                else:
                    with pytest.raises(DispatchError) as info:
                        await a.send(hb)  # its message waits for credit that never comes
                    assert info.value.code == "DeadlineExceeded"
                    assert len(inbox.messages) == 1
                held.release()  # the transfer goes on and lands
        finally:
            held.release()
        await inbox.wait_for(3 if priority else 2)
        assert inbox.messages[-1].type is MessageType.SNAP


async def _main_credit(client: Any, address: str) -> int:
    """The sender's HTTP/2 credit left on its main connection to ``address`` (loop side)."""
    channel = client.channel(address)
    protocol = channel._protocol
    return int(protocol.connection._connection.outbound_flow_control_window)
