"""``kvnode demo``: a local 3-node cluster taken through a leader failure, with live progress.

1. start three ``serve`` processes on free loopback ports (fresh data dirs, fsync on);
2. run ``--clients`` writer tasks (100-byte values, one new key per write) and a lease reader,
   printing ops/s, the leader and the term every second;
3. SIGKILL the leader; keep writing; report how long the cluster had no leader;
4. read every acknowledged key back linearizably and compare it byte for byte;
5. restart the killed node with its original command line and show it catch up;
6. SIGTERM everything, check each node exited 0, print a summary (exit 0 only if all held).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from grpclib.const import Status

from trio_raft.testing.net import free_loopback_ports
from trio_raft_kv._proto.trio_raft.kv import v1 as pb
from trio_raft_kv.cli import ExitCode
from trio_raft_kv.client import KVClient, KVError

#: How the demo starts a node: this package's ``kvnode`` command, with this interpreter.
KVNODE = (sys.executable, "-m", "trio_raft_kv")
NAMES = ("n1", "n2", "n3")
#: Seconds between two looks at the nodes' status (they are other processes: no event crosses
#: over) and between two attempts after a refused or failed write.
POLL = 0.05
T = TypeVar("T")
VALUE_BYTES = 100


def free_ports(n: int) -> list[int]:
    return free_loopback_ports(n)


class Cluster:
    """Three local ``serve`` processes (also used by the tests and the benchmark)."""

    def __init__(self, root: str, *, snapshot_every: int = 2000, extra: tuple[str, ...] = ()):
        self.root = root
        ports = free_ports(len(NAMES))
        self.addrs = {n: f"127.0.0.1:{p}" for n, p in zip(NAMES, ports)}
        self.peers = ",".join(f"{n}={a}" for n, a in self.addrs.items())
        self.snapshot_every = snapshot_every
        self.extra = extra
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        self._logs: list[Any] = []

    def command(self, name: str) -> list[str]:
        return [*KVNODE, "serve", "--id", name, "--listen", self.addrs[name],
                "--peers", self.peers, "--data-dir", os.path.join(self.root, name),
                "--bootstrap", "--snapshot-every", str(self.snapshot_every), *self.extra]

    async def start(self, name: str) -> None:
        log = open(os.path.join(self.root, f"{name}.log"), "ab")  # noqa: SIM115
        self._logs.append(log)
        self.procs[name] = await asyncio.create_subprocess_exec(
            *self.command(name), stdout=log, stderr=log, stdin=asyncio.subprocess.DEVNULL)

    def kill(self, name: str) -> None:
        self.procs[name].send_signal(signal.SIGKILL)

    async def stop_all(self, timeout: float = 15.0) -> dict[str, int | None]:
        codes: dict[str, int | None] = {}
        for p in self.procs.values():
            if p.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)
        for name, p in self.procs.items():
            try:
                codes[name] = await asyncio.wait_for(p.wait(), timeout)
            except TimeoutError:
                p.kill()
                codes[name] = await p.wait()
        for log in self._logs:
            log.close()
        return codes

    async def statuses(self, client: KVClient) -> dict[str, pb.StatusResponse]:
        async def one(name: str) -> tuple[str, pb.StatusResponse | None]:
            try:
                return name, await client.status(self.addrs[name])
            except KVError:
                return name, None

        results = await asyncio.gather(*(one(n) for n in self.addrs))
        return {n: st for n, st in results if st is not None}

    async def wait_leader(self, client: KVClient, timeout: float = 30.0,
                          exclude: str = "") -> tuple[str, pb.StatusResponse]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            sts = await self.statuses(client)
            leaders = [(n, s) for n, s in sts.items() if s.state == "leader" and n != exclude]
            if len(leaders) == 1:
                return leaders[0]
            await asyncio.sleep(POLL)
        raise TimeoutError("no leader elected in time")


async def retry_kv(call: Callable[[], Awaitable[T]], timeout: float = 30.0) -> T:
    """``call()`` again after a KVError (a busy node, a lost answer) until ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await call()
        except KVError:
            if time.monotonic() > deadline:
                raise
        await asyncio.sleep(POLL)


