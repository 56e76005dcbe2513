"""Helpers for end-to-end tests of the ``kvnode`` command: real processes on loopback.

A node is started with ``examples/kvnode.py serve`` (fsync on) and is ready when it prints its
``ready`` line; the tests read that line (with a deadline) instead of sleeping. Its status is
read with grpcio, so waiting for a leader costs no extra process per look.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import attrs
import grpc

from trio_raft.testing.net import free_loopback_ports
from trio_raft_kv._proto.trio_raft.kv import v1 as pb

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KVNODE = os.path.join(ROOT, "examples", "kvnode.py")
POLL = 0.05  # between two looks at another process's status: no event crosses processes
#: Fast elections for single-node clusters (0.1 s election timeout).
FAST = ("--tick-interval", "0.01", "--heartbeat-tick", "1", "--election-tick", "10")


def cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, KVNODE, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, stdin=subprocess.DEVNULL)


@attrs.define(eq=False)
class Node:
    address: str
    proc: subprocess.Popen[str]
    log_path: str
    ready: dict[str, Any] = attrs.field(factory=dict)

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
        finally:
            if self.proc.stdout is not None:
                self.proc.stdout.close()


def start_node(root: str, name: str, *extra: str, port: int | None = None) -> Node:
    """Start a single-node cluster ``name`` (bootstrapped) and wait for its ready line."""
    port = port or free_loopback_ports(1)[0]
    address = f"127.0.0.1:{port}"
    log_path = os.path.join(root, f"{name}.log")
    cmd = [sys.executable, KVNODE, "serve", "--id", name, "--listen", address,
           "--data-dir", os.path.join(root, name), "--bootstrap", *FAST, *extra]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True,
                                stdin=subprocess.DEVNULL, cwd=ROOT)
    node = Node(address, proc, log_path)
    node.ready = read_event(node, "ready", 30)
    return node


def read_event(node: Node, event: str, timeout: float) -> dict[str, Any]:
    """The next JSON line ``{"event": event, ...}`` the node prints on stdout."""
    assert node.proc.stdout is not None
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {event!r} line in {timeout}s; log:\n{node.log()}")
        readable, _, _ = select.select([node.proc.stdout], [], [], left)
        if not readable:
            continue
        line = node.proc.stdout.readline()
        if not line:
            raise AssertionError(f"the node exited ({node.proc.wait()}) before {event!r}; "
                                 f"log:\n{node.log()}")
        obj = json.loads(line)
        if obj.get("event") == event:
            return dict(obj)


def status(address: str) -> pb.StatusResponse | None:
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary("/trio_raft.kv.v1.KV/Status")
        try:
            raw = call(bytes(pb.StatusRequest()), timeout=2)
        except grpc.RpcError:
            return None
    return pb.StatusResponse.parse(raw)


def poll(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    """``cond()``'s first true value, looking every :data:`POLL` seconds: the state of another
    process (a real kvnode) sends no event here, so it is asked again. AssertionError naming
    ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(POLL)


def wait_leader(address: str, timeout: float = 30) -> pb.StatusResponse:
    def leading() -> pb.StatusResponse | None:
        st = status(address)
        return st if st is not None and st.state == "leader" and st.applied_index > 0 else None

    st: pb.StatusResponse = poll(leading, timeout, f"{address} to become leader")
    return st
