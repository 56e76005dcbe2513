"""The server's limits (trio_raft/transport/grpc_limits.py) against clients that write raw
HTTP/2: declared lengths, the receive budget, SETTINGS, the connection cap, refusals."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
import pytest
import trio
from h2.errors import ErrorCodes

from tests.e2e.h2raw import RawConnection
from tests.transport.conftest import Inbox
from trio_raft.core.messages import Message, MessageType
from trio_raft.transport import GRPCTransport, TransportPeer
from trio_raft.transport.codec import encode_message
from trio_raft.transport.grpc_limits import ReceiveBudget, ServerLimits
from trio_raft.transport.routes import SEND_ROUTE, STREAM_ROUTE

MiB = 1 << 20
INVALID_ARGUMENT, RESOURCE_EXHAUSTED, UNIMPLEMENTED = 3, 8, 12
LIMITS = ServerLimits(receive_budget_bytes=8 * MiB, max_connections=3,
                      max_concurrent_streams=4, stream_window=256 * 1024,
                      connection_window=512 * 1024, refusal_drain_bytes=256 * 1024,
                      max_app_message_bytes=MiB)


@asynccontextmanager
async def served(limits: ServerLimits = LIMITS) -> AsyncIterator[tuple[GRPCTransport, str]]:
    server = GRPCTransport(limits=limits, max_message_bytes=5 * MiB,
                           snapshot_chunk_bytes=MiB)
    inbox = Inbox()
    server.attach(inbox, None)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve, "127.0.0.1", 0)
        try:
            yield server, f"127.0.0.1:{port}"
        finally:
            await server.aclose()


def heartbeat_body() -> bytes:
    frame = encode_message(Message(MessageType.HEARTBEAT, to=2, from_=1, term=1))
    return b"\x0a" + bytes([len(frame)]) + frame  # RaftMessage{message: frame}


async def in_thread(fn: object, *args: object) -> object:
    return await trio.to_thread.run_sync(fn, *args)  # type: ignore[arg-type]


def test_budget_keeps_a_share_for_small_messages() -> None:
    budget = ReceiveBudget(8 * MiB)
    big = budget.take(7 * MiB)
    assert big == ReceiveBudget.LARGE
    assert budget.take(1 * MiB) is None  # the large share is used up ...
    small = budget.take(1000)
    assert small == ReceiveBudget.SMALL  # ... small messages still fit in theirs
    budget.give(big, 7 * MiB)
    budget.give(small, 1000)
    assert budget.used == 0 and budget.refused == 1 and budget.peak == 7 * MiB + 1000


async def test_a_declared_length_over_the_cap_is_refused_before_its_body_is_read() -> None:
    def call(address: str) -> tuple[grpc.StatusCode, str]:
        options = [("grpc.max_send_message_length", -1)]
        with grpc.insecure_channel(address, options=options) as channel:
            try:
                channel.unary_unary(SEND_ROUTE)(b"\x0a\x80\x80\x80\x03" + bytes(6 * MiB),
                                                timeout=10)
            except grpc.RpcError as exc:
                return exc.code(), exc.details() or ""
        return grpc.StatusCode.OK, ""

    async with served() as (server, address):
        code, details = await in_thread(call, address)  # type: ignore[misc]
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "exceeds the limit of 5242880" in details
        assert server.stats()["receive_budget_peak"] == 0  # nothing of it was read


async def test_the_receive_budget_refuses_what_does_not_fit_and_serves_small_messages() -> None:
    async with served() as (server, address):
        holder = RawConnection(address)
        late = RawConnection(address)
        try:
            # A 5 MiB body being read slowly holds 5 of the 7 MiB of the large share.
            sid = holder.open_call(SEND_ROUTE)
            holder.send_prefix(sid, 5 * MiB)
            holder.send(sid, b"\x0a\x80\x80\x40" + b"x" * 1000)
            await in_thread(holder.pump, 0.2)
            assert server.stats()["receive_budget_used"] == 5 * MiB
            # Another one does not fit: refused at once, before its body is read.
            sid2 = late.open_call(SEND_ROUTE)
            late.send_prefix(sid2, 4 * MiB)
            state = await in_thread(late.wait_status, sid2, 10.0)
            assert state.status == RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
            assert "retry later" in state.message  # type: ignore[attr-defined]
            # A small message is still served, from its own share.
            sid3 = late.open_call(SEND_ROUTE)
            body = heartbeat_body()
            late.send(sid3, struct.pack(">?I", False, len(body)) + body, end=True)
            state = await in_thread(late.wait_status, sid3, 10.0)
            assert state.status == 0  # type: ignore[attr-defined]
            # The holder goes away: its reservation is returned.
            holder.close()
            with trio.fail_after(10):
                while server.stats()["receive_budget_used"]:
                    await trio.sleep(0.01)
        finally:
            holder.close()
            late.close()
        assert server.stats()["receive_budget_refusals"] == 1


async def test_settings_announce_the_limits_and_streams_past_them_cost_the_connection() -> None:
    async with served() as (_server, address):
        conn = RawConnection(address)
        try:
            await in_thread(conn.pump, 0.2)
            remote = conn.h2.remote_settings
            assert remote.max_concurrent_streams == 4
            assert remote.initial_window_size == 256 * 1024
            assert conn.h2.outbound_flow_control_window == 512 * 1024
        finally:
            conn.close()
        rude = RawConnection(address)  # opens streams before it has read the SETTINGS
        try:
            for _ in range(6):
                rude.open_call(STREAM_ROUTE)
            await in_thread(rude.pump, 2.0)
            assert rude.closed
        finally:
            rude.close()


async def test_connections_past_the_cap_get_goaway_and_are_closed() -> None:
    async with served() as (server, address):
        conns = [RawConnection(address) for _ in range(4)]
        try:
            for c in conns:
                await in_thread(c.pump, 0.2)
            refused = [c for c in conns if c.goaway is not None]
            assert len(refused) == 1
            assert refused[0].goaway == ErrorCodes.ENHANCE_YOUR_CALM and refused[0].closed
            assert server.stats()["refused_connections"] == 1
            assert server.stats()["open_connections"] == 3
            # One goes away: a new connection is accepted and served.
            next(c for c in conns if c.goaway is None).close()
            with trio.fail_after(10):
                while server.stats()["open_connections"] == 3:
                    await trio.sleep(0.01)
            fresh = RawConnection(address)
            conns.append(fresh)
            sid = fresh.open_call(SEND_ROUTE)
            body = heartbeat_body()
            fresh.send(sid, struct.pack(">?I", False, len(body)) + body, end=True)
            state = await in_thread(fresh.wait_status, sid, 10.0)
            assert state.status == 0 and fresh.goaway is None  # type: ignore[attr-defined]
            # Refused connections leave nothing behind (grpclib's server forgets their
            # request handlers).
            for _ in range(40):
                extra = RawConnection(address)
                conns.append(extra)
                await in_thread(extra.pump, 0.05)
                assert extra.goaway == ErrorCodes.ENHANCE_YOUR_CALM
            assert server._server is not None
            assert len(server._server._handlers) <= 3 + 10  # open ones + one gc interval
        finally:
            for c in conns:
                c.close()


@pytest.mark.parametrize("case", ["compressed", "bad-flag", "cut-short"])
async def test_malformed_framing_gets_its_status_once_the_request_ended(case: str) -> None:
    body = b"\xff" * 70_000  # more than one step of the drain; no framing inside
    after = struct.pack(">?I", False, 3) + b"abc"  # a message after the refused one
    async with served() as (server, address):
        conn = RawConnection(address)
        try:
            sid = conn.open_call(STREAM_ROUTE)
            if case == "compressed":
                data = struct.pack(">?I", True, len(body)) + body + after
            elif case == "bad-flag":
                data = b"\x07" + struct.pack(">I", len(body)) + body + after
            else:
                data = struct.pack(">?I", False, len(body) + 100) + body
            assert await in_thread(conn.send_all, sid, data)
            conn.send(sid, b"", end=True)
            state = await in_thread(conn.wait_status, sid, 10.0)
            await in_thread(conn.pump, 0.1)
        finally:
            conn.close()
        stats = server.stats()
    expected = {"compressed": UNIMPLEMENTED, "bad-flag": INVALID_ARGUMENT,
                "cut-short": INVALID_ARGUMENT}[case]
    assert state.status == expected  # type: ignore[attr-defined]
    # The status came after the client's end of the request, on a stream closed both ways.
    assert not state.reset  # type: ignore[attr-defined]
    assert stats["refusals_after_request_end"] == 1 and stats["refusals_reset"] == 0


async def test_a_refused_client_that_keeps_sending_is_reset_after_the_drain_bound() -> None:
    async with served() as (server, address):
        conn = RawConnection(address)
        try:
            sid = conn.open_call(STREAM_ROUTE)
            junk = b"\x0a\x05" + b"\x09junk"  # RaftMessage{message: b"\t junk"}: bad version
            conn.send(sid, struct.pack(">?I", False, len(junk)) + junk)
            # Keeps streaming valid framing past refusal_drain_bytes (256 KiB) without ending.
            message = struct.pack(">?I", False, 16 * 1024) + bytes(16 * 1024)
            sent = 0
            while await in_thread(conn.send_all, sid, message):
                sent += len(message)
                assert sent < 2 * MiB, "the server never reset the stream"
            state = await in_thread(conn.wait_status, sid, 10.0)
            await in_thread(conn.pump, 0.2)
        finally:
            conn.close()
        assert state.status == INVALID_ARGUMENT  # type: ignore[attr-defined]
        assert state.reset  # type: ignore[attr-defined]
        stats = server.stats()
        assert stats["refusals_reset"] == 1 and stats["refusals_after_request_end"] == 0, str(stats)


async def test_the_raft_service_still_works_through_the_limits() -> None:
    async with served() as (server, address):
        async with GRPCTransport([TransportPeer(2, "n2", address)],
                                 max_message_bytes=5 * MiB, snapshot_chunk_bytes=MiB) as a:
            for i in range(20):
                await a.send(Message(MessageType.APP, to=2, from_=1, term=1, index=i))
            await a.send(Message(MessageType.HEARTBEAT, to=2, from_=1, term=1))
            with trio.fail_after(10):  # a send returns once written to its stream
                while server.stats()["messages_received"] < 21:
                    await trio.sleep(0.01)
        stats = server.stats()
        assert stats["messages_received"] == 21
        assert stats["receive_budget_used"] == 0