class Load:
    """Writer tasks that track every acknowledged write; a lease reader."""

    def __init__(self, cluster: Cluster, clients: int) -> None:
        self.cluster = cluster
        self.n = clients
        self.leader_addr = next(iter(cluster.addrs.values()))
        self.acked: dict[str, bytes] = {}
        self.unknown = 0
        self.rejected = 0
        self.reads = 0
        self.stop = asyncio.Event()
        self.first_ack = asyncio.Event()  # set by the first acknowledged write
        self._seq = 0

    def _next_addr(self, bad: str) -> None:
        addrs = list(self.cluster.addrs.values())
        if self.leader_addr == bad:
            self.leader_addr = addrs[(addrs.index(bad) + 1) % len(addrs)]

    async def writer(self, wid: int) -> None:
        rnd = random.Random(wid)
        client = KVClient(self.leader_addr, timeout=3.0)
        try:
            while not self.stop.is_set():
                self._seq += 1
                key = f"w{wid:02d}-{self._seq:07d}"
                value = rnd.randbytes(VALUE_BYTES)
                while not self.stop.is_set():
                    addr = self.leader_addr
                    try:
                        await client.call_at(addr, "/trio_raft.kv.v1.KV/Put",
                                             pb.PutRequest(key=key, value=value),
                                             pb.PutResponse)
                    except KVError as exc:
                        if exc.status is Status.FAILED_PRECONDITION:
                            self.rejected += 1  # certainly not applied: retry the same key
                            if exc.leader_address:
                                self.leader_addr = exc.leader_address
                            else:
                                self._next_addr(addr)
                                await asyncio.sleep(POLL)
                            continue
                        self.unknown += 1  # outcome unknown: never reuse this key
                        self._next_addr(addr)
                        await asyncio.sleep(POLL)
                        break
                    self.acked[key] = value
                    self.first_ack.set()
                    break
        finally:
            client.close()

    async def reader(self) -> None:
        client = KVClient(self.leader_addr, timeout=3.0)
        try:
            await self.first_ack.wait()  # something to read back
            while not self.stop.is_set():
                key = random.choice(list(self.acked)[-200:])
                with contextlib.suppress(KVError):
                    await client.call_at(self.leader_addr, "/trio_raft.kv.v1.KV/Get",
                                         pb.GetRequest(key=key, mode=pb.ReadMode.LEASE),
                                         pb.GetResponse)
                    self.reads += 1
        finally:
            client.close()


async def verify(addr: str, acked: dict[str, bytes], concurrency: int = 128) -> list[str]:
    """Keys whose linearizable read differs from the acknowledged value. Reads run
    ``concurrency`` at a time (the engine confirms them in shared ReadIndex rounds); a progress
    line is printed every second."""
    bad: list[str] = []
    items = list(acked.items())
    client = KVClient(addr, timeout=10.0)
    done = 0

    async def worker(chunk: list[tuple[str, bytes]]) -> None:
        nonlocal done
        for key, value in chunk:
            r = await client.get(key)
            done += 1
            if not r.found or r.value != value:
                bad.append(key)

    async def report() -> None:
        t0, last = time.monotonic(), 0
        while True:
            await asyncio.sleep(1.0)
            say(f"   read back {done:6d}/{len(items)}  {done - last:6d} reads/s  "
                f"mismatches={len(bad)}  ({time.monotonic() - t0:.0f}s)")
            last = done

    reporter = asyncio.create_task(report())
    try:
        await asyncio.gather(*(worker(items[i::concurrency]) for i in range(concurrency)))
    finally:
        reporter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reporter
        client.close()
    return bad


def say(text: str) -> None:
    print(text, flush=True)


