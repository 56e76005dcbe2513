"""Concurrent KV clients recording a history for the linearizability checker.

Each client is one trio task issuing one operation at a time through the KV gRPC API (at the
node it currently believes is the leader, directly, not through the proxy), with a random mix of
put / get / cas / delete over a small key set; values are unique per write. The invocation
instant is taken before the request leaves and the completion instant after the reply arrives
(``time.monotonic`` in the harness process), so the real operation lies inside the interval.

Outcomes: a reply -> ``ok``; ``FAILED_PRECONDITION`` (refused before reaching the log) ->
``fail``; anything else (UNAVAILABLE, deadline exceeded, a dropped connection) -> ``unknown``.
Reads use the LINEARIZABLE mode and, sometimes, LEASE (a served lease read must be linearizable
too); LOCAL reads are not part of the history.

A separate "durable" client puts fresh keys ``d/<n>`` only: every acknowledged one must be
present on every node after the run.

A "stream" client puts in bursts of ``STREAM_BURST`` writes in flight over one ``PutStream``
call (each write has its own process number). An answered write -> ``ok``; the unanswered ones
take the call's ending status: ``FAILED_PRECONDITION`` -> ``fail`` (kv.proto promises that none
of them happened, which the checker then holds the service to), anything else -> ``unknown``.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import trio
from grpclib.const import Status

from tests.chaos.cluster import Cluster
from trio_raft.testing.linearizability import CAS, DELETE, FAIL, GET, OK, PUT, UNKNOWN, Op
from trio_raft_kv._proto.trio_raft.kv import v1 as pb
from trio_raft_kv.client import KV, KVClient, KVError, PutPipeline

CALL_TIMEOUT = 3.0
STREAM_BURST = 8


class History:
    def __init__(self) -> None:
        self.ops: list[Op] = []
        self.counts: dict[str, int] = {}
        self.durable_acked: dict[str, bytes] = {}
        self.durable_unknown: dict[str, bytes] = {}
        self.wrong_status: list[str] = []

    def add(self, op: Op, via: str = "") -> None:
        self.ops.append(op)
        k = f"{via}{op.kind}:{op.status}"
        self.counts[k] = self.counts.get(k, 0) + 1


class Workload:
    def __init__(self, cluster: Cluster, history: History, rng: random.Random, *,
                 clients: int, keys: int, lease_reads: float = 0.25) -> None:
        self.cluster = cluster
        self.history = history
        self.rng = rng
        self.clients = clients
        self.keys = [f"k{i}" for i in range(keys)]
        self.lease_reads = lease_reads
        self.stop = trio.Event()
        self.hint: str | None = None  # a node name that recently answered as the leader

    def _target(self, rng: random.Random) -> str:
        names = [n for n in self.cluster.names if self.cluster.nodes[n].alive()]
        if self.hint in names and rng.random() < 0.9:
            return self.hint
        return rng.choice(names or self.cluster.names)

    def _learn(self, exc: KVError) -> None:
        owner = self.cluster.address_owner.get(exc.leader_address)
        if owner is not None:
            self.hint = owner

    def _status_of(self, exc: KVError) -> str:
        """The history status of a failed call (see the module docstring); follows the
        leader hint it carries."""
        if exc.status is Status.FAILED_PRECONDITION:
            self._learn(exc)
            if not exc.leader_address:
                self.hint = None
            return FAIL
        if exc.status is Status.INVALID_ARGUMENT:  # the workload never sends a bad request
            self.history.wrong_status.append(str(exc))
        self.hint = None
        return UNKNOWN

    async def _call(self, client: KVClient, node: str, method: str, request: Any,
                    reply_type: type) -> Any:
        address = self.cluster.nodes[node].address
        return await self.cluster.rpc(client.call_at, address, KV + method, request, reply_type)

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            for i in range(self.clients):
                nursery.start_soon(self._client, i, random.Random(self.rng.random()))
            nursery.start_soon(self._durable_client, self.clients,
                               random.Random(self.rng.random()))
            nursery.start_soon(self._stream_client, self.clients + 1,
                               random.Random(self.rng.random()))

    async def _client(self, pid: int, rng: random.Random) -> None:
        client = KVClient("127.0.0.1:1", timeout=CALL_TIMEOUT)
        seq = 0
        last_seen: dict[str, bytes | None] = {}
        try:
            while not self.stop.is_set():
                seq += 1
                key = rng.choice(self.keys)
                roll = rng.random()
                value = f"c{pid}-{seq}".encode()
                expected: bytes | None = None
                if roll < 0.35:
                    kind = GET
                    lease = rng.random() < self.lease_reads
                    mode = pb.ReadMode.LEASE if lease else pb.ReadMode.LINEARIZABLE
                    method, req, rt = "Get", pb.GetRequest(key=key, mode=mode), pb.GetResponse
                elif roll < 0.6:
                    kind = PUT
                    method, req, rt = "Put", pb.PutRequest(key=key, value=value), pb.PutResponse
                elif roll < 0.85:
                    kind = CAS
                    expected = last_seen.get(key)
                    if expected is None and rng.random() < 0.5:
                        expected = f"c{rng.randrange(self.clients)}-{max(1, seq - 3)}".encode()
                    req = pb.CasRequest(key=key, expected=expected or b"",
                                        expect_absent=expected is None, value=value)
                    method, rt = "CompareAndSwap", pb.CasResponse
                else:
                    kind = DELETE
                    method, req, rt = "Delete", pb.DeleteRequest(key=key), pb.DeleteResponse
                node = self._target(rng)
                t0 = time.monotonic()
                try:
                    with trio.fail_after(CALL_TIMEOUT + 5):
                        reply = await self._call(client, node, method, req, rt)
                except KVError as exc:
                    t1 = time.monotonic()
                    status = self._status_of(exc)
                    self.history.add(Op(pid, kind, key, t0, t1, status,
                                        value if kind in (PUT, CAS) else None, expected))
                    if status == FAIL:
                        await trio.sleep(0.01)  # a retry interval
                    continue
                except trio.TooSlowError:
                    self.history.add(Op(pid, kind, key, t0, None, UNKNOWN,
                                        value if kind in (PUT, CAS) else None, expected))
                    self.hint = None
                    continue
                t1 = time.monotonic()
                self.hint = node if kind != GET or rng.random() < 0.5 else self.hint
                result: Any = None
                if kind == GET:
                    result = reply.value if reply.found else None
                    last_seen[key] = result
                elif kind == DELETE:
                    result = bool(reply.deleted)
                    last_seen[key] = None
                elif kind == CAS:
                    result = (bool(reply.swapped), reply.current if reply.found else None)
                    last_seen[key] = value if reply.swapped else result[1]
                else:
                    last_seen[key] = value
                self.history.add(Op(pid, kind, key, t0, t1, OK,
                                    value if kind in (PUT, CAS) else None, expected, result))
        finally:
            await self.cluster.rpc(_close, client)

    async def _durable_client(self, pid: int, rng: random.Random) -> None:
        client = KVClient("127.0.0.1:1", timeout=CALL_TIMEOUT)
        n = 0
        try:
            while not self.stop.is_set():
                n += 1
                key, value = f"d/{n:06d}", f"durable-{n}".encode()
                node = self._target(rng)
                t0 = time.monotonic()
                try:
                    with trio.fail_after(CALL_TIMEOUT + 5):
                        await self._call(client, node, "Put", pb.PutRequest(key=key, value=value),
                                         pb.PutResponse)
                except (KVError, trio.TooSlowError) as exc:
                    t1 = time.monotonic()
                    failed = isinstance(exc, KVError) and exc.status is Status.FAILED_PRECONDITION
                    if isinstance(exc, KVError):
                        self._learn(exc)
                    if not failed:
                        self.history.durable_unknown[key] = value
                    self.history.add(Op(pid, PUT, key, t0, t1, FAIL if failed else UNKNOWN,
                                        value))
                    await trio.sleep(0.01)  # a retry interval
                    continue
                self.history.add(Op(pid, PUT, key, t0, time.monotonic(), OK, value))
                self.history.durable_acked[key] = value
        finally:
            await self.cluster.rpc(_close, client)

    async def _stream_client(self, pid: int, rng: random.Random) -> None:
        client = KVClient("127.0.0.1:1", timeout=CALL_TIMEOUT)
        seq = 0
        try:
            while not self.stop.is_set():
                puts = []
                for _ in range(STREAM_BURST):
                    seq += 1
                    puts.append((rng.choice(self.keys), f"s{pid}-{seq}".encode()))
                node = self._target(rng)
                t0 = time.monotonic()
                try:
                    with trio.fail_after(CALL_TIMEOUT + 5):
                        outcomes = await self.cluster.rpc(
                            _put_burst, client, self.cluster.nodes[node].address, puts)
                except trio.TooSlowError:
                    for j, (key, value) in enumerate(puts):
                        self.history.add(Op(pid + j, PUT, key, t0, None, UNKNOWN, value),
                                         "stream-")
                    self.hint = None
                    continue
                refused = False
                for j, ((key, value), (t1, exc)) in enumerate(zip(puts, outcomes, strict=True)):
                    if exc is None:
                        self.history.add(Op(pid + j, PUT, key, t0, t1, OK, value), "stream-")
                        self.hint = node
                        continue
                    status = self._status_of(exc)
                    refused = refused or status == FAIL
                    self.history.add(Op(pid + j, PUT, key, t0, t1, status, value), "stream-")
                if refused:
                    await trio.sleep(0.01)  # a retry interval
        finally:
            await self.cluster.rpc(_close, client)


async def _put_burst(client: KVClient, address: str, puts: list[tuple[str, bytes]]
                     ) -> list[tuple[float, KVError | None]]:
    """asyncio: ``puts`` in flight together over one PutStream call at ``address``; for each,
    when its answer or error arrived and the error (None when answered)."""
    out: list[tuple[float, KVError | None] | None] = [None] * len(puts)

    async def one(pipe: PutPipeline, j: int, key: str, value: bytes) -> None:
        try:
            await asyncio.wait_for(pipe.put(key, value), CALL_TIMEOUT)
            out[j] = (time.monotonic(), None)
        except KVError as exc:
            out[j] = (time.monotonic(), exc)
        except TimeoutError:
            out[j] = (time.monotonic(), KVError(Status.DEADLINE_EXCEEDED, "no answer", "",
                                                address))

    try:
        async with client.put_pipeline(address) as pipe:
            await asyncio.gather(*(one(pipe, j, k, v) for j, (k, v) in enumerate(puts)))
    except KVError as exc:  # the call could not be opened
        out = [o or (time.monotonic(), exc) for o in out]
    return [o or (time.monotonic(), KVError(Status.UNKNOWN, "no outcome", "", address))
            for o in out]


async def _close(c: KVClient) -> None:
    c.close()
