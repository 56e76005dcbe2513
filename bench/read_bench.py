"""Reads of a 3-process kvnode cluster (fsync on), by read mode, concurrency and target.

    python bench/read_bench.py [--duration 3] [--concurrency 1,32,256] [--channels 4]

Three ``kvnode serve`` processes on loopback hold ``--keys`` keys. A grpcio client (the
reference gRPC implementation, ``--channels`` channels, round-robin) keeps ``c`` ``Get`` calls
in flight for ``--duration`` seconds, each task sending its next call when the previous one is
answered, for every combination of:

* read mode: ``LINEARIZABLE`` (ReadIndex; batched rounds, trio_raft/engine/reads.py), ``LEASE``
  (the leader's lease, no round; a follower falls back to ReadIndex) and ``LOCAL`` (whatever the
  node has applied: possibly stale);
* target: ``leader`` (every call to the leader) and ``all`` (calls spread over the three nodes:
  followers serve linearizable reads themselves after asking the leader for the read index).

Prints one JSON line per setting (ops/s, p50/p99 ms, errors), then the checks of
docs/benchmarks.md (reads) and a table; ``--plot DIR`` draws the curves (``bench/plot.py``).
Figures, not assertions.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GET = "/trio_raft.kv.v1.KV/Get"
PUT = "/trio_raft.kv.v1.KV/Put"


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


async def start_cluster(base: str) -> tuple[list[asyncio.subprocess.Process], list[str]]:
    ports = free_ports(3)
    addrs = [f"127.0.0.1:{p}" for p in ports]
    peers = ",".join(f"n{i + 1}={a}" for i, a in enumerate(addrs))
    procs = []
    for i, a in enumerate(addrs):
        log = open(os.path.join(base, f"n{i + 1}.log"), "ab")  # noqa: SIM115
        procs.append(await asyncio.create_subprocess_exec(
            sys.executable, "-m", "trio_raft_kv", "serve", "--id", f"n{i + 1}", "--listen", a,
            "--peers", peers, "--data-dir", os.path.join(base, f"n{i + 1}"), "--bootstrap",
            stdout=log, stderr=log, stdin=asyncio.subprocess.DEVNULL, cwd=ROOT))
    return procs, addrs


async def stop_cluster(procs: list[asyncio.subprocess.Process]) -> None:
    for p in procs:
        if p.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            await asyncio.wait_for(p.wait(), 15)
        except TimeoutError:
            p.kill()
            await p.wait()


class Client:
    """grpcio channels to every node; calls by method path with betterproto2 messages."""

    def __init__(self, addrs: list[str], channels: int) -> None:
        import grpc

        self.grpc = grpc
        self.channels = {a: [grpc.aio.insecure_channel(a) for _ in range(channels)]
                         for a in addrs}
        self._next = 0

    def call(self, addr: str, path: str, request: Any, reply_type: type) -> Any:
        chans = self.channels[addr]
        self._next += 1
        method = chans[self._next % len(chans)].unary_unary(
            path, request_serializer=bytes, response_deserializer=reply_type.FromString)
        return method(request, timeout=10.0)

    async def close(self) -> None:
        for chans in self.channels.values():
            for ch in chans:
                await ch.close()


async def find_leader(client: Client, addrs: list[str], timeout: float = 60.0) -> str:
    from trio_raft_kv._proto.trio_raft.kv import v1 as pb

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for a in addrs:
            with contextlib.suppress(client.grpc.aio.AioRpcError):
                st = await client.call(a, "/trio_raft.kv.v1.KV/Status", pb.StatusRequest(),
                                       pb.StatusResponse)
                if st.state == "leader":
                    return a
        await asyncio.sleep(0.05)
    raise TimeoutError("no leader")


async def fill(client: Client, leader: str, keys: int) -> None:
    from trio_raft_kv._proto.trio_raft.kv import v1 as pb

    value = os.urandom(100)
    sem = asyncio.Semaphore(64)

    async def one(i: int) -> None:
        async with sem:
            await client.call(leader, PUT, pb.PutRequest(key=f"k{i}", value=value),
                              pb.PutResponse)

    await asyncio.gather(*(one(i) for i in range(keys)))


async def measure(client: Client, targets: list[str], mode: str, concurrency: int,
                  duration: float, keys: int) -> dict[str, Any]:
    from trio_raft_kv._proto.trio_raft.kv import v1 as pb

    read_mode = getattr(pb.ReadMode, mode)
    latencies: list[float] = []
    errors = 0
    end = time.monotonic() + duration

    async def worker(i: int) -> None:
        nonlocal errors
        target = targets[i % len(targets)]
        n = i
        while time.monotonic() < end:
            n += concurrency
            t0 = time.perf_counter()
            try:
                await client.call(target, GET, pb.GetRequest(key=f"k{n % keys}", mode=read_mode),
                                  pb.GetResponse)
            except client.grpc.aio.AioRpcError:
                errors += 1
                continue
            latencies.append(time.perf_counter() - t0)

    t_start = time.monotonic()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    elapsed = time.monotonic() - t_start
    latencies.sort()

    def pct(q: float) -> float:
        if not latencies:
            return 0.0
        return latencies[min(len(latencies) - 1, round(q * (len(latencies) - 1)))] * 1000

    return {"ops_per_s": round(len(latencies) / elapsed, 1), "p50_ms": round(pct(0.50), 2),
            "p99_ms": round(pct(0.99), 2), "ops": len(latencies), "errors": errors}


def checks(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The targets of docs/benchmarks.md (reads), computed from this run's rows."""
    def row(mode: str, target: str, c: int) -> dict[str, Any] | None:
        return next((r for r in rows if (r["mode"], r["target"], r["concurrency"])
                     == (mode, target, c)), None)

    out: list[dict[str, Any]] = []
    lin32, lease32 = row("LINEARIZABLE", "leader", 32), row("LEASE", "leader", 32)
    if lin32 and lease32 and lease32["ops_per_s"]:
        ratio = lin32["ops_per_s"] / lease32["ops_per_s"]
        out.append({"check": "32 linearizable >= 70% of 32 lease (leader)",
                    "ratio": round(ratio, 2), "met": ratio >= 0.70})
    lin1, local1 = row("LINEARIZABLE", "leader", 1), row("LOCAL", "leader", 1)
    if lin1 and local1 and local1["p50_ms"]:
        ratio = lin1["p50_ms"] / local1["p50_ms"]
        out.append({"check": "1 in flight: linearizable p50 <= 2x local p50 (leader)",
                    "ratio": round(ratio, 2), "met": ratio <= 2.0})
    spread, lead = row("LINEARIZABLE", "all", 96), row("LINEARIZABLE", "leader", 96)
    if spread and lead:
        out.append({"check": "96 in flight: linearizable over all nodes > leader only",
                    "all_ops_per_s": spread["ops_per_s"], "leader_ops_per_s": lead["ops_per_s"],
                    "met": spread["ops_per_s"] > lead["ops_per_s"]})
    return out


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| mode | target | in flight | ops/s | p50 ms | p99 ms | errors |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['target']} | {r['concurrency']} | "
                     f"{r['ops_per_s']:,.0f} | {r['p50_ms']} | {r['p99_ms']} | {r['errors']} |")
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> None:
    print(json.dumps({"event": "machine", "python": platform.python_version(),
                      "cpus": os.cpu_count(), "platform": platform.platform(),
                      "duration_s": args.duration, "channels": args.channels}), flush=True)
    base = tempfile.mkdtemp(prefix="read-bench-")
    procs, addrs = await start_cluster(base)
    client = Client(addrs, args.channels)
    rows: list[dict[str, Any]] = []
    try:
        leader = await find_leader(client, addrs)
        await fill(client, leader, args.keys)
        concurrencies = [int(c) for c in args.concurrency.split(",")]
        settings = [(m, t, c) for m in args.modes.split(",") for t in ("leader", "all")
                    for c in concurrencies]
        if "LINEARIZABLE" in args.modes:
            settings += [("LINEARIZABLE", t, 96) for t in ("leader", "all")]
        for mode, target, c in settings:
            targets = [leader] if target == "leader" else addrs
            await measure(client, targets, mode, min(c, 16), 0.3, args.keys)  # warm-up
            r = {"bench": "read", "mode": mode, "target": target, "concurrency": c,
                 **await measure(client, targets, mode, c, args.duration, args.keys)}
            rows.append(r)
            print(json.dumps(r), flush=True)
        for chk in checks(rows):
            print(json.dumps(chk), flush=True)
        print()
        print(table(rows), flush=True)
        if args.plot:
            from plot import plot_rows

            for path in plot_rows(rows, args.plot, "reads",
                                  "Get through grpcio, 3 kvnode processes, fsync on"):
                print(json.dumps({"event": "plot", "file": path}), flush=True)
    except BaseException:
        print(f"logs kept in {base}", file=sys.stderr)
        raise
    finally:
        await client.close()
        await stop_cluster(procs)
    shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=3.0, help="seconds per setting")
    ap.add_argument("--concurrency", default="1,32,256", help="calls in flight, comma-separated")
    ap.add_argument("--modes", default="LINEARIZABLE,LEASE,LOCAL")
    ap.add_argument("--channels", type=int, default=4, help="grpcio channels per node")
    ap.add_argument("--keys", type=int, default=1000)
    ap.add_argument("--plot", default=None, metavar="DIR",
                    help="draw one latency-throughput curve per mode and target into DIR "
                         "(DIR/reads.png and .svg; needs the bench extra)")
    asyncio.run(run(ap.parse_args()))


if __name__ == "__main__":
    main()
