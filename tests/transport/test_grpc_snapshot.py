"""Snapshot streaming over gRPC: chunking, spooling through the exchange, CRC, stream-order
errors, refusal paths and cleanup."""

from __future__ import annotations

import asyncio
import os
import struct
from pathlib import Path

import crc32c
import pytest
import trio
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError

from tests.transport.conftest import grpc_pair
from tests.transport.snapshot_helpers import ProbedExchange, fsm_name, snap_msg, spools, write_fsm
from trio_raft.core.messages import Message, MessageType
from trio_raft.errors import DispatchError
from trio_raft.storage import fsm_snapshot as fsm
from trio_raft.transport import GRPCTransport
from trio_raft.transport._proto.trio_raft.transport.v1 import Ack, SnapshotChunk
from trio_raft.transport.codec import decode_message, encode_snapshot_header
from trio_raft.transport.routes import SNAPSHOT_ROUTE

CHUNK = 1 << 20


@pytest.mark.parametrize("size", [0, 1, CHUNK, 3 * CHUNK, 3 * CHUNK + 17])
async def test_snapshot_from_fsm_file_is_finalized_with_crc(tmp_path: Path, size: int) -> None:
    src, dst = ProbedExchange(tmp_path / "src"), ProbedExchange(tmp_path / "dst", applied=10)
    payload = os.urandom(size)
    index = 0x1234
    sent_token = write_fsm(tmp_path / "src", index, payload)
    async with grpc_pair(snapshot_chunk_bytes=CHUNK, a_snapshots=src, b_snapshots=dst) as (
            a, b, inbox):
        await a.send_snapshot(snap_msg(index, sent_token))
        await inbox.wait_for(1)
        assert a.stats()["snapshots_sent"] == 1
        assert a.stats()["snapshot_bytes_sent"] == size
        assert b.stats()["snapshot_bytes_received"] == size
        assert b.stats()["snapshots_finalized"] == 1
    got = inbox.messages[0]
    crc = crc32c.crc32c(payload)
    assert got.snapshot is not None
    assert got.snapshot.data == fsm.encode_snapshot_token(index, crc)
    assert got.snapshot.metadata == snap_msg(index).snapshot.metadata  # type: ignore[union-attr]
    raw = (tmp_path / "dst" / fsm_name(index)).read_bytes()
    assert raw == payload + struct.pack(">I", crc)
    assert dst.protected_indexes() == {index}  # handed over, not installed yet
    dst.applied = index
    assert dst.protected_indexes() == frozenset()  # installed (applied): released
    assert spools(tmp_path / "dst") == []
    assert [p is not None and p.closed for p in src.outgoing] == [True]


async def test_inline_payload_without_exchange_on_either_side(tmp_path: Path) -> None:
    payload = os.urandom(2 * CHUNK + 5)
    async with grpc_pair(snapshot_chunk_bytes=CHUNK) as (a, _b, inbox):
        await a.send_snapshot(snap_msg(50, payload))
        await inbox.wait_for(1)
    assert inbox.messages[0].snapshot.data == payload  # type: ignore[union-attr]


async def test_inline_payload_lands_as_fsm_file_at_an_exchange(tmp_path: Path) -> None:
    payload = os.urandom(1000)
    dst = ProbedExchange(tmp_path)
    async with grpc_pair(b_snapshots=dst) as (a, _b, inbox):
        await a.send_snapshot(snap_msg(77, payload))
        await inbox.wait_for(1)
    crc = crc32c.crc32c(payload)
    assert inbox.messages[0].snapshot.data == fsm.encode_snapshot_token(77, crc)  # type: ignore[union-attr]
    assert (tmp_path / fsm_name(77)).read_bytes()[:-4] == payload


async def test_fsm_payload_to_a_receiver_without_exchange_arrives_inline(tmp_path: Path) -> None:
    payload = os.urandom(5000)
    src = ProbedExchange(tmp_path)
    token = write_fsm(tmp_path, 9, payload)
    async with grpc_pair(a_snapshots=src) as (a, _b, inbox):
        await a.send_snapshot(snap_msg(9, token))
        await inbox.wait_for(1)
    assert inbox.messages[0].snapshot.data == payload  # type: ignore[union-attr]


