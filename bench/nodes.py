"""Three node processes of a benchmark script on loopback, for the scripts' orchestrators.

Each node is the calling script run as ``<script> node --name nX --peers ... --data-dir ...``
plus the script's own arguments; it prints JSON lines on stdout (``{"event": "leader"}`` once
it leads) and reads commands, a line each, on stdin. :class:`NodeProcesses` starts them, keeps
what each printed, and on exit stops them (politely, then by force) and removes their data.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import AsyncIterator
from typing import IO, Any

NAMES = ["n1", "n2", "n3"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_seconds(pids: list[int]) -> list[float]:
    """User + system CPU seconds of each process (Linux /proc), 0.0 where unreadable."""
    tick = os.sysconf("SC_CLK_TCK")
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out.append((int(fields[11]) + int(fields[12])) / tick)
        except (OSError, IndexError, ValueError):
            out.append(0.0)
    return out


def add_node_arguments(ap: argparse.ArgumentParser, *, concurrency: str) -> None:
    """The arguments of a script run either as the orchestrator (``run``) or as one of its
    nodes (``node``): the node's name, peers and data dir, where the data goes, and the
    workload (seconds per level, the levels of concurrency, the entry size)."""
    ap.add_argument("mode", nargs="?", default="run", choices=["run", "node"])
    ap.add_argument("--name")
    ap.add_argument("--peers")
    ap.add_argument("--data-dir")
    ap.add_argument("--dir", default=None, help="parent directory for the nodes' data")
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--concurrency", default=concurrency)
    ap.add_argument("--size", type=int, default=100)
    from trio_raft.gctune import GC_THRESHOLD

    ap.add_argument("--gc-threshold", type=int, default=GC_THRESHOLD,
                    help="each node's garbage collector young-generation threshold, set once "
                         "its engine is open (trio_raft.tune_gc, as kvnode serve does); 0: "
                         "the interpreter's settings")
    ap.add_argument("--grpclib-lanes", action="store_true",
                    help="the nodes keep their raft lanes on grpclib (GRPCTransport("
                         "native_lanes=False)), as before native lanes")


def node_arguments(args: argparse.Namespace) -> list[str]:
    """What the orchestrator passes on to its nodes of :func:`add_node_arguments`."""
    out = ["--duration", str(args.duration), "--concurrency", args.concurrency,
           "--size", str(args.size), "--gc-threshold", str(args.gc_threshold)]
    return [*out, "--grpclib-lanes"] if args.grpclib_lanes else out


def tune_node_gc(args: argparse.Namespace) -> None:
    """In a node, once its engine is open: the collector as ``--gc-threshold`` says."""
    if args.gc_threshold > 0:
        import trio_raft

        trio_raft.tune_gc(args.gc_threshold)


@contextlib.asynccontextmanager
async def node_transport(args: argparse.Namespace, address: str) -> AsyncIterator[Any]:
    """The transport a node gives ``OpenConfig.transport``: ``None`` (the engine builds and
    runs its own) or, with ``--grpclib-lanes``, one without native lanes that runs here."""
    if not args.grpclib_lanes:
        yield None
        return
    from trio_raft.transport import GRPCTransport

    async with GRPCTransport(local_address=address, native_lanes=False) as transport:
        yield transport


class NodeProcesses:
    def __init__(self, script: str, extra: list[str], *, prefix: str,
                 parent: str | None = None, grace: float = 0.0) -> None:
        """``grace``: seconds the nodes get to end on their own (after a ``quit`` command)
        before they are terminated."""
        from trio_raft.testing.net import free_loopback_ports

        ports = free_loopback_ports(len(NAMES))
        self.peers = ",".join(f"{n}=127.0.0.1:{p}" for n, p in zip(NAMES, ports))
        self.base = tempfile.mkdtemp(prefix=prefix, dir=parent)
        self.procs: dict[str, subprocess.Popen[str]] = {}
        self.outputs: dict[str, list[str]] = {n: [] for n in NAMES}
        self._leaders: list[str] = []
        self._lock = threading.Condition()
        self._script = os.path.abspath(script)
        self._extra = extra
        self._grace = grace

    def __enter__(self) -> NodeProcesses:
        try:
            for n in NAMES:
                self.procs[n] = subprocess.Popen(
                    [sys.executable, self._script, "node", "--name", n, "--peers", self.peers,
                     "--data-dir", os.path.join(self.base, n), *self._extra],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
                threading.Thread(target=self._read, args=(n, self.procs[n].stdout),
                                 daemon=True).start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                try:
                    p.wait(timeout=self._grace)
                except subprocess.TimeoutExpired:
                    p.terminate()
        for p in self.procs.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(self.base, ignore_errors=True)

    def _read(self, name: str, stream: IO[str]) -> None:
        for line in stream:
            with self._lock:
                self.outputs[name].append(line.rstrip("\n"))
                if '"event": "leader"' in line:
                    self._leaders.append(name)
                self._lock.notify_all()

    def leader(self, timeout: float = 60) -> str:
        """The first node that announced it leads."""
        with self._lock:
            if not self._lock.wait_for(lambda: self._leaders, timeout=timeout):
                raise SystemExit(f"no leader within {timeout:g} s")
            return self._leaders[0]

    def command(self, name: str, line: str) -> None:
        stdin = self.procs[name].stdin
        assert stdin is not None
        stdin.write(line + "\n")
        stdin.flush()

    def wait_for(self, name: str, marker: str, timeout: float) -> bool:
        """Whether ``name`` printed a line holding ``marker`` within ``timeout`` seconds."""
        with self._lock:
            return self._lock.wait_for(
                lambda: any(marker in x for x in self.outputs[name]), timeout=timeout)
