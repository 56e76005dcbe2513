"""Side by side: a 3-process kvnode cluster (fsync on) against a 3-process PySyncObj cluster.

    python bench/vs_pysyncobj.py [--duration 10] [--concurrency 1,64,1024] [--size 100]
                                 [--client grpclib,grpcio] [--connections 16] [--plot DIR]

Both clusters run on loopback, one OS process per node, and are driven by the same load
generator (this process): ``c`` concurrent tasks send ``Put(key, 100-byte value)`` to the leader
over gRPC (the KV service of protos/kv.proto, spread over up to 16 HTTP/2 connections) for a
fixed duration; each task sends its next request when the previous one is acknowledged. With
``--rpc unary`` each write is one ``Put`` call; with ``--rpc stream`` the tasks sharing a
connection send their writes over one ``PutStream`` call (answered in order); both by default.

* kvnode: ``examples/kvnode.py serve``; an acknowledgement means committed by a quorum (WAL
  fsynced on each of them) and applied on the leader.
* PySyncObj (installed by this script with pip into its own venv under the temp dir's
  ``trio-raft-bench/`` cache): each node is a ``SyncObj`` with a replicated dict, fronted by the
  same grpclib KV service, with kvnode's codec (``trio_raft_kv/flatproto.py``) and, like
  kvnode's ``PutStream``, streamed requests that arrived whole taken together and settled
  answers written together (``Put`` -> ``ReplDict.set`` with a callback); an acknowledgement
  means PySyncObj reported the command applied. PySyncObj keeps its log in memory (no fsync).
* null: one process serving the same grpclib ``Put`` by acknowledging at once, with nothing
  behind it. Its throughput is the ceiling this front end and this load generator impose on any
  system measured this way, on this machine.

Every setting runs twice, once per load generator client (``--client``): the project's client
(``trio_raft_kv.client``, grpclib) and grpcio's asyncio client (the reference implementation
most other languages' clients behave like), with the same tasks, requests and number of
connections (``--connections``, default 16; one channel per connection, none shared).

* kvnode-sealed: kvnode with encryption at rest (``--key-dir``/``--kek-file``, then
  ``encryption enable`` before the load): every entry wrapped with AES-256-GCM, every snapshot
  payload sealed. With ``--snapshot-every N`` (both kvnode systems) the nodes snapshot while the
  load runs, so the sealed snapshots' cost is in the figures; a third table compares the two.

Prints a JSON line per system, client and setting (ops/s, p50/p99 latency in ms, and the CPU
time each process spent per acknowledged op: leader, followers together, load generator), then
two tables: kvnode against PySyncObj, and grpcio against the project's client. Figures, not
assertions; loopback only. ``--systems`` picks a subset. ``--plot DIR`` draws one
latency-throughput curve per system, rpc and client (``bench/plot.py``; matplotlib, the
``bench`` extra) as ``DIR/vs_pysyncobj.png`` and ``.svg``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")

PYSYNCOBJ_REQ = ["pysyncobj>=0.3.12", "grpclib>=0.4.7", "betterproto2>=0.10,<0.11"]
MAX_CHANNELS = 16
#: The collector's thresholds every process gets (``--gc-threshold`` and the older two): those
#: of ``trio_raft.tune_gc``, which ``orchestrate`` checks, written out here because the
#: PySyncObj and null nodes run where trio_raft cannot be imported.
GC_THRESHOLD, GC_OLDER = 50_000, (20, 10)
POLL = 0.05


# -- the KV front end shared by the PySyncObj and null nodes ------------------------------------

def whole_bodies(buf: Any) -> list[bytes]:
    """The request bodies already whole in a stock grpclib stream buffer, taken in one pass
    (kvnode's server does the same with its checks: trio_raft/transport/grpc_h2server.py)."""
    from grpclib.protocol import AckedData

    while not buf._unacked.empty():
        data, size, ack = buf._unacked.get_nowait()
        if not ack:  # the end of the request stays for grpclib's own read
            buf._unacked.put_nowait((data, size, ack))
            break
        buf._acked.append(AckedData(memoryview(data), size))
        buf._acked_size += size
        buf._ack_callback(ack)
    blob = b"".join(chunk for chunk, _ in buf._acked)
    bodies, pos = [], 0
    while len(blob) - pos >= 5 and not blob[pos]:
        length = int.from_bytes(blob[pos + 1:pos + 5], "big")
        if len(blob) - pos - 5 < length:
            break
        bodies.append(blob[pos + 5:pos + 5 + length])
        pos += 5 + length
    if pos:
        rest = blob[pos:]
        buf._acked.clear()
        if rest:
            buf._acked.append(AckedData(memoryview(rest), len(rest)))
        buf._acked_size = len(rest)
    return bodies


def tune_gc_like_kvnode(threshold: int) -> None:
    """In the PySyncObj and null nodes, once serving: the collector as ``trio_raft.tune_gc``
    sets it in kvnode (every system runs with the same settings)."""
    if threshold > 0:
        import gc

        gc.set_threshold(threshold, *GC_OLDER)
        gc.collect()
        gc.freeze()


def serve_kv(args: argparse.Namespace, put: Callable[[Any], Awaitable[None]],
             status: Callable[[Any], Awaitable[None]],
             propose: Callable[[Any], Awaitable[Any]],
             cleanup: Callable[[], None] | None = None) -> None:
    """Serve the KV service's ``Put``, ``PutStream`` and ``Status`` (grpclib, raw stream
    handlers) on ``args.listen`` until SIGTERM/SIGINT. ``propose(request)`` returns an
    awaitable settled once the write is acknowledged (PutStream answers them in order)."""
    from grpclib.const import Cardinality, Handler
    from grpclib.server import Server

    from trio_raft_kv._proto.trio_raft.kv import v1 as pb
    from trio_raft_kv.flatproto import FlatCodec

    async def put_stream(stream: Any) -> None:
        # As kvnode's PutStream does it (trio_raft_kv/putstream.py): the requests that arrived
        # whole are taken together, and the answers already settled go out in one DATA write.
        pending: asyncio.Queue[Any] = asyncio.Queue()

        async def answer() -> None:
            done = False
            while not done:
                batch = [await pending.get()]
                while not pending.empty() and batch[-1] is not None and batch[-1].done():
                    batch.append(pending.get_nowait())
                if batch[-1] is None:
                    done = True
                    batch.pop()
                replies = []
                for acked in batch:
                    await acked
                    replies.append(bytes(pb.PutResponse(index=0)))
                if replies:
                    if not stream._send_initial_metadata_done:
                        await stream.send_initial_metadata()
                    await stream._stream.send_data(b"".join(
                        b"\x00" + len(r).to_bytes(4, "big") + r for r in replies))

        answering = asyncio.ensure_future(answer())
        while (request := await stream.recv_message()) is not None:
            pending.put_nowait(asyncio.ensure_future(propose(request)))
            for body in whole_bodies(stream._stream.buffer):
                pending.put_nowait(asyncio.ensure_future(
                    propose(stream._codec.decode(body, pb.PutRequest))))
        pending.put_nowait(None)
        await answering

    class KV:
        def __mapping__(self) -> dict[str, Handler]:
            return {
                "/trio_raft.kv.v1.KV/Put": Handler(put, Cardinality.UNARY_UNARY,
                                                   pb.PutRequest, pb.PutResponse),
                "/trio_raft.kv.v1.KV/PutStream": Handler(put_stream, Cardinality.STREAM_STREAM,
                                                         pb.PutRequest, pb.PutResponse),
                "/trio_raft.kv.v1.KV/Status": Handler(status, Cardinality.UNARY_UNARY,
                                                      pb.StatusRequest, pb.StatusResponse),
            }

    async def main() -> None:
        host, port = args.listen.rsplit(":", 1)
        server = Server([KV()], codec=FlatCodec())  # kvnode's codec: the same front end
        await server.start(host, int(port))
        tune_gc_like_kvnode(args.gc_threshold)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        print(json.dumps({"event": "ready", "id": args.id}), flush=True)
        await stop.wait()
        server.close()
        await server.wait_closed()
        if cleanup is not None:
            cleanup()

    asyncio.run(main())


# -- the PySyncObj node (runs under the PySyncObj venv's python) ---------------------------------

def pysyncobj_node(args: argparse.Namespace) -> None:
    from grpclib.const import Status
    from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf
    from pysyncobj.batteries import ReplDict

    from trio_raft_kv._proto.trio_raft.kv import v1 as pb

    peers = dict(item.split("=", 1) for item in args.peers.split(","))
    store = ReplDict()
    sync = SyncObj(peers[args.id], [a for n, a in peers.items() if n != args.id],
                   consumers=[store], conf=SyncObjConf(dynamicMembershipChange=False))

    def propose(req: Any) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()

        def settle(err: int) -> None:
            if fut.done():
                return
            if err == FAIL_REASON.SUCCESS:
                fut.set_result(None)
            else:
                fut.set_exception(RuntimeError(f"pysyncobj error {err}"))

        def done(_result: Any, err: int) -> None:  # PySyncObj's thread
            loop.call_soon_threadsafe(settle, err)

        store.set(req.key, req.value, callback=done)
        return fut

    async def put(stream: Any) -> None:
        try:
            await propose(await stream.recv_message())
        except RuntimeError as exc:
            await stream.send_trailing_metadata(status=Status.UNAVAILABLE,
                                                status_message=str(exc))
            return
        await stream.send_message(pb.PutResponse(index=0))

    async def status(stream: Any) -> None:
        await stream.recv_message()
        leader = sync._getLeader()
        state = "leader" if sync._isLeader() else "follower"
        await stream.send_message(pb.StatusResponse(
            id=args.id, state=state, leader_address=str(leader or "")))

    serve_kv(args, put, status, propose, cleanup=sync.destroy)


# -- the front-end ceiling: the same grpclib KV service with no replication behind it -----------

def null_node(args: argparse.Namespace) -> None:
    """One process serving ``Put`` by acknowledging at once: what the shared grpclib front end
    and this load generator cost on their own, i.e. the ceiling for any system fronted this way."""
    from trio_raft_kv._proto.trio_raft.kv import v1 as pb

    async def put(stream: Any) -> None:
        await stream.recv_message()
        await stream.send_message(pb.PutResponse(index=0))

    async def status(stream: Any) -> None:
        await stream.recv_message()
        await stream.send_message(pb.StatusResponse(id=args.id, state="leader"))

    async def acknowledged() -> None:
        return None

    serve_kv(args, put, status, lambda _request: acknowledged())


# -- orchestration -------------------------------------------------------------------------------

def pysyncobj_python(cache: str) -> str:
    venv = os.path.join(cache, "pysyncobj-venv")
    py = os.path.join(venv, "bin", "python")
    marker = os.path.join(venv, ".installed")
    if not os.path.exists(marker):
        subprocess.run([sys.executable, "-m", "venv", "--clear", venv], check=True)
        subprocess.run([py, "-m", "pip", "install", "--quiet", *PYSYNCOBJ_REQ], check=True)
        with open(marker, "w") as f:
            f.write("\n".join(PYSYNCOBJ_REQ))
    return py


class Procs:
    def __init__(self) -> None:
        self.procs: list[asyncio.subprocess.Process] = []
        self.logs: list[Any] = []

    async def start(self, cmd: list[str], log_path: str) -> None:
        log = open(log_path, "ab")  # noqa: SIM115
        self.logs.append(log)
        self.procs.append(await asyncio.create_subprocess_exec(
            *cmd, stdout=log, stderr=log, stdin=asyncio.subprocess.DEVNULL, cwd=ROOT))

    async def stop(self) -> None:
        for p in self.procs:
            if p.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                await asyncio.wait_for(p.wait(), 15)
            except TimeoutError:
                p.kill()
                await p.wait()
        for log in self.logs:
            log.close()


async def find_leader(addrs: list[str], timeout: float = 60.0) -> str:
    from trio_raft_kv.client import KVClient, KVError

    client = KVClient(addrs[0], timeout=1.0)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            for a in addrs:
                with contextlib.suppress(KVError):
                    if (await client.status(a)).state == "leader":
                        return a
            await asyncio.sleep(POLL)
    finally:
        client.close()
    raise TimeoutError("no leader")


async def load(addr: str, concurrency: int, duration: float, size: int,
               rpc: str = "unary", connections: int = MAX_CHANNELS) -> dict[str, Any]:
    """``concurrency`` tasks putting back to back for ``duration`` seconds, over up to
    ``MAX_CHANNELS`` connections: one unary ``Put`` call per write, or (``rpc="stream"``) one
    long ``PutStream`` call per connection carrying the writes of the tasks that share it."""
    from trio_raft_kv._proto.trio_raft.kv import v1 as pb
    from trio_raft_kv.client import KVClient, KVError, PutPipeline

    clients = [KVClient(addr, timeout=30.0) for _ in range(min(concurrency, connections))]
    value = os.urandom(size)
    latencies: list[float] = []
    errors = 0
    # Warm-up: connections open and the leader's term committed before timing starts.
    for c in clients:
        with contextlib.suppress(KVError):
            await c.put("warmup", value)
    pipes: list[PutPipeline] = []
    async with contextlib.AsyncExitStack() as stack:
        if rpc == "stream":
            pipes = [await stack.enter_async_context(c.put_pipeline()) for c in clients]
        end = time.monotonic() + duration

        async def worker(i: int) -> None:
            nonlocal errors
            c = clients[i % len(clients)]
            pipe = pipes[i % len(pipes)] if pipes else None
            n = 0
            while time.monotonic() < end:
                n += 1
                t0 = time.perf_counter()
                try:
                    if pipe is not None:
                        await pipe.put(f"k{i}-{n}", value)
                    else:
                        await c.call_at(addr, "/trio_raft.kv.v1.KV/Put",
                                        pb.PutRequest(key=f"k{i}-{n}", value=value),
                                        pb.PutResponse)
                except KVError:
                    errors += 1
                    if pipe is not None:
                        return  # the call has ended
                    continue
                latencies.append(time.perf_counter() - t0)

        t_start = time.monotonic()
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        elapsed = time.monotonic() - t_start
    for c in clients:
        c.close()
    return summarize(rpc, concurrency, latencies, errors, elapsed)


async def load_grpcio(addr: str, concurrency: int, duration: float, size: int,
                      rpc: str = "unary", connections: int = MAX_CHANNELS) -> dict[str, Any]:
    """:func:`load` with grpcio's asyncio client instead of the project's (grpclib): the same
    tasks and requests over the same number of connections (one channel each, none shared)."""
    import grpc

    from trio_raft_kv._proto.trio_raft.kv import v1 as pb

    n_channels = min(concurrency, connections)
    channels = [grpc.aio.insecure_channel(addr, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(n_channels)]
    value = os.urandom(size)
    latencies: list[float] = []
    errors = 0

    def encode(request: pb.PutRequest) -> bytes:
        return bytes(request)

    puts = [ch.unary_unary("/trio_raft.kv.v1.KV/Put", request_serializer=encode,
                           response_deserializer=pb.PutResponse.parse) for ch in channels]
    for put in puts:  # warm-up: connections open before timing starts
        with contextlib.suppress(grpc.aio.AioRpcError):
            await put(pb.PutRequest(key="warmup", value=value), timeout=30)
    pipes = ([GrpcioPipeline(ch, encode) for ch in channels] if rpc == "stream" else [])
    end = time.monotonic() + duration

    async def worker(i: int) -> None:
        nonlocal errors
        put = puts[i % n_channels]
        pipe = pipes[i % n_channels] if pipes else None
        n = 0
        while time.monotonic() < end:
            n += 1
            t0 = time.perf_counter()
            request = pb.PutRequest(key=f"k{i}-{n}", value=value)
            try:
                if pipe is not None:
                    await pipe.put(request)
                else:
                    await put(request, timeout=30)
            except grpc.aio.AioRpcError:
                errors += 1
                if pipe is not None:
                    return
                continue
            latencies.append(time.perf_counter() - t0)

    t_start = time.monotonic()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    elapsed = time.monotonic() - t_start
    for pipe in pipes:
        await pipe.aclose()
    for ch in channels:
        await ch.close()
    return summarize(rpc, concurrency, latencies, errors, elapsed)


class GrpcioPipeline:
    """Puts over one grpcio ``PutStream`` call; answers come back in order."""

    def __init__(self, channel: Any, encode: Callable[[Any], bytes]) -> None:
        from trio_raft_kv._proto.trio_raft.kv import v1 as pb

        self._call = channel.stream_stream(
            "/trio_raft.kv.v1.KV/PutStream", request_serializer=encode,
            response_deserializer=pb.PutResponse.parse)()
        self._waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self._lock = asyncio.Lock()
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            async for reply in self._call:
                self._waiting.popleft().set_result(reply)
        except BaseException as exc:
            while self._waiting:
                fut = self._waiting.popleft()
                if not fut.done():
                    fut.set_exception(exc)
            raise

    async def put(self, request: Any) -> Any:
        fut = asyncio.get_running_loop().create_future()
        async with self._lock:
            self._waiting.append(fut)
            await self._call.write(request)
        return await fut

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await self._call.done_writing()
        with contextlib.suppress(BaseException):
            await self._reader


def summarize(rpc: str, concurrency: int, latencies: list[float], errors: int,
              elapsed: float) -> dict[str, Any]:
    latencies.sort()

    def pct(q: float) -> float:
        if not latencies:
            return 0.0
        return latencies[min(len(latencies) - 1, round(q * (len(latencies) - 1)))] * 1000

    return {"rpc": rpc, "concurrency": concurrency, "ops": len(latencies), "errors": errors,
            "seconds": round(elapsed, 2), "ops_per_s": round(len(latencies) / elapsed, 1),
            "p50_ms": round(pct(0.50), 2), "p99_ms": round(pct(0.99), 2)}


async def run_system(system: str, args: argparse.Namespace, base: str,
                     py: str | None) -> list[dict[str, Any]]:
    from trio_raft_kv.demo import NAMES, free_ports

    ports = free_ports(6)
    api = {n: f"127.0.0.1:{p}" for n, p in zip(NAMES, ports[:3])}
    procs = Procs()
    results = []
    try:
        for i, n in enumerate(NAMES):
            log = os.path.join(base, f"{system}-{n}.log")
            if system == "null":  # a single process: there is nothing to replicate
                if i == 0:
                    await procs.start([sys.executable, os.path.abspath(__file__), "null-node",
                                       "--id", n, "--listen", api[n],
                                       "--gc-threshold", str(args.gc_threshold)], log)
                continue
            if system in ("kvnode", "kvnode-sealed"):
                peers = ",".join(f"{m}={a}" for m, a in api.items())
                cmd = [sys.executable, os.path.join(EXAMPLES, "kvnode.py"), "serve", "--id", n,
                       "--listen", api[n], "--peers", peers, "--bootstrap",
                       "--data-dir", os.path.join(base, f"{system}-{n}"),
                       "--snapshot-every", str(args.snapshot_every),
                       "--gc-threshold", str(args.gc_threshold)]
                if system == "kvnode-sealed":
                    cmd += ["--key-dir", os.path.join(base, f"keys-{n}"),
                            "--kek-file", kek_file(base)]
            else:
                assert py is not None
                raft = {m: f"127.0.0.1:{p}" for m, p in zip(NAMES, ports[3:])}
                peers = ",".join(f"{m}={a}" for m, a in raft.items())
                # Run as a module from ROOT (the cwd): PySyncObj's venv does not have
                # trio_raft_kv installed, so it imports the generated KV messages from the tree.
                cmd = [py, "-m", "bench.vs_pysyncobj", "pysyncobj-node", "--id", n,
                       "--listen", api[n], "--peers", peers,
                       "--gc-threshold", str(args.gc_threshold)]
            await procs.start(cmd, log)
            del i
        leader = await find_leader(list(api.values())[:len(procs.procs)])
        if system == "kvnode-sealed":
            await enable_encryption(leader)
        from nodes import cpu_seconds  # the script's own directory is on the import path

        pids = [p.pid for p in procs.procs]
        leader_i = list(api.values()).index(leader)
        settings = [(client, rpc, int(c)) for client in args.client.split(",")
                    for rpc in args.rpc.split(",") for c in args.concurrency.split(",")]
        for client, rpc, c in settings:
            before, gen_before = cpu_seconds(pids), time.process_time()
            loader = load_grpcio if client == "grpcio" else load
            r = await loader(leader, c, args.duration, args.size, rpc, args.connections)
            used = [b - a for a, b in zip(before, cpu_seconds(pids))]
            gen = time.process_time() - gen_before
            ops = max(r["ops"], 1)
            row = {"bench": "vs_pysyncobj", "system": system, "client": client,
                   "connections": min(c, args.connections),
                   "nodes": 1 if system == "null" else 3,
                   "fsync": system.startswith("kvnode"), "value_bytes": args.size, **r,
                   # CPU microseconds per acknowledged op: leader, followers (sum), generator
                   "cpu_us_per_op": {
                       "leader": round(used[leader_i] / ops * 1e6),
                       "followers": round((sum(used) - used[leader_i]) / ops * 1e6),
                       "generator": round(gen / ops * 1e6)}}
            print(json.dumps(row), flush=True)
            results.append(row)
    finally:
        await procs.stop()
    return results


def kek_file(base: str) -> str:
    """The cluster's KEK file for kvnode-sealed (created once, mode 0600)."""
    path = os.path.join(base, "cluster.kek")
    if not os.path.exists(path):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(os.urandom(32).hex())
    return path


async def enable_encryption(leader: str) -> None:
    from trio_raft_kv.client import KVClient

    client = KVClient(leader, timeout=60)
    try:
        r = await client.encryption_enable()
    finally:
        client.close()
    print(json.dumps({"event": "encryption_enabled", "cutover_index": r.cutover_index,
                      "active_key_id": r.active_key_id}), flush=True)


def table(rows: list[dict[str, Any]]) -> str:
    """kvnode against PySyncObj (the project's client); then, where both clients ran, grpcio's
    client against the project's, per system."""
    by = {(r["system"], r.get("client", "grpclib"), r["rpc"], r["concurrency"]): r
          for r in rows}
    settings = sorted({(r["rpc"], r["concurrency"]) for r in rows},
                      key=lambda s: (s[0] != "unary", s[1]))
    out = ["| rpc | in flight | kvnode ops/s | kvnode p50 / p99 ms | PySyncObj ops/s "
           "| PySyncObj p50 / p99 ms | throughput ratio | p50 ratio | front end alone ops/s |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for rpc, c in settings:
        k, p = by.get(("kvnode", "grpclib", rpc, c)), by.get(("pysyncobj", "grpclib", rpc, c))
        if k is None or p is None:
            continue
        n = by.get(("null", "grpclib", rpc, c))
        tr = k["ops_per_s"] / p["ops_per_s"] if p["ops_per_s"] else float("inf")
        lr = p["p50_ms"] / k["p50_ms"] if k["p50_ms"] else float("inf")
        ceiling = f"{n['ops_per_s']:.0f}" if n is not None else "-"
        out.append(f"| {rpc} | {c} | {k['ops_per_s']:.0f} | "
                   f"{k['p50_ms']:.1f} / {k['p99_ms']:.1f} | "
                   f"{p['ops_per_s']:.0f} | {p['p50_ms']:.1f} / {p['p99_ms']:.1f} | "
                   f"{tr:.2f}x | {lr:.1f}x lower | {ceiling} |")
    clients = ["| system | rpc | in flight | connections | project's client ops/s "
               "| grpcio ops/s | grpcio / project's |", "|---|---|---:|---:|---:|---:|---:|"]
    for system in ("kvnode", "pysyncobj", "null"):
        for rpc, c in settings:
            mine, theirs = (by.get((system, "grpclib", rpc, c)),
                            by.get((system, "grpcio", rpc, c)))
            if mine is None or theirs is None:
                continue
            ratio = theirs["ops_per_s"] / mine["ops_per_s"] if mine["ops_per_s"] else 0.0
            clients.append(f"| {system} | {rpc} | {c} | {mine.get('connections', '-')} | "
                           f"{mine['ops_per_s']:.0f} | {theirs['ops_per_s']:.0f} | "
                           f"{ratio:.0%} |")
    sealed = ["| rpc | in flight | kvnode ops/s | sealed ops/s | throughput change "
              "| kvnode p50 / p99 ms | sealed p50 / p99 ms |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for rpc, c in settings:
        k = by.get(("kvnode", "grpclib", rpc, c))
        e = by.get(("kvnode-sealed", "grpclib", rpc, c))
        if k is None or e is None or not k["ops_per_s"]:
            continue
        change = (e["ops_per_s"] - k["ops_per_s"]) / k["ops_per_s"]
        sealed.append(f"| {rpc} | {c} | {k['ops_per_s']:.0f} | {e['ops_per_s']:.0f} | "
                      f"{change:+.1%} | {k['p50_ms']:.1f} / {k['p99_ms']:.1f} | "
                      f"{e['p50_ms']:.1f} / {e['p99_ms']:.1f} |")
    if len(out) == 2:
        out = []
    if len(clients) > 2:
        out += ["", *clients]
    if len(sealed) > 2:
        out += ["", *sealed]
    return "\n".join(out)


def prepare(duration: float, systems: list[str]) -> str | None:
    """Print the machine line; return the python of PySyncObj's venv (made once, cached)
    when PySyncObj runs."""
    cache = os.path.join(tempfile.gettempdir(), "trio-raft-bench")
    os.makedirs(cache, exist_ok=True)
    py = pysyncobj_python(cache) if "pysyncobj" in systems else None
    print(json.dumps({"event": "machine", "python": platform.python_version(),
                      "cpus": os.cpu_count(), "platform": platform.platform(),
                      "duration_s": duration}), flush=True)
    return py


async def orchestrate(args: argparse.Namespace) -> None:
    import trio_raft
    from trio_raft.gctune import OLDER_THRESHOLDS

    assert (GC_THRESHOLD, GC_OLDER) == (trio_raft.GC_THRESHOLD, OLDER_THRESHOLDS)
    if args.gc_threshold > 0:  # the load generator too, as every node
        trio_raft.tune_gc(args.gc_threshold)
    py = prepare(args.duration, args.systems.split(","))
    base = tempfile.mkdtemp(prefix="vs-pysyncobj-")
    try:
        rows = []
        for system in args.systems.split(","):
            rows += await run_system(system, args, base, py if system == "pysyncobj" else None)
    except BaseException:
        print(f"logs kept in {base}", file=sys.stderr)
        raise
    print()
    print(table(rows), flush=True)
    shutil.rmtree(base, ignore_errors=True)
    if args.plot:
        from plot import plot_rows

        for path in plot_rows(rows, args.plot, "vs_pysyncobj",
                              "Put behind the same gRPC front end, 3 processes"):
            print(json.dumps({"event": "plot", "file": path}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", nargs="?", default="run",
                    choices=["run", "pysyncobj-node", "null-node"])
    ap.add_argument("--id")
    ap.add_argument("--listen")
    ap.add_argument("--peers")
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--concurrency", default="1,64,1024")
    ap.add_argument("--size", type=int, default=100)
    ap.add_argument("--rpc", default="unary,stream",
                    help="comma-separated subset of unary (a Put call per write) and stream "
                         "(writes multiplexed over PutStream calls)")
    ap.add_argument("--client", default="grpclib,grpcio",
                    help="comma-separated subset of grpclib (the project's client, "
                         "trio_raft_kv.client) and grpcio (grpcio's asyncio client): the load "
                         "generator's gRPC client, over the same number of connections")
    ap.add_argument("--connections", type=int, default=MAX_CHANNELS,
                    help="HTTP/2 connections the load generator spreads its tasks over "
                         "(at most the tasks in flight)")
    ap.add_argument("--systems", default="kvnode,pysyncobj,null",
                    help="comma-separated subset of kvnode,pysyncobj,null,kvnode-sealed (null: "
                         "the KV front end alone, acknowledging without replication; "
                         "kvnode-sealed: kvnode with encryption at rest on)")
    ap.add_argument("--snapshot-every", type=int, default=10_000,
                    help="kvnode's --snapshot-every (both kvnode systems)")
    ap.add_argument("--plot", default=None, metavar="DIR",
                    help="draw latency-throughput curves into DIR (needs the bench extra)")
    ap.add_argument("--gc-threshold", type=int, default=GC_THRESHOLD,
                    help="the garbage collector's young-generation threshold of every process "
                         "of every system and of the load generator, set once each has "
                         "started (kvnode's --gc-threshold; 0: the interpreter's settings)")
    args = ap.parse_args()
    if args.mode == "pysyncobj-node":
        pysyncobj_node(args)
    elif args.mode == "null-node":
        null_node(args)
    else:
        asyncio.run(orchestrate(args))


if __name__ == "__main__":
    main()
