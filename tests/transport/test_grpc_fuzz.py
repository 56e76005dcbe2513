"""Bad input over the wire: the sender gets INVALID_ARGUMENT (or another status), the server
keeps serving."""

from __future__ import annotations

import asyncio
import random
from typing import Any

from grpclib.client import Channel
from grpclib.const import Cardinality
from grpclib.encoding.base import CodecBase
from grpclib.exceptions import GRPCError

from tests.transport.conftest import app, grpc_pair
from trio_raft.core.messages import Message, MessageType
from trio_raft.transport._proto.trio_raft.transport.v1 import (
    Ack,
    RaftMessage,
    RaftTransportStub,
)
from trio_raft.transport.codec import encode_message
from trio_raft.transport.routes import SEND_ROUTE, STREAM_ROUTE

WIRE_FUZZ_INPUTS = 3000


class _RawCodec(CodecBase):
    """Sends bytes as they are (to put undecodable protobuf on the wire)."""

    __content_subtype__ = "proto"

    def encode(self, message: Any, message_type: Any) -> bytes:
        return bytes(message)

    def decode(self, data: bytes, message_type: Any) -> Any:
        return data


def _mutations(rng: random.Random, n: int) -> list[bytes]:
    valid = [encode_message(app(i, n_entries=rng.randrange(0, 4))) for i in range(20)]
    out: list[bytes] = []
    for k in range(n):
        kind = k % 4
        if kind == 0:
            out.append(rng.randbytes(rng.randrange(0, 300)))
        elif kind == 1:
            f = rng.choice(valid)
            out.append(f[:rng.randrange(0, len(f))])  # truncated frame
        elif kind == 2:
            f = bytearray(rng.choice(valid))
            i = rng.randrange(1, len(f) - 4)
            f[i:i + 4] = b"\xff\xff\xff\xf0"  # a huge declared length or count somewhere
            out.append(bytes(f))
        else:
            out.append(b"\x01" + rng.randbytes(rng.randrange(0, 120)))
    return out


async def test_fuzz_frames_over_unary_and_stream() -> None:
    rng = random.Random(1234)
    inputs = _mutations(rng, WIRE_FUZZ_INPUTS)
    async with grpc_pair() as (a, b, inbox):
        assert a.bridge is not None and a._client is not None
        client = a._client
        address = a.peers()[2].address

        async def blast() -> dict[str, int]:
            channel = client.channel(address)
            stub = RaftTransportStub(channel)
            sem = asyncio.Semaphore(64)
            statuses: dict[str, int] = {}

            async def one(frame: bytes) -> None:
                async with sem:
                    try:
                        await stub.send(RaftMessage(message=frame))
                        key = "OK"
                    except GRPCError as exc:
                        key = exc.status.name
                    statuses[key] = statuses.get(key, 0) + 1

            await asyncio.gather(*(one(f) for f in inputs))
            # The same over streams: each bad frame ends its stream with INVALID_ARGUMENT.
            for frame in inputs[:200]:
                try:
                    async with channel.request(STREAM_ROUTE, Cardinality.STREAM_UNARY,
                                               RaftMessage, Ack) as st:
                        await st.send_message(RaftMessage(message=frame), end=True)
                        await st.recv_message()
                    key = "stream-OK"
                except GRPCError as exc:
                    key = "stream-" + exc.status.name
                statuses[key] = statuses.get(key, 0) + 1
            # Undecodable protobuf bodies.
            host, port = address.rsplit(":", 1)
            raw = Channel(host, int(port), codec=_RawCodec())
            try:
                for body in (b"\xff\xff\xff", b"\x0a\xff\xff\xff\xff\x0f", b"\x08"):
                    try:
                        async with raw.request(SEND_ROUTE, Cardinality.UNARY_UNARY, bytes,
                                               bytes) as st:
                            await st.send_message(body, end=True)
                            await st.recv_message()
                        key = "raw-OK"
                    except GRPCError as exc:
                        key = "raw-" + exc.status.name
                    statuses[key] = statuses.get(key, 0) + 1
            finally:
                raw.close()
            return statuses

        statuses = await a.bridge.run(blast)
        # Everything the codec refused came back as INVALID_ARGUMENT; a few random inputs may
        # decode as valid messages and be accepted (e.g. a "huge length" landing in a u64 field).
        assert set(statuses) <= {"OK", "INVALID_ARGUMENT", "stream-OK", "stream-INVALID_ARGUMENT",
                                 "raw-INVALID_ARGUMENT"}, statuses
        assert statuses["INVALID_ARGUMENT"] > WIRE_FUZZ_INPUTS * 0.7
        assert statuses.get("raw-INVALID_ARGUMENT") == 3
        assert len(inbox.messages) == statuses.get("OK", 0) + statuses.get("stream-OK", 0)
        # Still serving, both lanes.
        before = len(inbox.messages)
        await a.send(Message(MessageType.HEARTBEAT, to=2, from_=1))
        await a.send(app(1))
        await inbox.wait_for(before + 2)
        assert b.stats()["messages_rejected"] >= statuses["INVALID_ARGUMENT"]
