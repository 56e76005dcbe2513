"""Closing an engine while a large snapshot transfer is in flight (tens of MB, real gRPC on
loopback, real files and fsync).

A learner joins a three-voter cluster holding 6 MiB and is sent a snapshot in chunks of the
transport's default size (1 MiB).
A :class:`~trio_raft.testing.faults.Hold` on one engine's file-I/O seam (``OpenConfig.file_io``)
keeps the transfer in flight: the learner's spool write after the first chunk, or the leader's
read of its ``.fsm`` file after the first chunk. Then that engine is closed (or fails): its exit
waits for the held worker thread, and afterwards nothing of the transfer is left running, open,
half-written or installed. The learner, restarted on the same data directory, catches up
through a fresh snapshot.

Each test runs with engines that build and serve their own transport (``owned``) and with
transports the application builds, serves and passes in (``app``, as examples/kvnode.py does).
Every wait is on a hold or on a condition with a deadline; nothing sleeps to let things happen.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from tests.engine.transfer_cluster import (
    LEARNER,
    PATIENCE,
    Cluster,
    Node,
    fsm_files,
    learner_address,
    running_cluster,
    until,
)
from tests.transport.snapshot_helpers import SPOOL_WRITES, fsm_name, open_files_under, spools
from trio_raft import State
from trio_raft.storage.recovery import SPOOL_PREFIX
from trio_raft.testing.faults import Hold
from trio_raft.transport.grpc import DEFAULT_SNAPSHOT_CHUNK_BYTES

KINDS = ["owned", "app"]
#: The state: this many keys of 1 MiB each, a payload of six chunks of the transport's default
#: size (``CHUNK``), the last one partly filled.
KEYS = 6
CHUNK = DEFAULT_SNAPSHOT_CHUNK_BYTES


@pytest.fixture(scope="module")
def values() -> list[str]:
    return [os.urandom(512 << 10).hex() for _ in range(KEYS)]


class InjectedFatalError(Exception):
    """Stands for a fatal error of the receiving engine (a failed fsync, a corrupt WAL, ...)."""


async def add_learner(cluster: Cluster) -> tuple[Node, Node, int]:
    """The leader adds the learner (not started yet); returns (leader, learner, the index of the
    snapshot the learner will be sent)."""
    leader = await cluster.leader()
    learner = cluster.node(LEARNER, learner_address())
    index = await leader.running.add_learner(LEARNER, learner.address)
    # Applying the change writes a snapshot of the whole state at its index.
    await until(lambda: leader.running.status().last_snapshot_index >= index,
                "the leader's snapshot of the new configuration")
    return leader, learner, leader.running.status().last_snapshot_index


async def stop_while_held(node: Node, hold: Hold, how: str) -> None:
    """Close (or fail) ``node``'s engine while ``hold`` keeps a worker thread of its transfer,
    check that its exit waits for that thread, release it and wait until the engine is gone."""
    if how == "fail":
        node.running._loop.fail(InjectedFatalError("the disk is on fire"))
    else:
        node.stop.set()  # leaves open_engine
    with trio.fail_after(PATIENCE):
        await node.running.wait_closed()
        if node.app_transport is not None and how != "sender":
            # The engine detaches from the application's transport as it exits; the transfer
            # is cancelled by then.
            await node.app_transport.detaching.wait()
    assert node.running.state() is State.SHUTDOWN
    assert not node.finished.is_set()  # the exit waits for the held worker thread
    hold.release()
    with trio.fail_after(PATIENCE):
        await node.finished.wait()


async def catch_up(cluster: Cluster, learner: Node, key: str) -> Node:
    """A write on the leader, then wait until ``learner`` applied it; returns the leader."""
    leader = await cluster.leader()
    done = await leader.running.propose(f"set {key} 1".encode())
    await until(lambda: learner.running.applied_index() >= done.commit_index,
                "the learner catching up")
    return leader


@pytest.mark.parametrize("how", ["close", "fail"])
@pytest.mark.parametrize("kind", KINDS)
async def test_learner_stops_during_a_large_incoming_snapshot(
        tmp_path: Path, values: list[str], kind: str, how: str) -> None:
    async with running_cluster(tmp_path, kind, values) as cluster:
        leader, learner, index = await add_learner(cluster)
        hold = learner.io.add(Hold("write", path=SPOOL_WRITES, after=1))
        await cluster.start(learner, bootstrap=False)
        with trio.fail_after(PATIENCE):
            await hold.wait_reached()
        # Really in flight: one chunk spooled, the next chunk's write waits, nothing installed.
        transport = learner.transport
        assert transport.incoming_transfers() == 1
        [spool] = spools(learner.fsm_dir)
        spool_path = str(learner.fsm_dir / spool)
        assert hold.call is not None and hold.call.path == spool_path
        assert spool_path in open_files_under(learner.data_dir)
        assert (learner.fsm_dir / spool).stat().st_size == CHUNK
        assert learner.running.applied_index() == 0

        await stop_while_held(learner, hold, how)

        if how == "fail":
            assert isinstance(learner.error, InjectedFatalError)
        else:
            assert learner.error is None
        assert transport.incoming_transfers() == 0
        stats = transport.stats()
        assert stats["snapshots_cancelled"] == 1 and stats["snapshots_finalized"] == 0
        assert open_files_under(learner.data_dir) == []
        assert spools(learner.fsm_dir) == []
        assert fsm_name(index) not in fsm_files(learner.fsm_dir)
        assert fsm_files(learner.fsm_dir) == []
        # The spool was created, written, then closed and removed through the seam; it was
        # never fsynced or renamed (nothing half-written was finalized).
        ops = [c.op for c in learner.io.calls if c.path == spool_path]
        assert ops[0] == "open" and ops[-2:] == ["close", "unlink"]
        assert "fsync" not in ops and not learner.io.calls_to("replace", spool)

        # Restarted on the same data directory: a fresh snapshot lands and is installed.
        again = learner.restarted()
        await cluster.start(again, bootstrap=False)
        leader = await catch_up(cluster, again, "after-restart")
        assert again.fsm.data == leader.fsm.data
        assert len(again.fsm.data) == KEYS + 1
        assert again.running.status().last_snapshot_index >= index
        [landed] = again.io.calls_to("replace", SPOOL_PREFIX)
        assert landed.target.endswith(fsm_name(again.running.status().last_snapshot_index))
        assert again.transport.stats()["snapshots_finalized"] == 1
        assert again.error is None


@pytest.mark.parametrize("kind", KINDS)
async def test_leader_stops_during_a_large_outgoing_snapshot(
        tmp_path: Path, values: list[str], kind: str) -> None:
    async with running_cluster(tmp_path, kind, values) as cluster:
        leader, learner, index = await add_learner(cluster)
        payload = str(leader.fsm_dir / fsm_name(index))
        # The leader's read of its third chunk waits. The sender looks one chunk ahead to mark
        # the last one, so by then the first chunk is on its way and the second is queued; the
        # learner's write of the first one waits too, with its spool open.
        sending = leader.io.add(Hold("readinto", path="*/fsm-snap/" + fsm_name(index), after=2))
        spooling = learner.io.add(Hold("write", path=SPOOL_WRITES))
        await cluster.start(learner, bootstrap=False)
        with trio.fail_after(PATIENCE):
            await sending.wait_reached()
            await spooling.wait_reached()
        assert sending.call is not None and sending.call.path == payload
        assert payload in open_files_under(leader.data_dir)
        assert learner.transport.incoming_transfers() == 1
        [spool] = spools(learner.fsm_dir)
        sender = leader.transport

        await stop_while_held(leader, sending, "sender")

        assert leader.error is None
        # Its .fsm file is closed (every open of it was closed once), no stream task is left.
        assert open_files_under(leader.data_dir) == []
        opened = leader.io.calls_to("open", payload)
        assert opened and len(leader.io.calls_to("close", payload)) == len(opened)
        assert sender._client is not None and not sender._client._snapshot_tasks
        if kind == "owned":
            assert sender.bridge is None  # the engine's transport is gone with it
        # The learner drops its half of the interrupted transfer once its write returns...
        spooling.release()
        await until(lambda: learner.transport.incoming_transfers() == 0
                    and spool not in spools(learner.fsm_dir),
                    "the learner dropping the interrupted transfer")
        assert learner.transport.stats()["snapshots_cancelled"] == 1
        # ...and the next leader's snapshot brings it up to date.
        leader = await catch_up(cluster, learner, "after-failover")
        assert learner.fsm.data == leader.fsm.data
        assert len(learner.fsm.data) == KEYS + 1
        assert spools(learner.fsm_dir) == []
        assert learner.transport.stats()["snapshots_finalized"] == 1
