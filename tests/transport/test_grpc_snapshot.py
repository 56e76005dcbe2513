"""Snapshot streaming: chunking, spooling, CRC, finalization, stream-order errors, cleanup."""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path

import crc32c
import pytest
import trio
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError

from tests.transport.conftest import grpc_pair
from trio_raft.core.messages import ConfState, Message, MessageType, Snapshot, SnapshotMetadata
from trio_raft.errors import DispatchError, ReceivedFSMSnapshotStaleError
from trio_raft.transport import GRPCTransport
from trio_raft.transport._proto.trio_raft.transport.v1 import Ack, SnapshotChunk
from trio_raft.transport.codec import encode_snapshot_header
from trio_raft.transport.grpc_client import SNAPSHOT_ROUTE
from trio_raft.transport.spool import SPOOL_PREFIX, SnapshotSpool, fsm_file_name

CHUNK = 1 << 20


def token(index: int, crc: int) -> bytes:
    return b"EKVT" + bytes([1]) + struct.pack(">QI", index, crc)


def snap_msg(index: int, data: bytes = b"") -> Message:
    return Message(MessageType.SNAP, to=2, from_=1, term=2, snapshot=Snapshot(
        SnapshotMetadata(ConfState([1, 2, 3]), index, 2), data))


def spools(directory: Path) -> list[str]:
    return [n for n in os.listdir(directory) if n.startswith(SPOOL_PREFIX)]


