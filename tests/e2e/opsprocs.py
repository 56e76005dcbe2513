"""Helpers for the operations runbook tests: kvnode clusters of real processes on loopback,
a background writer that records what was acknowledged, and reads through the KV client.

Nodes are started with ``examples/kvnode.py serve`` (fsync on) and are ready when they print
their ``ready`` line; every wait polls a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

from tests.e2e.kvprocs import KVNODE, ROOT, Node, poll, read_event, status
from trio_raft.testing.net import free_loopback_ports
from trio_raft_kv._proto.trio_raft.kv import v1 as pb
from trio_raft_kv.client import KVClient, KVError

N3 = ["n1", "n2", "n3"]

#: Elections in about half a second, so a failover costs little test time.
TIMING = ("--tick-interval", "0.01", "--heartbeat-tick", "3", "--election-tick", "40")


def kvnode(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, KVNODE, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, stdin=subprocess.DEVNULL)


def kvnode_json(*args: str, timeout: float = 60) -> dict[str, Any]:
    r = kvnode(*args, "--json", timeout=timeout)
    assert r.returncode == 0, (args, r.returncode, r.stderr)
    out: dict[str, Any] = json.loads(r.stdout)
    return out


class Procs:
    """Named kvnode processes under ``root`` (``root/<name>`` data dirs, ``root/<name>.log``)."""

    def __init__(self, root: str, names: list[str], *, store: str = "memory",
                 snapshot_every: int = 100) -> None:
        self.root = root
        self.store = store
        self.snapshot_every = snapshot_every
        self.addrs: dict[str, str] = {}
        self.nodes: dict[str, Node] = {}
        self.add_addresses(names)

    def add_addresses(self, names: list[str]) -> None:
        for name, port in zip(names, free_loopback_ports(len(names))):
            self.addrs[name] = f"127.0.0.1:{port}"

    def peers(self, names: list[str]) -> str:
        return ",".join(f"{n}={self.addrs[n]}" for n in names)

    def data_dir(self, name: str) -> str:
        return os.path.join(self.root, name)

    def serve(self, name: str, peers: list[str], *extra: str, data_dir: str | None = None
              ) -> Node:
        cmd = [sys.executable, KVNODE, "serve", "--id", name, "--listen", self.addrs[name],
               "--peers", self.peers(peers), "--data-dir", data_dir or self.data_dir(name),
               "--snapshot-every", str(self.snapshot_every), "--store", self.store,
               "--log-level", "info", *TIMING, *extra]
        log_path = os.path.join(self.root, f"{name}.log")
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True,
                                    stdin=subprocess.DEVNULL, cwd=ROOT)
        node = Node(self.addrs[name], proc, log_path)
        self.nodes[name] = node
        node.ready = read_event(node, "ready", 60)
        return node

    def kill(self, name: str) -> None:
        node = self.nodes.pop(name)
        node.proc.send_signal(signal.SIGKILL)
        node.proc.wait()
        if node.proc.stdout is not None:
            node.proc.stdout.close()

    def stop(self, name: str) -> int:
        return self.nodes.pop(name).stop()

    def stop_all(self) -> None:
        for name in list(self.nodes):
            self.stop(name)

    def leader(self, among: list[str] | None = None) -> str:
        names = among or list(self.nodes)

        def find() -> str | None:
            for n in names:
                st = status(self.addrs[n])
                if st is not None and st.state == "leader" and st.applied_index > 0:
                    return n
            return None

        found: str = poll(find, 60, f"a leader among {names}")
        return found

    def applied(self, name: str) -> int:
        st = status(self.addrs[name])
        return st.applied_index if st is not None else -1

    def caught_up(self, names: list[str], leader: str) -> bool:
        """Whether every node of ``names`` applied what ``leader`` has applied."""
        target = self.applied(leader)
        return all(self.applied(n) >= target for n in names)

    def log(self, name: str) -> str:
        with open(os.path.join(self.root, f"{name}.log"), errors="replace") as f:
            return f.read()


def run_client(address: str, fn: Callable[[KVClient], Any], timeout: float = 10) -> Any:
    async def main() -> Any:
        client = KVClient(address, timeout=timeout)
        try:
            return await fn(client)
        finally:
            client.close()

    return asyncio.run(main())


def read_all(address: str, keys: list[str], mode: pb.ReadMode = pb.ReadMode.LINEARIZABLE
             ) -> dict[str, bytes | None]:
    async def go(c: KVClient) -> dict[str, bytes | None]:
        out: dict[str, bytes | None] = {}
        for k in keys:
            r = await c.get(k, mode, follow=mode is not pb.ReadMode.LOCAL)
            out[k] = r.value if r.found else None
        return out

    result: dict[str, bytes | None] = run_client(address, go)
    return result


def put_many(address: str, items: dict[str, bytes]) -> None:
    async def go(c: KVClient) -> None:
        for k, v in items.items():
            await c.put(k, v)

    run_client(address, go)


class Writer:
    """Writes ``w<i>`` keys to ``address`` (following the leader) in a thread until stopped,
    recording every acknowledged one."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.acked: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Writer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def count(self) -> int:
        with self._lock:
            return len(self.acked)

    def snapshot(self) -> dict[str, bytes]:
        with self._lock:
            return dict(self.acked)

    def _run(self) -> None:
        async def go(c: KVClient) -> None:
            i = 0
            while not self._stop.is_set():
                key, value = f"w{i:05d}", b"value-%d" % i
                try:
                    await c.put(key, value)
                except KVError:
                    await asyncio.sleep(0.05)  # a failover: the next key is retried elsewhere
                else:
                    with self._lock:
                        self.acked[key] = value
                i += 1

        run_client(self.address, go)
