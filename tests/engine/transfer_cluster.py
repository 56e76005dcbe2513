"""A real cluster for the snapshot transfer tests: three voters and a learner, each an engine on
its own data directory and FaultyFileIO, over gRPC on loopback.

With ``kind="owned"`` every engine builds and serves its own GRPCTransport on its
``local_address``; with ``kind="app"`` the test builds each node's transport, serves it in its
own nursery and passes it in ``OpenConfig(transport=...)``, as examples/kvnode.py does, and the
transport outlives the engines that use it (a restarted node attaches to it again).

Timing: elections take ``ELECTION_TICK`` ticks of 10 ms (3 to 6 s). Applying the learner's
configuration change writes a snapshot of the whole state in the run loop; a short election
timeout would let a loaded machine's slow write look like a dead leader.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import trio

import trio_raft
from tests.engine.kv import KV
from trio_raft import State
from trio_raft.testing.faults import FaultyFileIO
from trio_raft.testing.net import free_loopback_ports
from trio_raft.transport.grpc import GRPCTransport

VOTERS = ("n1", "n2", "n3")
LEARNER = "n4"
ELECTION_TICK = 300
#: Deadline of every wait in these tests (seconds): generous for a loaded 2-core machine.
PATIENCE = 90.0


class ObservedTransport(GRPCTransport):
    """An application-owned transport that tells the test when an engine detaches from it."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.detaching = trio.Event()

    async def detach(self) -> None:
        self.detaching.set()  # before the transfers are cancelled, with no checkpoint between
        await super().detach()


@attrs.define(eq=False)
class Node:
    """One run of one node: a fresh state machine, seam and events for every (re)start."""

    name: str
    address: str
    data_dir: Path
    app_transport: ObservedTransport | None = None
    fsm: KV = attrs.field(factory=KV)
    io: FaultyFileIO = attrs.field(factory=FaultyFileIO)
    engine: trio_raft.Engine | None = None
    stop: trio.Event = attrs.field(factory=trio.Event)
    finished: trio.Event = attrs.field(factory=trio.Event)
    error: BaseException | None = None

    @property
    def running(self) -> trio_raft.Engine:
        assert self.engine is not None, f"{self.name} was not started"
        return self.engine

    @property
    def transport(self) -> GRPCTransport:
        """The node's transport (its engine's own, or the application's)."""
        if self.app_transport is not None:
            return self.app_transport
        t = self.running._loop.transport
        assert isinstance(t, GRPCTransport)
        return t

    @property
    def fsm_dir(self) -> Path:
        return self.data_dir / "fsm-snap"

    def restarted(self) -> Node:
        """The next run of this node: same identity, data directory and transport."""
        if self.app_transport is not None:
            self.app_transport.detaching = trio.Event()
        return Node(self.name, self.address, self.data_dir, self.app_transport)


async def _run(cfg: trio_raft.OpenConfig, node: Node, *,
               task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    try:
        async with trio_raft.open_engine(cfg) as engine:
            node.engine = engine
            task_status.started()
            await node.stop.wait()
    except Exception as exc:  # the engine's fatal error, raised when open_engine is left
        node.error = exc
    finally:
        node.finished.set()


async def until(predicate: Callable[[], bool], what: str) -> None:
    """Wait (polling, within PATIENCE) until ``predicate()`` holds."""
    with trio.move_on_after(PATIENCE):
        while not predicate():
            await trio.sleep(0.01)
        return
    raise AssertionError(f"gave up waiting for {what}")


@attrs.define(eq=False)
class Cluster:
    kind: str
    base: Path
    nursery: trio.Nursery
    peers: list[trio_raft.Peer]
    nodes: dict[str, Node] = attrs.field(factory=dict)
    #: Every run of every node (for releasing holds and stopping at the end).
    runs: list[Node] = attrs.field(factory=list)

    def node(self, name: str, address: str) -> Node:
        node = Node(name, address, self.base / name)
        self.nodes[name] = node
        return node

    async def start(self, node: Node, *, bootstrap: bool) -> None:
        if self.kind == "app" and node.app_transport is None:
            node.app_transport = ObservedTransport(local_address=node.address)
            await self.nursery.start(node.app_transport.serve)
        peers = self.peers if bootstrap else [*self.peers, trio_raft.Peer(node.name, node.address)]
        cfg = trio_raft.OpenConfig(
            local_id=node.name, local_address=node.address, data_dir=str(node.data_dir),
            peers=peers, bootstrap=bootstrap, state_machine=node.fsm,
            transport=node.app_transport, tick_interval=0.01, heartbeat_tick=10,
            election_tick=ELECTION_TICK, file_io=node.io)
        self.nodes[node.name] = node
        self.runs.append(node)
        await self.nursery.start(_run, cfg, node)

    async def leader(self) -> Node:
        """The one leader among the running voters."""
        found: list[Node] = []

        def one_leader() -> bool:
            found[:] = [n for n in self.nodes.values() if n.engine is not None
                        and not n.finished.is_set() and n.engine.state() is State.LEADER]
            return len(found) == 1

        await until(one_leader, "a leader")
        return found[0]

    async def stop_all(self) -> None:
        for run in self.runs:
            run.io.release_all()
            run.stop.set()
        with trio.fail_after(PATIENCE):
            for run in self.runs:
                await run.finished.wait()
        for node in self.nodes.values():
            if node.app_transport is not None:
                await node.app_transport.aclose()


@asynccontextmanager
async def running_cluster(base: Path, kind: str, values: list[str]) -> AsyncIterator[Cluster]:
    """Three voters holding ``values`` (one key each), a leader elected; the learner is left to
    the test (``cluster.node(LEARNER, address)``)."""
    ports = free_loopback_ports(len(VOTERS))
    peers = [trio_raft.Peer(n, f"127.0.0.1:{p}") for n, p in zip(VOTERS, ports, strict=True)]
    async with trio.open_nursery() as nursery:
        cluster = Cluster(kind, base, nursery, peers)
        try:
            for peer in peers:
                await cluster.start(cluster.node(peer.id, peer.address), bootstrap=True)
            leader = (await cluster.leader()).running
            async with trio.open_nursery() as writers:
                for i, value in enumerate(values):
                    writers.start_soon(leader.propose, f"set k{i} {value}".encode())
            yield cluster
        finally:
            with trio.CancelScope(shield=True):
                await cluster.stop_all()


def learner_address() -> str:
    """A free port for the learner, picked right before it is bound."""
    return f"127.0.0.1:{free_loopback_ports(1)[0]}"


def fsm_files(directory: Path) -> list[str]:
    if not directory.exists():
        return []
    return sorted(n for n in os.listdir(directory) if n.endswith(".fsm"))