async def test_stale_snapshot_is_refused_and_cleaned(tmp_path: Path) -> None:
    dst = ProbedExchange(tmp_path, applied=100)
    async with grpc_pair(b_snapshots=dst) as (a, _b, inbox):
        with pytest.raises(DispatchError) as info:
            await a.send_snapshot(snap_msg(100, b"x" * 10))
        assert info.value.code == "FailedPrecondition"
        assert "stale" in str(info.value)
        await a.send_snapshot(snap_msg(101, b"y" * 10))
        await inbox.wait_for(1)
        assert len(inbox.messages) == 1
    assert os.listdir(tmp_path) == [fsm_name(101)]
    assert dst.protected_indexes() == {101}


async def test_handler_failure_removes_finalized_file_and_releases_protection(
        tmp_path: Path) -> None:
    dst = ProbedExchange(tmp_path)
    async with grpc_pair(b_snapshots=dst) as (a, _b, inbox):
        inbox.fail_with = RuntimeError("engine said no")
        with pytest.raises(DispatchError) as info:
            await a.send_snapshot(snap_msg(5, b"payload"))
        assert info.value.code == "Unknown"
    assert dst.protected_indexes() == frozenset()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("where", ["transport", "exchange"])
async def test_payload_over_the_cap_is_refused(tmp_path: Path, where: str) -> None:
    cap = 3 * CHUNK
    dst = ProbedExchange(tmp_path, **({"max_bytes": cap} if where == "exchange" else {}))
    b_kwargs = {"max_snapshot_bytes": cap} if where == "transport" else {}
    async with grpc_pair(b_kwargs=b_kwargs, snapshot_chunk_bytes=CHUNK, b_snapshots=dst) as (
            a, _b, inbox):
        with pytest.raises(DispatchError) as info:
            await a.send_snapshot(snap_msg(9, b"z" * (cap + 1)))
        assert info.value.code == "ResourceExhausted"
        assert os.listdir(tmp_path) == []
        assert dst.protected_indexes() == frozenset()
        await a.send_snapshot(snap_msg(9, b"z" * cap))
        await inbox.wait_for(1)
    assert os.listdir(tmp_path) == [fsm_name(9)]


async def test_damaged_fsm_file_is_never_sent_whole(tmp_path: Path) -> None:
    """The sender checks the CRC while reading: the final chunk never leaves, so the receiver
    never finalizes the damaged payload."""
    src = ProbedExchange(tmp_path / "src")
    dst = ProbedExchange(tmp_path / "dst")
    payload = os.urandom(3 * CHUNK)
    token = write_fsm(tmp_path / "src", 12, payload)
    path = tmp_path / "src" / fsm_name(12)
    raw = bytearray(path.read_bytes())
    raw[CHUNK + 7] ^= 0x40  # a flipped bit in the middle of the payload
    path.write_bytes(bytes(raw))
    async with grpc_pair(snapshot_chunk_bytes=CHUNK, a_snapshots=src, b_snapshots=dst) as (
            a, b, inbox):
        with pytest.raises(DispatchError) as info:
            await a.send_snapshot(snap_msg(12, token))
        assert info.value.code == "DataLoss"
        assert "FSMSnapshotFileCRCError" in str(info.value)
        await b.detach()  # waits until the receiver's transfer is gone
        # The footer disagreeing with the token is refused before anything is sent.
        with pytest.raises(DispatchError) as info:
            await a.send_snapshot(snap_msg(12, fsm.encode_snapshot_token(12, 1234)))
        assert info.value.code == "DataLoss"
        with pytest.raises(DispatchError) as info:  # and so is a missing file
            await a.send_snapshot(snap_msg(13, fsm.encode_snapshot_token(13, 1234)))
        assert info.value.code == "DataLoss"
    assert inbox.messages == []
    assert not (tmp_path / "dst").exists() or os.listdir(tmp_path / "dst") == []
    assert all(p is None or p.closed for p in src.outgoing)


async def test_receiver_refuses_a_payload_that_does_not_match_the_announced_crc(
        tmp_path: Path) -> None:
    dst = ProbedExchange(tmp_path)
    payload = b"p" * 5000
    wrong = fsm.encode_snapshot_token(7, crc32c.crc32c(payload) ^ 1)
    header = encode_snapshot_header(snap_msg(7, wrong), keep_token=True)
    assert decode_message(header).snapshot.data == wrong  # type: ignore[union-attr]
    async with grpc_pair(b_snapshots=dst) as (a, b, inbox):
        status = await _raw_snapshot(a, [SnapshotChunk(metadata=header, chunk=payload[:100]),
                                         SnapshotChunk(chunk=payload[100:], final=True)])
        assert status == Status.DATA_LOSS
        assert b.stats()["snapshots_rejected"] == 1
        right = fsm.encode_snapshot_token(7, crc32c.crc32c(payload))
        ok = await _raw_snapshot(a, [SnapshotChunk(
            metadata=encode_snapshot_header(snap_msg(7, right), keep_token=True),
            chunk=payload, final=True)])
        assert ok == Status.OK
        await inbox.wait_for(1)
    assert inbox.messages[0].snapshot.data == right  # type: ignore[union-attr]
    assert os.listdir(tmp_path) == [fsm_name(7)]


