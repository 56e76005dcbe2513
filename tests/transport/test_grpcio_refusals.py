"""grpcio clients that send junk get the status the server meant, never INTERNAL.

The client is grpcio's asyncio API, which writes each message of a request stream as its own
operation: a status that reaches it while a write is outstanding used to surface as
StatusCode.INTERNAL ("Internal error from Core") instead of the server's INVALID_ARGUMENT (see
the "Refusals" paragraph of trio_raft/transport/grpc_server.py). Every seed draws its calls
from its own ``random.Random``, so a failing seed is replayed exactly by
``_calls(pb2, seed)``.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any

import attrs
import grpc
import pytest
import trio

from tests.transport import grpcio_stubs
from tests.transport.conftest import Inbox, app
from trio_raft.core.messages import Message, MessageType
from trio_raft.transport import GRPCTransport, TransportPeer
from trio_raft.transport.routes import SEND_ROUTE, SNAPSHOT_ROUTE, STREAM_ROUTE

SEEDS = 160
CONCURRENCY = 8
INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


@attrs.frozen
class Call:
    seed: int
    route: str
    requests: tuple[bytes, ...]  # serialized protobuf messages, sent as they are
    expected: frozenset[grpc.StatusCode]


@pytest.fixture(scope="module")
def pb2(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    return grpcio_stubs.load(tmp_path_factory.mktemp("grpcio_stubs"), "transport")[0]


def _junk(rng: random.Random) -> bytes:
    return rng.randbytes(rng.randint(1_000, 100_000))


def _calls(pb2: ModuleType, seed: int) -> list[Call]:
    """Three calls per seed: a junk frame by Send, a stream of 1-20 junk messages by
    SendStream and by SendSnapshot (either wrapped in the right protobuf message, whose field
    then holds junk, or raw junk in place of the protobuf)."""
    rng = random.Random(seed)
    n = rng.randint(1, 20)
    raw = rng.random() < 0.25
    if raw:
        stream = tuple(_junk(rng) for _ in range(n))
        snapshot = tuple(_junk(rng) for _ in range(n))
        snapshot_expected = frozenset({INVALID, PRECONDITION})
    else:
        stream = tuple(pb2.RaftMessage(message=_junk(rng)).SerializeToString()
                       for _ in range(n))
        as_metadata = rng.random() < 0.5  # junk metadata, or payload before any metadata
        snapshot = tuple(
            (pb2.SnapshotChunk(metadata=_junk(rng)) if as_metadata
             else pb2.SnapshotChunk(chunk=_junk(rng), final=i == n - 1)).SerializeToString()
            for i in range(n))
        snapshot_expected = frozenset({INVALID if as_metadata else PRECONDITION})
    unary = pb2.RaftMessage(message=_junk(rng)).SerializeToString()
    return [Call(seed, SEND_ROUTE, (unary,), frozenset({INVALID})),
            Call(seed, STREAM_ROUTE, stream, frozenset({INVALID})),
            Call(seed, SNAPSHOT_ROUTE, snapshot, snapshot_expected)]


async def _make(channel: grpc.aio.Channel, call: Call) -> Any:
    def identity(b: bytes) -> bytes:
        return b

    if call.route == SEND_ROUTE:
        method = channel.unary_unary(call.route, request_serializer=identity,
                                     response_deserializer=identity)
        return await method(call.requests[0], timeout=30)
    method = channel.stream_unary(call.route, request_serializer=identity,
                                  response_deserializer=identity)

    async def requests() -> Any:
        for r in call.requests:
            yield r

    return await method(requests(), timeout=30)


def _run_clients(port: int, calls: list[Call]) -> list[tuple[Call, grpc.StatusCode, str]]:
    async def main() -> list[tuple[Call, grpc.StatusCode, str]]:
        results: list[tuple[Call, grpc.StatusCode, str]] = []
        gate = asyncio.Semaphore(CONCURRENCY)
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(2)]
        try:
            async def one(i: int, call: Call) -> None:
                async with gate:
                    try:
                        await _make(channels[i % 2], call)
                        results.append((call, grpc.StatusCode.OK, ""))
                    except grpc.aio.AioRpcError as exc:
                        results.append((call, exc.code(), exc.details() or ""))

            await asyncio.gather(*(one(i, c) for i, c in enumerate(calls)))
        finally:
            for ch in channels:
                await ch.close()
        return results

    return asyncio.run(main())


async def test_junk_from_grpcio_is_refused_with_its_status(pb2: ModuleType,
                                                           tmp_path: Path) -> None:
    calls = [c for seed in range(SEEDS) for c in _calls(pb2, seed)]
    inbox = Inbox()
    server = GRPCTransport()
    server.attach(inbox, None)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve, "127.0.0.1", 0)
        results = await trio.to_thread.run_sync(_run_clients, port, calls)
        # Still serving, both lanes, to a client of its own kind.
        async with GRPCTransport([TransportPeer(2, "n2", f"127.0.0.1:{port}")]) as peer:
            await peer.send(Message(MessageType.HEARTBEAT, to=2, from_=1, term=1))
            await peer.send(app(1))
            await inbox.wait_for(2)
        stats = server.stats()
        await server.aclose()
    wrong = [(c.seed, c.route.rsplit("/", 1)[1], code.name, details)
             for c, code, details in results if code not in c.expected]
    assert wrong == [], wrong[:10]
    assert len(results) == len(calls)
    by_route = Counter(c.route for c, _, _ in results)
    assert by_route == {SEND_ROUTE: SEEDS, STREAM_ROUTE: SEEDS, SNAPSHOT_ROUTE: SEEDS}
    # The streams' statuses waited for the end of their requests (none had to be reset).
    assert stats["refusals_reset"] == 0
    assert stats["refusals_after_request_end"] >= 2 * SEEDS
    assert len(inbox.messages) == 2
