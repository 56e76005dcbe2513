"""End to end: drive examples/kvnode.py as a user would, one OS process per node.

Every wait polls a condition with a deadline; nothing sleeps for a fixed time to let things
happen. Nodes run on free loopback ports with fsync on.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

import trio_raft
from tests.e2e.kvprocs import poll
from trio_raft.testing.net import free_loopback_ports

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KVNODE = os.path.join(ROOT, "examples", "kvnode.py")
NAMES = ("n1", "n2", "n3")

pytestmark = pytest.mark.slow


def free_ports(n: int) -> list[int]:
    return free_loopback_ports(n)


def cli(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, KVNODE, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def cli_json(*args: str) -> tuple[int, dict[str, Any]]:
    r = cli(*args, "--json")
    return r.returncode, (json.loads(r.stdout) if r.stdout.strip() else {"stderr": r.stderr})


class Cluster:
    def __init__(self, root: str) -> None:
        self.root = root
        ports = free_ports(6)
        self.addrs = {n: f"127.0.0.1:{p}" for n, p in zip(NAMES, ports[:3])}
        self.metrics = {n: f"127.0.0.1:{p}" for n, p in zip(NAMES, ports[3:])}
        self.peers = ",".join(f"{n}={a}" for n, a in self.addrs.items())
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def command(self, name: str) -> list[str]:
        return [sys.executable, KVNODE, "serve", "--id", name, "--listen", self.addrs[name],
                "--peers", self.peers, "--data-dir", os.path.join(self.root, name),
                "--bootstrap", "--snapshot-every", "200",
                "--metrics-listen", self.metrics[name],
                "--tick-interval", "0.01", "--heartbeat-tick", "10", "--election-tick", "100"]

    def start(self, name: str) -> None:
        log = open(os.path.join(self.root, f"{name}.log"), "ab")  # noqa: SIM115
        self.procs[name] = subprocess.Popen(self.command(name), stdout=log, stderr=log,
                                            stdin=subprocess.DEVNULL, cwd=ROOT)
        log.close()

    def status(self, name: str) -> dict[str, Any] | None:
        code, st = cli_json("status", "--addr", self.addrs[name], "--timeout", "2")
        return st if code == 0 else None

    def leader(self, exclude: str = "") -> str | None:
        """The node that says it leads in the highest term (a deposed one may not know yet)."""
        best: tuple[int, str] | None = None
        for n in self.addrs:
            if n == exclude or (n in self.procs and self.procs[n].poll() is not None):
                continue
            st = self.status(n)
            if st and st["state"] == "leader" and (best is None or st["term"] > best[0]):
                best = (st["term"], n)
        return best[1] if best else None

    def stop_all(self) -> dict[str, int]:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        codes = {}
        for n, p in self.procs.items():
            try:
                codes[n] = p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                codes[n] = p.wait()
        return codes

    def scrape(self, name: str) -> dict[str, float]:
        """The node's Prometheus exposition as {sample with labels: value}."""
        with urllib.request.urlopen(f"http://{self.metrics[name]}/metrics", timeout=5) as r:
            text = r.read().decode()
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, value = line.rsplit(" ", 1)
                samples[key] = float(value)
        return samples

    def log(self, name: str) -> str:
        with open(os.path.join(self.root, f"{name}.log"), errors="replace") as f:
            return f.read()


@pytest.fixture
def cluster(tmp_path: Any) -> Iterator[Cluster]:
    c = Cluster(str(tmp_path))
    try:
        yield c
    finally:
        for p in c.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()