async def _raw_snapshot(a: GRPCTransport, chunks: list[SnapshotChunk]) -> Status:
    """Send hand-made chunk sequences through a's channel; the status the server answered."""
    assert a.bridge is not None and a._client is not None
    client = a._client
    address = a.peers()[2].address

    async def call() -> Status:
        channel = client.channel(address)
        try:
            async with channel.request(SNAPSHOT_ROUTE, Cardinality.STREAM_UNARY, SnapshotChunk,
                                       Ack) as stream:
                await stream.send_request()
                for c in chunks:
                    await stream.send_message(c)
                await stream.end()
                await stream.recv_message()
        except GRPCError as exc:
            return exc.status
        return Status.OK

    return await a.bridge.run(call)


async def test_wrong_chunk_orders(tmp_path: Path) -> None:
    header = encode_snapshot_header(snap_msg(7))
    cases = {
        "payload before metadata": ([SnapshotChunk(chunk=b"x")], Status.FAILED_PRECONDITION),
        "final without metadata": ([SnapshotChunk(final=True)], Status.FAILED_PRECONDITION),
        "second metadata": ([SnapshotChunk(metadata=header, chunk=b"a"),
                             SnapshotChunk(metadata=header, final=True)],
                            Status.FAILED_PRECONDITION),
        "eof before final": ([SnapshotChunk(metadata=header, chunk=b"abc"),
                              SnapshotChunk(chunk=b"def")], Status.FAILED_PRECONDITION),
        "empty stream": ([], Status.FAILED_PRECONDITION),
        "garbage metadata": ([SnapshotChunk(metadata=b"\x01\x02", final=True)],
                             Status.INVALID_ARGUMENT),
        "metadata without snapshot": ([SnapshotChunk(
            metadata=encode_snapshot_header(Message(MessageType.SNAP, to=2)), final=True)],
            Status.FAILED_PRECONDITION),
    }
    dst = ProbedExchange(tmp_path)
    async with grpc_pair(b_snapshots=dst) as (a, b, inbox):
        for name, (chunks, want) in cases.items():
            got = await _raw_snapshot(a, chunks)
            assert got == want, name
            assert spools(tmp_path) == [], name  # the answer comes after the cleanup
        assert inbox.messages == []
        assert dst.protected_indexes() == frozenset()
        # The server is still serving.
        ok = await _raw_snapshot(a, [SnapshotChunk(metadata=header, chunk=b"ok", final=True)])
        assert ok == Status.OK
        await inbox.wait_for(1)
        assert b.stats()["snapshots_rejected"] == len(cases)
    assert os.listdir(tmp_path) == [fsm_name(7)]


async def test_sender_vanishing_mid_stream_removes_the_spool(tmp_path: Path) -> None:
    header = encode_snapshot_header(snap_msg(8))
    dst = ProbedExchange(tmp_path)
    async with grpc_pair(b_snapshots=dst) as (a, b, inbox):
        assert a.bridge is not None and a._client is not None
        client, address = a._client, a.peers()[2].address
        sent = trio.Event()
        token = trio.lowlevel.current_trio_token()

        async def half() -> None:
            channel = client.channel(address)
            async with channel.request(SNAPSHOT_ROUTE, Cardinality.STREAM_UNARY, SnapshotChunk,
                                       Ack) as stream:
                await stream.send_message(SnapshotChunk(metadata=header, chunk=b"x" * 1000))
                await stream.send_message(SnapshotChunk(chunk=b"y" * 1000))
                token.run_sync_soon(sent.set)
                await asyncio.Event().wait()  # until cancelled: the stream is reset

        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.bridge.run, half)
            await sent.wait()
            nursery.cancel_scope.cancel()
        # The receiver's cleanup runs on its own; wait for the condition, bounded.
        with trio.fail_after(10):
            while b.incoming_transfers() or spools(tmp_path):
                await trio.sleep(0.01)
        assert inbox.messages == []
    assert os.listdir(tmp_path) == []
    assert dst.protected_indexes() == frozenset()