@pytest.mark.parametrize("size", [0, 1, CHUNK, 3 * CHUNK, 3 * CHUNK + 17])
async def test_snapshot_from_fsm_file_is_finalized_with_crc(tmp_path: Path, size: int) -> None:
    src_dir, dst_dir = tmp_path / "src", tmp_path / "dst"
    src_dir.mkdir()
    payload = os.urandom(size)
    index = 0x1234
    (src_dir / fsm_file_name(index)).write_bytes(
        payload + struct.pack(">I", crc32c.crc32c(payload)))
    opened: list[int] = []

    def opener(i: int) -> io.BufferedReader:
        opened.append(i)
        f = open(src_dir / fsm_file_name(i), "rb")  # noqa: SIM115 - the transport closes it
        return io.BufferedReader(_Limited(f, size))

    events: list[tuple[str, int]] = []
    async with grpc_pair(snapshot_chunk_bytes=CHUNK) as (a, b, inbox):
        a.set_fsm_payload_opener(opener)
        b.set_fsm_snap_dir(dst_dir)
        b.set_snapshot_token_encoder(token)
        b.set_fsm_snapshot_protection(lambda i: events.append(("protect", i)),
                                      lambda i: events.append(("unprotect", i)))
        b.set_applied_index_getter(lambda: 10)
        await a.dispatch(snap_msg(index, token(index, 0)))  # dispatch routes MsgSnap itself
        await inbox.wait_for(1)
        stats = a.stats()
        chunks_expected = max(1, -(-size // CHUNK))
        assert stats["snapshots_sent"] == 1
        assert stats["snapshot_bytes_sent"] == size
        assert b.stats()["snapshot_bytes_received"] == size
    assert opened == [index]
    got = inbox.messages[0]
    crc = crc32c.crc32c(payload)
    assert got.snapshot is not None
    assert got.snapshot.data == token(index, crc)
    assert got.snapshot.metadata == snap_msg(index).snapshot.metadata  # type: ignore[union-attr]
    final = dst_dir / fsm_file_name(index)
    raw = final.read_bytes()
    assert raw[:-4] == payload
    assert struct.unpack(">I", raw[-4:])[0] == crc
    assert events == [("protect", index)]
    assert spools(dst_dir) == []
    assert chunks_expected >= 1


class _Limited(io.RawIOBase):
    """A raw reader returning short reads, as a payload opener may."""

    def __init__(self, f: io.BufferedReader, limit: int) -> None:
        self._f, self._left = f, limit

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray) -> int:  # type: ignore[override]
        n = min(len(b), self._left, 100_000)
        data = self._f.read(n)
        b[:len(data)] = data
        self._left -= len(data)
        return len(data)

    def close(self) -> None:
        self._f.close()
        super().close()


async def test_inline_snapshot_without_fsm_dir(tmp_path: Path) -> None:
    payload = os.urandom(2 * CHUNK + 5)
    async with grpc_pair(snapshot_chunk_bytes=CHUNK) as (a, b, inbox):
        b.set_spool_dir(tmp_path)
        await a.send_snapshot(snap_msg(50, payload))
        await inbox.wait_for(1)
    assert inbox.messages[0].snapshot.data == payload  # type: ignore[union-attr]
    assert spools(tmp_path) == []


async def test_reader_bridge_mode(tmp_path: Path) -> None:
    payload = os.urandom(1000)
    async with grpc_pair() as (a, b, inbox):
        a.set_fsm_payload_reader(lambda i: payload if i == 77 else b"")
        b.set_fsm_snap_dir(tmp_path)
        await a.dispatch_snapshot(snap_msg(77, token(77, 0)))
        await inbox.wait_for(1)
    assert inbox.messages[0].snapshot.data == b""  # no token encoder: data left empty
    assert (tmp_path / fsm_file_name(77)).read_bytes()[:-4] == payload


async def test_stale_snapshot_is_refused_and_cleaned(tmp_path: Path) -> None:
    async with grpc_pair() as (a, b, inbox):
        b.set_fsm_snap_dir(tmp_path)
        b.set_applied_index_getter(lambda: 100)
        with pytest.raises(DispatchError) as info:
            await a.dispatch_snapshot(snap_msg(100, b"x" * 10))
        assert info.value.code == "FailedPrecondition"

        def protect(i: int) -> None:
            raise ReceivedFSMSnapshotStaleError(f"index={i}")
        b.set_applied_index_getter(None)
        b.set_fsm_snapshot_protection(protect, lambda i: None)
        with pytest.raises(DispatchError) as info:
            await a.dispatch_snapshot(snap_msg(101, b"x" * 10))
        assert info.value.code == "FailedPrecondition"
        assert inbox.messages == []
    assert os.listdir(tmp_path) == []


async def test_handler_failure_removes_finalized_file_and_unprotects(tmp_path: Path) -> None:
    events: list[tuple[str, int]] = []
    async with grpc_pair() as (a, b, inbox):
        b.set_fsm_snap_dir(tmp_path)
        b.set_fsm_snapshot_protection(lambda i: events.append(("protect", i)),
                                      lambda i: events.append(("unprotect", i)))
        inbox.fail_with = RuntimeError("engine said no")
        with pytest.raises(DispatchError) as info:
            await a.dispatch_snapshot(snap_msg(5, b"payload"))
        assert info.value.code == "Unknown"
    assert events == [("protect", 5), ("unprotect", 5)]
    assert os.listdir(tmp_path) == []


async def test_payload_over_the_cap_is_refused(tmp_path: Path) -> None:
    async with grpc_pair(b_kwargs={"max_snapshot_bytes": 3 * CHUNK},
                         snapshot_chunk_bytes=CHUNK) as (a, b, inbox):
        b.set_fsm_snap_dir(tmp_path)
        with pytest.raises(DispatchError) as info:
            await a.dispatch_snapshot(snap_msg(9, b"z" * (3 * CHUNK + 1)))
        assert info.value.code == "ResourceExhausted"
        await a.dispatch_snapshot(snap_msg(9, b"z" * (3 * CHUNK)))
        await inbox.wait_for(1)
    assert os.listdir(tmp_path) == [fsm_file_name(9)]


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
    async with grpc_pair() as (a, b, inbox):
        b.set_fsm_snap_dir(tmp_path)
        for name, (chunks, want) in cases.items():
            got = await _raw_snapshot(a, chunks)
            assert got == want, name
        assert inbox.messages == []
        # The server is still serving.
        ok = await _raw_snapshot(a, [SnapshotChunk(metadata=header, chunk=b"ok", final=True)])
        assert ok == Status.OK
        await inbox.wait_for(1)
        assert b.stats()["snapshots_rejected"] == len(cases)
    assert os.listdir(tmp_path) == [fsm_file_name(7)]


async def test_cancelled_snapshot_stream_removes_spool(tmp_path: Path) -> None:
    header = encode_snapshot_header(snap_msg(8))
    async with grpc_pair() as (a, b, _inbox):
        b.set_fsm_snap_dir(tmp_path)
        assert a.bridge is not None and a._client is not None
        client, address = a._client, a.peers()[2].address

        async def half() -> None:
            channel = client.channel(address)
            async with channel.request(SNAPSHOT_ROUTE, Cardinality.STREAM_UNARY, SnapshotChunk,
                                       Ack) as stream:
                await stream.send_message(SnapshotChunk(metadata=header, chunk=b"x" * 1000))
                await stream.send_message(SnapshotChunk(chunk=b"y" * 1000))
                await asyncio_sleep(10)

        with trio.move_on_after(0.3):
            await a.bridge.run(half)
        with trio.fail_after(5):
            while spools(tmp_path):
                await trio.sleep(0.02)
    assert os.listdir(tmp_path) == []


async def asyncio_sleep(t: float) -> None:
    import asyncio
    await asyncio.sleep(t)


def test_spool_unit(tmp_path: Path) -> None:
    with SnapshotSpool(str(tmp_path / "s"), max_bytes=10) as sp:
        sp.write(b"hello")
        assert sp.read_all() == b"hello"
        sp.write(b"world")
        with pytest.raises(Exception, match="exceeds limit"):
            sp.write(b"!")
        path = sp.finalize_as_fsm(str(tmp_path / "f"), 3)
        assert Path(path).read_bytes() == b"helloworld" + struct.pack(
            ">I", crc32c.crc32c(b"helloworld"))
    assert os.path.exists(path)
    assert spools(tmp_path / "s") == []
    sp2 = SnapshotSpool(str(tmp_path / "s"))
    sp2.write(b"x")
    sp2.close()
    sp2.close()
    assert spools(tmp_path / "s") == []