def test_three_nodes_redirect_failover_restart_and_wiped_node(cluster: Cluster) -> None:
    for n in NAMES:
        cluster.start(n)
    leader = poll(cluster.leader, 30, "a leader")
    follower = next(n for n in NAMES if n != leader)
    faddr = cluster.addrs[follower]

    # Writes and linearizable reads sent to a follower follow `leader-address` once.
    code, out = cli_json("put", "greeting", "hello", "--addr", faddr)
    assert code == 0 and out["index"] > 0, out
    code, out = cli_json("get", "greeting", "--addr", faddr)
    assert (code, out["found"], out["value"]) == (0, True, "hello")
    # Bytes-safe values (given as hex), CAS and delete.
    assert cli("put", "bin", "00ff0a80", "--hex", "--addr", faddr).returncode == 0
    code, out = cli_json("get", "bin", "--hex", "--addr", faddr)
    assert out["value"] == "00ff0a80"
    code, out = cli_json("cas", "greeting", "bye", "--expected", "nope", "--addr", faddr)
    assert (code, out["swapped"], out["current"]) == (1, False, "hello")
    code, out = cli_json("cas", "greeting", "bye", "--expected", "hello", "--addr", faddr)
    assert (code, out["swapped"]) == (0, True)
    code, out = cli_json("delete", "bin", "--addr", faddr)
    assert (code, out["deleted"]) == (0, True)
    code, out = cli_json("get", "bin", "--addr", faddr, "--mode", "lease")
    assert (code, out["found"]) == (1, False)
    # Bad request: INVALID_ARGUMENT, a short message, no traceback.
    bad = cli("put", "", "x", "--addr", faddr)
    assert bad.returncode == 3 and "INVALID_ARGUMENT" in bad.stderr
    assert "Traceback" not in bad.stderr

    # Acknowledged writes (enough to cross --snapshot-every 200 a couple of times).
    acked = {}
    for i in range(25):
        code, out = cli_json("put", f"k{i:03d}", f"v{i}", "--addr", faddr)
        assert code == 0, out
        acked[f"k{i:03d}"] = f"v{i}"
    acked["greeting"] = "bye"
    # Enough entries for periodic snapshots, in one client process.
    fill = subprocess.run(
        [sys.executable, "-c", _FILL, cluster.addrs[leader], "450"], capture_output=True,
        text=True, timeout=60, cwd=ROOT)
    assert fill.returncode == 0, fill.stderr
    acked.update(json.loads(fill.stdout))
    # PutStream: many writes in flight over one call, answered in order; the first failure
    # ends the call with a status that speaks for the unanswered writes.
    streamed = subprocess.run(
        [sys.executable, "-c", _STREAM, cluster.addrs[leader], faddr], capture_output=True,
        text=True, timeout=60, cwd=ROOT)
    assert streamed.returncode == 0, streamed.stderr
    st = json.loads(streamed.stdout)
    assert st["ok"] == 200 and st["in_order"], st
    assert st["bad"] == {"answered": 10, "bad": "INVALID_ARGUMENT", "later": "INVALID_ARGUMENT",
                         "later_found": False}, st
    assert st["follower"] == ["FAILED_PRECONDITION", cluster.addrs[leader]], st
    acked.update({f"s{i:03d}": f"y{i}" for i in range(200)})

    # The leader's metrics: raft state, proposals and their latency, WAL syncs, snapshots.
    # (Engine gauges are refreshed every 0.5 s, so wait for them to catch up.)
    def caught_up() -> dict[str, float] | None:
        s = cluster.scrape(leader)
        applied = s.get(f'trio_raft_applied_index{{node="{leader}"}}', 0)
        return s if applied >= 450 else None

    m = poll(caught_up, 30, "the leader's metrics to show the writes")
    lbl = f'node="{leader}"'
    assert m[f"trio_raft_is_leader{{{lbl}}}"] == 1
    assert m[f"trio_raft_term{{{lbl}}}"] >= 1
    # --snapshot-every 200
    assert m[f'trio_raft_snapshots_total{{event="written",{lbl}}}'] >= 1
    assert m[f"trio_raft_commit_index{{{lbl}}}"] >= m[f"trio_raft_applied_index{{{lbl}}}"]
    assert m[f'kvnode_proposals_total{{{lbl},outcome="ok"}}'] >= 450
    assert m[f"trio_raft_proposal_seconds_count{{{lbl}}}"] >= 450
    assert m[f"trio_raft_wal_sync_seconds_count{{{lbl}}}"] >= 1
    assert f"trio_raft_dispatch_drops_total{{{lbl}}}" in m
    assert m[f"kvnode_kv_keys{{{lbl}}}"] >= 200
    assert any(k.startswith("trio_raft_peer_lag_entries{") for k in m)
    assert any(k.startswith("trio_raft_state{") for k in m)
    # The process's collector, as kvnode serve tunes it by default (docs/operations.md).
    assert m['trio_raft_gc_threshold{generation="0"}'] == trio_raft.GC_THRESHOLD
    assert m['trio_raft_gc_collections_total{generation="0"}'] >= 1
    assert 'trio_raft_gc_seconds_total{generation="2"}' in m

    # kill -9 the leader; a new one is elected; every acknowledged key is still there.
    cluster.procs[leader].send_signal(signal.SIGKILL)
    cluster.procs[leader].wait()
    new_leader = poll(lambda: cluster.leader(exclude=leader), 30, "a new leader")
    assert new_leader != leader
    naddr = cluster.addrs[new_leader]
    check = subprocess.run([sys.executable, "-c", _CHECK, naddr], input=json.dumps(acked),
                           capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert check.returncode == 0, check.stdout + check.stderr
    assert json.loads(check.stdout) == {"missing_or_wrong": []}
    code, out = cli_json("put", "after-failover", "yes", "--addr", naddr)
    assert code == 0
    commit = out["index"]

    # Restart the killed node with the same command line: it resumes and catches up.
    cluster.start(leader)
    old = cluster.addrs[leader]
    poll(lambda: (cluster.status(leader) or {}).get("applied_index", 0) >= commit, 30,
         "the restarted node to catch up")
    code, out = cli_json("get", "after-failover", "--mode", "local", "--addr", old)
    assert (code, out["value"]) == (0, "yes")
    code, out = cli_json("get", "k000", "--mode", "local", "--addr", old)
    assert (code, out["value"]) == (0, "v0")

    # Graceful stop: every node exits 0 on SIGTERM.
    victim = next(n for n in NAMES if n not in (leader, new_leader))
    cluster.procs[victim].send_signal(signal.SIGTERM)
    assert cluster.procs[victim].wait(timeout=15) == 0
    # A wiped data dir is not silently re-bootstrapped: the node refuses to start (exit 2).
    shutil.rmtree(os.path.join(cluster.root, victim))
    cluster.start(victim)
    assert cluster.procs[victim].wait(timeout=30) == 2
    assert "join-as-learner" in cluster.log(victim)
    codes = cluster.stop_all()
    assert codes[leader] == 0 and codes[new_leader] == 0, codes


_FILL = r"""
import asyncio, json, sys
from trio_raft_kv.client import KVClient

async def main(addr, n):
    out = {}
    async with KVClient(addr) as c:
        async def w(i):
            for j in range(i, n, 16):
                await c.put(f"f{j:04d}", f"x{j}".encode())
                out[f"f{j:04d}"] = f"x{j}"
        await asyncio.gather(*(w(i) for i in range(16)))
    print(json.dumps(out))

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""

_STREAM = r"""
import asyncio, json, sys
from trio_raft_kv.client import KVClient, KVError

async def main(addr, follower):
    out = {}
    async with KVClient(addr) as c:
        async with c.put_pipeline() as p:
            rs = await asyncio.gather(*(p.put(f"s{i:03d}", f"y{i}".encode())
                                        for i in range(200)))
        idx = [r.index for r in rs]
        out["ok"] = len(rs)
        out["in_order"] = idx == sorted(idx) and len(set(idx)) == 200
        async with c.put_pipeline() as p:
            calls = [p.put(f"b{i}", b"v") for i in range(10)]
            calls += [p.put("", b"v"), p.put("after-bad", b"v")]
            got = await asyncio.gather(*calls, return_exceptions=True)
        out["bad"] = {
            "answered": sum(1 for g in got if not isinstance(g, BaseException)),
            "bad": got[10].status.name if isinstance(got[10], KVError) else repr(got[10]),
            "later": got[11].status.name if isinstance(got[11], KVError) else repr(got[11]),
            "later_found": (await c.get("after-bad")).found,
        }
        try:
            async with c.put_pipeline(follower) as p:
                await p.put("never", b"v")
            out["follower"] = "answered"
        except KVError as exc:
            out["follower"] = [exc.status.name, exc.leader_address]
    print(json.dumps(out))

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""

_CHECK = r"""
import asyncio, json, sys
from trio_raft_kv.client import KVClient

async def main(addr):
    want = json.loads(sys.stdin.read())
    bad = []
    async with KVClient(addr) as c:
        items = list(want.items())
        async def w(chunk):
            for k, v in chunk:
                r = await c.get(k)
                if not r.found or r.value != v.encode():
                    bad.append(k)
        await asyncio.gather(*(w(items[i::16]) for i in range(16)))
    print(json.dumps({"missing_or_wrong": sorted(bad)}))

asyncio.run(main(sys.argv[1]))
"""


def test_demo_runs_a_failover_and_prints_a_summary() -> None:
    r = cli("demo", "--duration", "4", "--clients", "8", timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    line = next(x for x in r.stdout.splitlines() if x.startswith("SUMMARY "))
    summary = json.loads(line[len("SUMMARY "):])
    assert summary["ok"] is True
    assert summary["acknowledged_writes"] > 0
    assert summary["lost_or_wrong"] == 0
    assert summary["restarted_node_has_data"] is True
    assert set(summary["exit_codes"].values()) == {0}
    assert "elected leader in term" in r.stdout
