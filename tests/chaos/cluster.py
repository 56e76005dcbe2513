"""kvnode processes on loopback, every peer link routed through the chaos proxy.

Each node listens on its own free port (clients talk to it there, directly). Its ``--peers``
entry for itself is that address; its entry for every other node ``x`` is the proxy port of the
directed link ``node -> x``. kvnode pins those entries (they win over the addresses carried by
membership changes), so every raft message between two nodes crosses the proxy, including
after a node was removed and added back.

Clients use trio_raft_kv's asyncio ``KVClient`` through trio_raft's ``AsyncioBridge`` (one
asyncio loop thread owned by the harness). Nothing here sleeps to let something happen: waits
poll a condition with a generous deadline.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import attrs
import trio
from grpclib.const import Status

from tests.chaos.proxy import Proxy
from trio_raft.transport.bridge import AsyncioBridge
from trio_raft_kv.client import KVClient, KVError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KVNODE = os.path.join(ROOT, "examples", "kvnode.py")

T = TypeVar("T")

POLL = 0.05  # polling interval, not a wait for a state
RPC_TIMEOUT = 2.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@attrs.define(eq=False)
class Node:
    name: str
    port: int
    data_dir: str
    log_path: str
    delay_file: str
    peers: str = ""
    joined: bool = False  # True once it was re-added as a learner (join mode from then on)
    proc: trio.Process | None = None
    paused: bool = False
    starts: int = 0
    store: str = "memory"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def command(self, tick: float, heartbeat: int, election: int,
                snapshot_every: int) -> list[str]:
        cmd = [sys.executable, KVNODE, "serve", "--id", self.name, "--listen", self.address,
               "--peers", self.peers, "--data-dir", self.data_dir,
               "--snapshot-every", str(snapshot_every), "--tick-interval", str(tick),
               "--heartbeat-tick", str(heartbeat), "--election-tick", str(election),
               "--test-fsync-delay-file", self.delay_file, "--log-level", "warning",
               "--store", self.store]
        cmd.append("--join-as-learner" if self.joined else "--bootstrap")
        return cmd


class ChaosError(AssertionError):
    """The harness could not reach a state it needs (a liveness failure), or a check failed."""


class Cluster:
    def __init__(self, root: str, names: list[str], proxy: Proxy, bridge: AsyncioBridge, *,
                 tick: float = 0.01, heartbeat: int = 5, election: int = 50,
                 snapshot_every: int = 300, store: str = "memory") -> None:
        self.root = root
        self.names = list(names)
        self.proxy = proxy
        self.bridge = bridge
        self.tick, self.heartbeat, self.election = tick, heartbeat, election
        self.snapshot_every = snapshot_every
        self.store = store
        self.nodes: dict[str, Node] = {}
        self.address_owner: dict[str, str] = {}  # any address a node is known by -> its name
        self.client = KVClient("127.0.0.1:1", timeout=RPC_TIMEOUT)  # call_at only
        self.events: list[str] = []

    # -- setup -----------------------------------------------------------------------------------
    async def setup(self) -> None:
        for name in self.names:
            d = os.path.join(self.root, name)
            node = Node(name, free_port(), os.path.join(d, "data"), os.path.join(d, "node.log"),
                        os.path.join(d, "fsync-delay"), store=self.store)
            os.makedirs(d, exist_ok=True)
            self.set_disk_delay_file(node, 0.0)
            self.nodes[name] = node
            self.address_owner[node.address] = name
        for a in self.names:
            parts = []
            for b in self.names:
                if a == b:
                    parts.append(f"{b}={self.nodes[b].address}")
                    continue
                port = await self.proxy.add_link(a, b, ("127.0.0.1", self.nodes[b].port))
                self.address_owner[f"127.0.0.1:{port}"] = b
                parts.append(f"{b}=127.0.0.1:{port}")
            self.nodes[a].peers = ",".join(parts)

    def set_disk_delay_file(self, node: Node, seconds: float) -> None:
        tmp = node.delay_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{seconds}\n")
        os.replace(tmp, node.delay_file)

    def log(self, text: str) -> None:
        line = f"{time.monotonic():.3f} {text}"
        self.events.append(line)
        with open(os.path.join(self.root, "events.live.log"), "a") as f:
            f.write(line + "\n")

    # -- processes -------------------------------------------------------------------------------
    async def start(self, name: str) -> None:
        node = self.nodes[name]
        if node.alive():
            return
        await self.reap(name)
        cmd = node.command(self.tick, self.heartbeat, self.election, self.snapshot_every)
        with open(node.log_path, "ab") as log:
            log.write(f"=== start {node.starts} {' '.join(cmd)}\n".encode())
            log.flush()
            node.proc = await trio.lowlevel.open_process(
                cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd=ROOT)
        node.starts += 1
        node.paused = False
        self.log(f"start {name}")

    async def reap(self, name: str) -> int | None:
        node = self.nodes[name]
        if node.proc is None:
            return None
        if node.paused and node.proc.poll() is None:
            node.proc.send_signal(signal.SIGCONT)
            node.paused = False
        code = node.proc.poll()
        if code is None:
            return None
        node.proc = None
        return code

    async def kill(self, name: str) -> None:
        node = self.nodes[name]
        if node.proc is not None and node.proc.poll() is None:
            node.proc.send_signal(signal.SIGKILL)
            await node.proc.wait()
        node.paused = False
        await self.reap(name)
        self.log(f"kill -9 {name}")

    async def terminate(self, name: str, timeout: float = 20.0) -> int | None:
        node = self.nodes[name]
        if node.proc is None:
            return None
        proc = node.proc
        if proc.poll() is None:
            if node.paused:
                proc.send_signal(signal.SIGCONT)
                node.paused = False
            proc.send_signal(signal.SIGTERM)
            with trio.move_on_after(timeout):
                await proc.wait()
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                await proc.wait()
        code = proc.returncode
        node.proc = None
        return code

    def pause(self, name: str) -> None:
        node = self.nodes[name]
        if node.alive() and not node.paused:
            assert node.proc is not None
            node.proc.send_signal(signal.SIGSTOP)
            node.paused = True
            self.log(f"SIGSTOP {name}")

    def resume(self, name: str) -> None:
        node = self.nodes[name]
        if node.paused and node.proc is not None:
            if node.proc.poll() is None:
                node.proc.send_signal(signal.SIGCONT)
            node.paused = False
            self.log(f"SIGCONT {name}")

    def wipe(self, name: str) -> None:
        shutil.rmtree(self.nodes[name].data_dir, ignore_errors=True)

    async def aclose(self) -> None:
        for name in self.names:
            node = self.nodes[name]
            if node.proc is not None and node.proc.poll() is None:
                if node.paused:
                    node.proc.send_signal(signal.SIGCONT)
                node.proc.send_signal(signal.SIGKILL)
                await node.proc.wait()
            node.proc = None
        self.client.close()

    # -- RPCs ------------------------------------------------------------------------------------
    async def rpc(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        return await self.bridge.run(fn, *args)

    async def status(self, name: str, timeout: float = RPC_TIMEOUT) -> Any | None:
        node = self.nodes[name]
        if not node.alive() or node.paused:
            return None
        try:
            with trio.fail_after(timeout + 1):
                return await self.rpc(self.client.status, node.address)
        except (KVError, trio.TooSlowError):
            return None

    async def leader(self) -> str | None:
        """A node that says it is the leader (the highest term wins), or None."""
        best: tuple[int, str] | None = None
        for name in self.names:
            st = await self.status(name)
            if st is not None and st.state == "leader" and (best is None or st.term > best[0]):
                best = (st.term, name)
        return best[1] if best else None

    async def wait_for(self, what: str, cond: Callable[[], Awaitable[T | None]],
                       timeout: float) -> T:
        deadline = trio.current_time() + timeout
        while True:
            value = await cond()
            if value:
                return value
            if trio.current_time() > deadline:
                raise ChaosError(f"timed out after {timeout:.0f}s waiting for {what}")
            await trio.sleep(POLL)

    async def wait_leader(self, timeout: float = 60.0) -> str:
        return await self.wait_for("a leader", self.leader, timeout)

    async def admin(self, what: str, fn_name: str, *args: Any, timeout: float = 60.0,
                    retry_on: tuple[str, ...] = (), done_on: tuple[str, ...] = ()) -> Any:
        """An admin call at the current leader, retried (leaders change under faults) until it
        succeeds or ``timeout``. Errors whose message contains one of ``retry_on`` are retried
        too; one containing one of ``done_on`` means an earlier try whose answer was lost took
        effect (returns None); other non-UNAVAILABLE errors are raised."""
        deadline = trio.current_time() + timeout
        last: Exception | None = None
        while trio.current_time() < deadline:
            leader = await self.leader()
            if leader is not None:
                c = KVClient(self.nodes[leader].address, timeout=10)
                try:
                    with trio.fail_after(15):
                        return await self.rpc(getattr(c, fn_name), *args)
                except KVError as exc:
                    last = exc
                    if any(d in exc.message for d in done_on):
                        return None
                    retry = exc.status in (Status.UNAVAILABLE, Status.DEADLINE_EXCEEDED) or (
                        "not the leader" in exc.message or "NotLeader" in exc.message
                        or any(r in exc.message for r in retry_on))
                    if not retry:
                        raise
                except trio.TooSlowError as exc:
                    last = exc
                finally:
                    await self.rpc(_close_client, c)
            await trio.sleep(0.2)  # a retry interval
        raise ChaosError(f"{what}: no success within {timeout:.0f}s (last: {last!r})")

    async def members(self) -> dict[str, str]:
        """id -> suffrage, as the leader sees it."""
        r = await self.admin("members", "members", timeout=60)
        return {m.id: m.suffrage for m in r.members}


async def _close_client(c: KVClient) -> None:
    c.close()
