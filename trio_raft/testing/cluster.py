"""An in-process cluster of real engines over a MemoryNetwork, for tests.

Each node has its own data directory (real WAL, real fsync) and runs ``open_engine`` in a task of
the cluster's nursery. File I/O runs on the trio thread (``blocking_io=True``) so the cluster is
deterministic under ``trio.testing.MockClock(autojump_threshold=0)``.

    async with open_memory_cluster(tmp_path, 3, KV) as cluster:
        leader = await cluster.wait_for_leader()
        await leader.propose(b"...")
        await cluster.stop("n2"); await cluster.start("n2")   # crash / restart (files survive)
        cluster.partition(["n1"], ["n2", "n3"])
        cluster.heal()

(``tests/engine/test_cluster_basic.py`` runs this example.)
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

from trio_raft._groups import open_owning_nursery
from trio_raft.engine.config import OpenConfig, derive_node_id
from trio_raft.engine.engine import Engine
from trio_raft.engine.lifecycle import open_engine
from trio_raft.engine.types import Peer, State
from trio_raft.transport.base import TransportPeer
from trio_raft.transport.memory import MemoryNetwork


@attrs.define
class NodeHandle:
    name: str
    node_id: int
    address: str
    data_dir: str
    fsm: Any = None
    engine: Engine | None = None
    cancel: trio.CancelScope | None = None
    stopped: trio.Event = attrs.field(factory=trio.Event)
    error: BaseException | None = None


class MemoryCluster:
    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        names: list[str],
        make_fsm: Callable[[], Any],
        nursery: trio.Nursery,
        *,
        seed: int = 0,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.network = MemoryNetwork(seed=seed)
        self.make_fsm = make_fsm
        self.nursery = nursery
        self.seed = seed
        self.config = {
            "tick_interval": 0.01,
            "heartbeat_tick": 1,
            "election_tick": 10,
            "max_inflight_msg": 256,
            "blocking_io": True,
            **(config or {}),
        }
        self.nodes: dict[str, NodeHandle] = {}
        for name in names:
            self._add_handle(base_dir, name)
        self._base_dir = os.fspath(base_dir)

    def _add_handle(self, base_dir: str | os.PathLike[str], name: str) -> NodeHandle:
        h = NodeHandle(name, derive_node_id(name), f"mem-{name}:1",
                       os.path.join(os.fspath(base_dir), name))
        self.nodes[name] = h
        return h

    def peers(self, names: list[str] | None = None) -> list[Peer]:
        names = names if names is not None else list(self.nodes)
        return [Peer(n, self.nodes[n].address) for n in names]

    def engine(self, name: str) -> Engine:
        e = self.nodes[name].engine
        if e is None:
            raise LookupError(f"node {name} is not running")
        return e

    def running(self) -> list[NodeHandle]:
        return [h for h in self.nodes.values() if h.engine is not None]

    async def start(
        self,
        name: str,
        *,
        bootstrap: bool = True,
        peers: list[str] | None = None,
        fresh_fsm: bool = True,
        **overrides: Any,
    ) -> Engine:
        """Start (or restart) node ``name``; its data directory is kept across restarts."""
        h = self.nodes.get(name) or self._add_handle(self._base_dir, name)
        if h.engine is not None:
            raise RuntimeError(f"node {name} is already running")
        if fresh_fsm or h.fsm is None:
            h.fsm = self.make_fsm()
        peer_list = self.peers(peers)
        transport = self.network.transport(
            h.node_id, [TransportPeer(p.node_id or derive_node_id(p.id), p.id, p.address)
                        for p in peer_list if p.id != name]
        )
        cfg = OpenConfig(
            local_id=name,
            local_address=h.address,
            data_dir=h.data_dir,
            peers=peer_list,
            bootstrap=bootstrap,
            state_machine=h.fsm,
            transport=transport,
            rng_seed=self.seed * 1000 + h.node_id % 1000,
            **{**self.config, **overrides},
        )
        h.stopped = trio.Event()
        h.error = None
        await self.nursery.start(self._run_node, h, cfg, transport)
        assert h.engine is not None
        return h.engine

    async def _run_node(
        self, h: NodeHandle, cfg: OpenConfig, transport: Any, *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        started = False
        try:
            with trio.CancelScope() as scope:
                h.cancel = scope
                async with open_owning_nursery() as inner:
                    await inner.start(transport.serve)
                    async with open_engine(cfg) as engine:
                        h.engine = engine
                        started = True
                        task_status.started()
                        await engine.wait_closed()
                    inner.cancel_scope.cancel()
        except Exception as exc:  # recorded for the test to inspect
            h.error = exc
        finally:
            h.engine = None
            h.cancel = None
            await transport.aclose()
            h.stopped.set()
            if not started:
                task_status.started()

    async def stop(self, name: str) -> None:
        """Crash-stop a node (its tasks are cancelled; what it persisted stays on disk)."""
        h = self.nodes[name]
        if h.cancel is not None:
            h.cancel.cancel()
        await h.stopped.wait()

    async def close(self, name: str) -> None:
        """Cleanly close a node's engine."""
        h = self.nodes[name]
        if h.engine is not None:
            await h.engine.aclose()
        await h.stopped.wait()

    def wipe(self, name: str) -> None:
        shutil.rmtree(self.nodes[name].data_dir, ignore_errors=True)

    def ids(self, names: list[str]) -> list[int]:
        return [self.nodes[n].node_id for n in names]

    def partition(self, *groups: list[str]) -> None:
        """Cut every link between the named groups (both ways)."""
        self.network.partition(*(self.ids(g) for g in groups))

    def isolate(self, name: str) -> None:
        self.network.isolate(self.nodes[name].node_id)

    def heal(self) -> None:
        self.network.heal()

    def leaders(self) -> list[NodeHandle]:
        return [h for h in self.running() if h.engine and h.engine.state() is State.LEADER]

    async def wait_for_leader(self, timeout: float = 30.0, *, exclude: str | None = None
                              ) -> Engine:
        """Wait until exactly one running node (other than ``exclude``) is leader."""
        with trio.fail_after(timeout):
            while True:
                leaders = [h for h in self.leaders() if h.name != exclude]
                if len(leaders) == 1:
                    assert leaders[0].engine is not None
                    return leaders[0].engine
                await trio.sleep(0.01)

    def leader_name(self) -> str | None:
        leaders = self.leaders()
        return leaders[0].name if len(leaders) == 1 else None

    async def wait_applied(self, index: int, names: list[str] | None = None,
                           timeout: float = 30.0) -> None:
        with trio.fail_after(timeout):
            while True:
                hs = [self.nodes[n] for n in names] if names else self.running()
                if all(h.engine is not None and h.engine.applied_index() >= index for h in hs):
                    return
                await trio.sleep(0.01)


async def wait_replicated(leader: Engine, id: str, index: int, timeout: float = 30.0) -> None:
    """Wait until ``leader`` has heard that server ``id`` holds the log up to ``index``."""
    with trio.fail_after(timeout):
        while True:
            pr = leader.replication().get(id)
            if pr is not None and pr.match >= index:
                return
            await trio.sleep(0.01)


@asynccontextmanager
async def open_memory_cluster(
    base_dir: str | os.PathLike[str],
    size: int | list[str],
    make_fsm: Callable[[], Any],
    *,
    seed: int = 0,
    start: bool = True,
    **config: Any,
) -> AsyncIterator[MemoryCluster]:
    """A cluster of ``size`` nodes (or the given names) for the block; exceptions from the
    block arrive as themselves."""
    names = [f"n{i + 1}" for i in range(size)] if isinstance(size, int) else list(size)
    async with open_owning_nursery() as nursery:
        cluster = MemoryCluster(base_dir, names, make_fsm, nursery, seed=seed, config=config)
        if start:
            for name in names:
                await cluster.start(name)
        try:
            yield cluster
        finally:
            for h in list(cluster.nodes.values()):
                if h.cancel is not None:
                    await cluster.close(h.name)
            nursery.cancel_scope.cancel()
