"""Key engine scenarios over the real gRPC transport on loopback (real time, bounded)."""

from __future__ import annotations

import attrs
import pytest
import trio

import trio_raft
from tests.engine.kv import KV
from trio_raft import State, errors
from trio_raft.testing.cluster import wait_replicated
from trio_raft.testing.net import free_loopback_ports


def free_ports(n: int) -> list[int]:
    return free_loopback_ports(n)


def node_config(tmp_path, name: str, peers: list[trio_raft.Peer], fsm: KV,
                **kw) -> trio_raft.OpenConfig:
    addr = next(p.address for p in peers if p.id == name)
    return trio_raft.OpenConfig(
        local_id=name, local_address=addr, data_dir=str(tmp_path / name), peers=peers,
        bootstrap=True, state_machine=fsm, tick_interval=0.01, heartbeat_tick=10,
        election_tick=100, **kw)  # 1-2 s: a loaded machine's slow fsync must not elect


async def run_node(cfg, engines: dict, stop: trio.Event, *, task_status=trio.TASK_STATUS_IGNORED):
    async with trio_raft.open_engine(cfg) as engine:
        engines[cfg.local_id] = engine
        task_status.started()
        await stop.wait()


async def wait_leader(engines: dict, timeout: float = 20) -> str:
    with trio.fail_after(timeout):
        while True:
            leaders = [n for n, e in engines.items() if e.state() is State.LEADER]
            if len(leaders) == 1:
                return leaders[0]
            await trio.sleep(0.02)


async def test_grpc_three_node_cluster(tmp_path):
    ports = free_ports(3)
    names = ["n1", "n2", "n3"]
    peers = [trio_raft.Peer(n, f"127.0.0.1:{p}") for n, p in zip(names, ports)]
    fsms = {n: KV() for n in names}
    engines: dict[str, trio_raft.Engine] = {}
    stops = {n: trio.Event() for n in names}
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for n in names:
                await nursery.start(run_node, node_config(tmp_path, n, peers, fsms[n]), engines,
                                    stops[n])
            leader_name = await wait_leader(engines)
            leader = engines[leader_name]
            results = []
            async with trio.open_nursery() as writers:
                async def write(i: int) -> None:
                    results.append(await leader.propose(f"set k{i} v{i}".encode()))

                for i in range(50):
                    writers.start_soon(write, i)
            assert len(results) == 50
            idx = await leader.linearizable_read()
            with trio.fail_after(10):
                while min(e.applied_index() for e in engines.values()) < idx:
                    await trio.sleep(0.02)
            for n in names:
                assert fsms[n].data == {f"k{i}": f"v{i}" for i in range(50)}
            follower = next(n for n in names if n != leader_name)
            with pytest.raises(errors.NotLeaderError):
                await engines[follower].propose(b"set x 1")
            # Transfer leadership over the network, then fail the new leader over.
            await leader.transfer_leadership_to_server(follower)
            assert await wait_leader(engines) == follower
            stops[follower].set()
            with trio.fail_after(20):
                while follower in engines and engines[follower].state() is not State.SHUTDOWN:
                    await trio.sleep(0.02)
            rest = {n: e for n, e in engines.items() if n != follower}
            new_leader = await wait_leader(rest)
            r = await rest[new_leader].propose(b"set after failover")
            assert r.commit_index > idx
            for n in names:
                stops[n].set()


async def test_grpc_learner_catches_up_through_streamed_snapshot(tmp_path):
    ports = free_ports(3)
    names = ["n1", "n2", "n3"]
    peers = [trio_raft.Peer(n, f"127.0.0.1:{p}") for n, p in zip(names, ports)]
    fsms = {n: KV() for n in [*names, "n4"]}
    engines: dict[str, trio_raft.Engine] = {}
    stop = trio.Event()
    extra = dict(snapshot_every=20, snapshot_catchup_entries=5)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for n in names:
                await nursery.start(run_node, node_config(tmp_path, n, peers, fsms[n], **extra),
                                    engines, stop)
            leader = engines[await wait_leader(engines)]
            for i in range(60):
                await leader.propose(f"set k{i} v{i}".encode())
            with trio.fail_after(10):  # snapshots are written in the background
                while leader.status().last_snapshot_index < 40:
                    await trio.sleep(0.02)
            # The joiner's port is picked only now, right before it is bound.
            joiner_peer = trio_raft.Peer("n4", f"127.0.0.1:{free_ports(1)[0]}")
            jcfg = node_config(tmp_path, "n4", [*peers, joiner_peer], fsms["n4"], **extra)
            await nursery.start(run_node, attrs.evolve(jcfg, bootstrap=False), engines, stop)
            idx = await leader.add_learner("n4", joiner_peer.address)
            warm = await leader.propose(b"set warm 1")
            while engines["n4"].applied_index() < warm.commit_index:
                await trio.sleep(0.02)
            assert fsms["n4"].data == fsms[leader._loop.local_id].data
            assert engines["n4"].status().last_snapshot_index >= 40
            # n4 applied it; the leader learns so when n4's answer arrives.
            await wait_replicated(leader, "n4", warm.commit_index)
            assert leader.replication()["n4"].learner
            await leader.promote_learner("n4", idx, warm.commit_index)
            assert not leader.replication()["n4"].learner
            stop.set()