async def run_demo(args: argparse.Namespace, root: str) -> dict[str, Any]:
    cluster = Cluster(root)
    client = KVClient(cluster.addrs["n1"], timeout=2.0)
    load = Load(cluster, args.clients)
    tasks: list[asyncio.Task[None]] = []
    summary: dict[str, Any] = {"ok": False}
    try:
        say(f"== starting 3 nodes: {cluster.peers}")
        for name in NAMES:
            await cluster.start(name)
        t0 = time.monotonic()
        leader, st = await cluster.wait_leader(client)
        say(f"== leader {leader} elected in term {st.term} "
            f"({time.monotonic() - t0:.1f}s after start)")
        load.leader_addr = cluster.addrs[leader]
        tasks = [asyncio.create_task(load.writer(i)) for i in range(args.clients)]
        tasks.append(asyncio.create_task(load.reader()))
        phase = max(1.0, args.duration / 2)
        say(f"== {args.clients} clients writing 100-byte values for {phase:.0f}s")
        await progress(cluster, client, load, phase)
        before_kill = len(load.acked)

        leader, st = await cluster.wait_leader(client)
        say(f"== SIGKILL leader {leader} (term {st.term}, {before_kill} writes acknowledged)")
        cluster.kill(leader)
        killed = leader
        t_kill = time.monotonic()
        new_leader, nst = await cluster.wait_leader(client, exclude=leader)
        failover = time.monotonic() - t_kill
        say(f"== {new_leader} elected leader in term {nst.term}, {failover * 1000:.0f} ms "
            "after the kill")
        await progress(cluster, client, load, max(1.0, phase / 2))

        say(f"== restarting {leader} with its original command line")
        await cluster.start(leader)
        t_restart = time.monotonic()
        target = (await cluster.wait_leader(client))[1].commit_index
        caught_up = None
        while time.monotonic() - t_restart < 60:
            with contextlib.suppress(KVError):
                s = await client.status(cluster.addrs[leader])
                if s.applied_index >= target:
                    caught_up = time.monotonic() - t_restart
                    break
            await asyncio.sleep(POLL)
        if caught_up is None:
            raise TimeoutError(f"{leader} did not catch up")
        say(f"== {leader} caught up to index {target} in {caught_up:.2f}s")
        await progress(cluster, client, load, max(1.0, phase / 2))
        load.stop.set()
        await asyncio.gather(*tasks)
        tasks = []

        leader, _ = await cluster.wait_leader(client)
        say(f"== reading all {len(load.acked)} acknowledged writes back from leader {leader}")
        t_read = time.monotonic()
        bad = await verify(cluster.addrs[leader], load.acked)
        read_s = time.monotonic() - t_read
        say(f"== read back {len(load.acked)} writes in {read_s:.1f}s "
            f"({len(load.acked) / max(read_s, 1e-9):.0f} linearizable reads/s)")
        sample = next(iter(load.acked))
        local = await retry_kv(lambda: client.call_at(
            cluster.addrs[killed], "/trio_raft.kv.v1.KV/Get",
            pb.GetRequest(key=sample, mode=pb.ReadMode.LOCAL), pb.GetResponse))
        restarted_has_data = local.found and local.value == load.acked[sample]
        summary = {
            "acknowledged_writes": len(load.acked), "lost_or_wrong": len(bad),
            "unknown_outcome_writes": load.unknown, "redirected_or_rejected": load.rejected,
            "lease_reads": load.reads, "failover_ms": round(failover * 1000),
            "catch_up_s": round(caught_up, 2), "read_back_s": round(read_s, 1),
            "write_ops_per_s": round(len(load.acked) / max(args.duration, 1e-9), 1),
            "restarted_node_has_data": restarted_has_data,
        }
    finally:
        load.stop.set()
        for t in tasks:
            t.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.gather(*tasks, return_exceptions=True)
        client.close()
        say("== stopping the cluster (SIGTERM)")
        codes = await cluster.stop_all()
        summary["exit_codes"] = codes
    summary["ok"] = (summary.get("lost_or_wrong") == 0 and summary.get("acknowledged_writes", 0) > 0
                     and all(c == 0 for c in codes.values()))
    return summary


async def progress(cluster: Cluster, client: KVClient, load: Load, seconds: float) -> None:
    end = time.monotonic() + seconds
    last_n, last_t = len(load.acked), time.monotonic()
    while time.monotonic() < end:
        await asyncio.sleep(min(1.0, max(0.0, end - time.monotonic())))
        sts = await cluster.statuses(client)
        now, n = time.monotonic(), len(load.acked)
        rate = (n - last_n) / max(now - last_t, 1e-9)
        last_n, last_t = n, now
        leader = next((k for k, s in sts.items() if s.state == "leader"), "-")
        terms = ",".join(f"{k}:{s.term}" for k, s in sorted(sts.items()))
        applied = ",".join(f"{k}:{s.applied_index}" for k, s in sorted(sts.items()))
        say(f"   {rate:7.0f} writes/s  acked={n:6d}  leader={leader}  terms={terms}  "
            f"applied={applied}")


def demo_main(args: argparse.Namespace) -> int:
    root = tempfile.mkdtemp(prefix="kvnode-demo-")
    try:
        summary = asyncio.run(run_demo(args, root))
    except (TimeoutError, KVError) as exc:
        print(f"demo failed: {exc}; logs in {root}", file=sys.stderr)
        return ExitCode.FAILED
    say("== summary")
    for k, v in summary.items():
        say(f"   {k:24s} {v}")
    say("SUMMARY " + json.dumps(summary))
    if summary["ok"] and not args.keep_dir:
        shutil.rmtree(root, ignore_errors=True)
    elif not summary["ok"]:
        print(f"logs and data dirs kept in {root}", file=sys.stderr)
    return ExitCode.OK if summary["ok"] else ExitCode.FAILED
