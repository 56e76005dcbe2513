"""MemoryNetwork under MockClock(autojump_threshold=0)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import crc32c
import pytest
import trio
import trio.testing

from tests.transport.conftest import Inbox, app
from tests.transport.snapshot_helpers import (
    SPOOL_WRITES,
    ProbedExchange,
    fsm_name,
    released_at_exit,
    snap_msg,
    spools,
    write_fsm,
)
from trio_raft.core.messages import ConfState, Message, MessageType, Snapshot, SnapshotMetadata
from trio_raft.errors import (
    DispatchError,
    StepQueueFullError,
    TransportClosedError,
    TransportPeerUnknownError,
)
from trio_raft.storage import fsm_snapshot as fsm
from trio_raft.testing.faults import Hold
from trio_raft.transport import (
    LinkConfig,
    MemoryNetwork,
    MemoryTransport,
    ServingTransport,
    Transport,
    TransportPeer,
)

IDS = (1, 2, 3)


@asynccontextmanager
async def cluster(net: MemoryNetwork) -> AsyncIterator[dict[int, tuple[MemoryTransport, Inbox]]]:
    nodes: dict[int, tuple[MemoryTransport, Inbox]] = {}
    async with trio.open_nursery() as nursery:
        for i in IDS:
            t = net.transport(i, [TransportPeer(j, f"n{j}", f"mem:{j}") for j in IDS if j != i])
            inbox = Inbox()
            t.attach(inbox, None)
            await nursery.start(t.serve)
            nodes[i] = (t, inbox)
        yield nodes
        for t, _ in nodes.values():
            await t.aclose()


def msg(to: int, index: int, frm: int = 1) -> Message:
    return Message(MessageType.APP, to=to, from_=frm, index=index)


async def test_delivery_and_delay(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork(seed=1, default_link=LinkConfig(delay=0.05))
    async with cluster(net) as nodes:
        t1, _ = nodes[1]
        serving: ServingTransport = t1  # mypy checks the signatures
        assert isinstance(serving, Transport)
        start = trio.current_time()
        await t1.send(msg(2, 1))
        await nodes[2][1].wait_for(1)
        assert trio.current_time() - start == pytest.approx(0.05, abs=0.006)  # 5 ms polling
        net.set_link(1, 3, delay=2.0)
        await t1.send(msg(3, 1))
        await nodes[3][1].wait_for(1)
        assert trio.current_time() - start == pytest.approx(2.05, abs=0.01)
        assert t1.stats()["dispatched"] == 2


async def test_partition_heal_and_one_way_cut(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork()
    async with cluster(net) as nodes:
        t1, t2 = nodes[1][0], nodes[2][0]
        net.partition([1], [2, 3])
        with pytest.raises(DispatchError) as info:
            await t1.send(msg(2, 1))
        assert info.value.code == "Unavailable"
        with pytest.raises(DispatchError):
            await t2.send(msg(1, 1, frm=2))
        await nodes[3][0].send(msg(2, 1, frm=3))  # inside the majority side
        net.heal()
        await t1.send(msg(2, 2))
        await nodes[2][1].wait_for(2)  # a cut also loses what is still in flight
        net.cut(1, 2)  # one way only
        with pytest.raises(DispatchError):
            await t1.send(msg(2, 3))
        await t2.send(msg(1, 1, frm=2))
        await nodes[1][1].wait_for(1)
        assert t1.dispatch_error_counts_by_code() == {"Unavailable": 2}
        net.restore(1, 2)
        net.isolate(3)
        with pytest.raises(DispatchError):
            await t1.send(msg(3, 1))


async def test_in_flight_messages_are_lost_when_cut(autojump_clock: trio.testing.MockClock,
                                                    ) -> None:
    net = MemoryNetwork(default_link=LinkConfig(delay=1.0))
    async with cluster(net) as nodes:
        await nodes[1][0].send(msg(2, 1))
        net.cut(1, 2)
        await trio.sleep(2)
        assert nodes[2][1].messages == []
        assert net.stats.lost_in_flight == 1


async def run_lossy(seed: int) -> tuple[list[int], list[int], dict[str, int]]:
    net = MemoryNetwork(seed=seed, default_link=LinkConfig(
        drop_rate=0.2, duplicate_rate=0.1, delay=0.01, jitter=0.05))
    async with cluster(net) as nodes:
        for i in range(300):
            await nodes[1][0].send(msg(2, i))
            await nodes[1][0].send(msg(3, i))
            await trio.sleep(0.001)
        await trio.sleep(1)
        got2 = [m.index for m in nodes[2][1].messages]
        got3 = [m.index for m in nodes[3][1].messages]
        stats = {"dropped": net.stats.dropped, "duplicated": net.stats.duplicated}
    return got2, got3, stats


async def test_drops_duplicates_reordering_are_deterministic(
        autojump_clock: trio.testing.MockClock) -> None:
    first = await run_lossy(seed=42)
    again = await run_lossy(seed=42)
    other = await run_lossy(seed=43)
    assert first == again
    assert first != other
    got2, _, stats = first
    assert 0.1 < stats["dropped"] / 600 < 0.3
    assert stats["duplicated"] > 20
    assert len(got2) != len(set(got2))  # duplicates delivered
    assert got2 != sorted(got2)  # jitter reorders


async def test_snapshot_carried_whole_and_handler_errors(
        autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork()
    async with cluster(net) as nodes:
        snap = Message(MessageType.SNAP, to=2, from_=1, snapshot=Snapshot(
            SnapshotMetadata(ConfState([1, 2, 3]), 9, 1), b"x" * 100_000))
        await nodes[1][0].send_snapshot(snap)
        await nodes[2][1].wait_for(1)
        assert nodes[2][1].messages[0] == snap
        nodes[2][1].fail_with = StepQueueFullError()
        await nodes[1][0].send(app(1))
        await trio.sleep(0.1)
        assert nodes[2][0].stats()["handler_errors"] == 1
        with pytest.raises(TransportPeerUnknownError):
            await nodes[1][0].send(msg(7, 1))
        nodes[1][0].remove_peer(2)
        with pytest.raises(TransportPeerUnknownError):
            await nodes[1][0].send(msg(2, 1))


async def test_closed_node_is_unreachable_and_can_be_replaced(
        autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork()
    async with cluster(net) as nodes:
        await nodes[2][0].aclose()
        with pytest.raises(DispatchError):
            await nodes[1][0].send(msg(2, 1))
        with pytest.raises(TransportClosedError):
            await nodes[2][0].send(msg(1, 1))
        with pytest.raises(ValueError):
            net.transport(1)
        async with net.transport(2, [TransportPeer(1, "n1", "mem:1")]) as t2:
            inbox = Inbox()
            t2.attach(inbox, None)
            await nodes[1][0].send(msg(2, 5))
            await inbox.wait_for(1)


async def test_snapshot_payload_travels_through_the_exchanges(tmp_path: Path) -> None:
    net = MemoryNetwork()
    src, dst = ProbedExchange(tmp_path / "a"), ProbedExchange(tmp_path / "b", applied=3)
    payload = b"state" * 1000
    token = write_fsm(tmp_path / "a", 30, payload)
    async with net.transport(1, [TransportPeer(2, "n2", "mem:2")]) as t1, \
            net.transport(2, [TransportPeer(1, "n1", "mem:1")]) as t2:
        inbox = Inbox()
        t1.attach(Inbox(), src)
        t2.attach(inbox, dst)
        await t1.send_snapshot(snap_msg(30, token))
        await inbox.wait_for(1)
        crc = crc32c.crc32c(payload)
        assert inbox.messages[0].snapshot.data == fsm.encode_snapshot_token(30, crc)  # type: ignore[union-attr]
        assert (tmp_path / "b" / fsm_name(30)).read_bytes()[:-4] == payload
        assert dst.protected_indexes() == {30}
        # Stale: refused by the receiver's exchange, nothing written, the handler not called.
        await t1.send_snapshot(snap_msg(3, token))
        with pytest.raises(DispatchError) as info:
            await t1.send(snap_msg(31, token))  # MsgSnap has its own method
        assert info.value.code == "InvalidArgument"
        await t1.send(msg(2, 1))
        await inbox.wait_for(2)
        assert [m.type for m in inbox.messages] == [MessageType.SNAP, MessageType.APP]
        assert t2.stats()["handler_errors"] == 1
    assert sorted(os.listdir(tmp_path / "b")) == [fsm_name(30)]
    assert all(p is not None and p.closed for p in src.outgoing)


async def test_memory_detach_cancels_a_landing_snapshot(tmp_path: Path) -> None:
    net = MemoryNetwork()
    dst = ProbedExchange(tmp_path)
    held = dst.io.add(Hold("write", path=SPOOL_WRITES))
    async with net.transport(1, [TransportPeer(2, "n2", "mem:2")]) as t1, \
            net.transport(2, [TransportPeer(1, "n1", "mem:1")]) as t2, released_at_exit(dst.io):
        inbox = Inbox()
        t2.attach(inbox, dst)
        await t1.send_snapshot(snap_msg(8, b"x" * 5000))
        with trio.fail_after(60):
            await held.wait_reached()
        assert len(spools(tmp_path)) == 1
        async with trio.open_nursery() as nursery:
            nursery.start_soon(t2.detach)
            await trio.testing.wait_all_tasks_blocked()
            held.release()  # detach waits for the worker thread, then for the cleanup
        assert os.listdir(tmp_path) == []
        assert dst.protected_indexes() == frozenset()
        assert inbox.messages == []
        assert t2.stats()["handler_errors"] == 1
