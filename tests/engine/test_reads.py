"""ReadIndex rounds (engine/reads.py): batching, and the rule that makes batching safe: a read
is only ever served by a round started after it arrived."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from tests.engine.kv import KV
from trio_raft import State, errors
from trio_raft.core.messages import ReadState, Ready
from trio_raft.engine.reads import Reads
from trio_raft.engine.requests import ReadRequest
from trio_raft.engine.waiters import Waiter
from trio_raft.testing.cluster import open_memory_cluster


class RoundRecorder:
    """Stands in for the RawNode: records the contexts of the rounds started."""

    def __init__(self) -> None:
        self.contexts: list[bytes] = []

    def read_index(self, ctx: bytes) -> None:
        self.contexts.append(ctx)


def answer(ctx: bytes, index: int) -> Ready:
    return Ready(read_states=(ReadState(index, ctx),))


def read(reads: Reads, rid: int, *, wait_applied: bool = True) -> ReadRequest:
    req = ReadRequest(rid, Waiter(), wait_applied)
    reads.add(req)
    reads.admit(req, None)
    return req


@pytest.mark.parametrize("wait_applied", [True, False], ids=["read", "verify_leader"])
async def test_a_read_never_joins_a_round_started_before_it_arrived(wait_applied):
    node = RoundRecorder()
    reads = Reads(node, retry_after=10.0, probe_interval=1.0)  # type: ignore[arg-type]
    a = read(reads, 1, wait_applied=wait_applied)
    reads.start_rounds(is_leader=True, has_followers=True)
    assert len(node.contexts) == 1  # round 1 carries a
    b = read(reads, 2, wait_applied=wait_applied)  # arrives while round 1 is in flight
    c = read(reads, 3, wait_applied=wait_applied)
    reads.start_rounds(is_leader=True, has_followers=True)
    assert len(node.contexts) == 1  # no second round while one is in flight
    reads.on_ready(answer(node.contexts[0], 10))
    reads.release_applied(10)
    assert a.waiter.done and await a.waiter.wait() == 10
    assert not b.waiter.done and not c.waiter.done  # round 1 was sent before they arrived
    reads.start_rounds(is_leader=True, has_followers=True)  # the next round starts at once
    assert len(node.contexts) == 2
    reads.on_ready(answer(node.contexts[1], 12))
    reads.release_applied(12)
    assert await b.waiter.wait() == 12 and await c.waiter.wait() == 12
    assert len(reads) == 0


async def test_a_late_answer_to_an_abandoned_round_serves_nothing():
    node = RoundRecorder()
    reads = Reads(node, retry_after=0.0, probe_interval=1.0)  # type: ignore[arg-type]
    a = read(reads, 1)
    reads.start_rounds(is_leader=False, has_followers=True)
    reads.start_rounds(is_leader=False, has_followers=True)  # no answer in time: a new round
    assert len(node.contexts) == 2
    reads.on_ready(answer(node.contexts[0], 5))  # the first round answers late
    reads.release_applied(100)
    assert not a.waiter.done
    reads.on_ready(answer(node.contexts[1], 7))
    reads.release_applied(100)
    assert await a.waiter.wait() == 7


async def test_many_concurrent_reads_share_rounds(tmp_path, clock):
    """64 reads at once cost a handful of rounds, not 64; every one sees the write before it."""
    async with open_memory_cluster(tmp_path, 3, KV) as c:
        leader = await c.wait_for_leader()
        written = await leader.propose(b"set a 1")
        before = leader._loop.reads.rounds  # white box: rounds started so far
        results: list[int] = []

        async def one() -> None:
            results.append(await leader.linearizable_read())

        async with trio.open_nursery() as n:
            for _ in range(64):
                n.start_soon(one)
        assert len(results) == 64 and min(results) >= written.commit_index
        assert leader._loop.reads.rounds - before <= 4


async def test_follower_reads_batch_and_see_earlier_writes(tmp_path, clock):
    async with open_memory_cluster(tmp_path, 3, KV) as c:
        leader = await c.wait_for_leader()
        handle = next(h for h in c.running() if h.engine.state() is State.FOLLOWER)
        follower = handle.engine
        for i in range(5):
            written = await leader.propose(b"set k %d" % i)
            results: list[str] = []

            async def one(out: list[str]) -> None:
                await follower.linearizable_read()
                out.append(handle.fsm.data["k"])  # read right after, no await between

            async with trio.open_nursery() as n:
                for _ in range(16):
                    n.start_soon(one, results)
            assert results == [str(i)] * 16
            assert follower.applied_index() >= written.commit_index


async def test_follower_without_a_leader_refuses_reads(tmp_path, clock):
    async with open_memory_cluster(tmp_path, 3, KV) as c:
        await c.wait_for_leader()
        name = next(h.name for h in c.running() if h.engine.state() is State.FOLLOWER)
        follower = c.engine(name)
        c.isolate(name)
        with trio.fail_after(30):
            while follower.leader().id:
                await trio.sleep(0.05)
        with pytest.raises(errors.NotLeaderError):
            await follower.linearizable_read()


async def test_lease_read_waits_until_the_leader_applied_its_commit_index(tmp_path, clock):
    """A leader's commit index can run ahead of what it applied (followers may even show the
    entry first: a leader sends appends carrying the new commit index before its own write,
    Raft thesis §10.2.1). A lease read must return only once that index is applied here."""
    async with open_memory_cluster(tmp_path, 3, KV, heartbeat_tick=10, election_tick=100) as c:
        leader = await c.wait_for_leader(timeout=60)
        lname = c.leader_name()
        assert lname is not None
        fsm = c.nodes[lname].fsm
        await leader.propose(b"set k old")
        with trio.fail_after(5):
            while not leader.lease_valid():
                await trio.sleep(0.01)
        applier = leader._loop.applier  # white box: hold the leader's apply of the new write
        real_apply = applier.apply
        held = trio.Event()
        go = trio.Event()

        async def slow_apply(entries):  # type: ignore[no-untyped-def]
            if any(b"set k new" in e.data for e in entries):
                held.set()
                await go.wait()
            await real_apply(entries)

        applier.apply = slow_apply  # type: ignore[method-assign]
        got: list[str] = []

        async def lease_reader() -> None:
            await leader.lease_read()
            got.append(fsm.data["k"])

        async with trio.open_nursery() as n:
            try:
                n.start_soon(leader.propose, b"set k new")
                await held.wait()  # committed, not applied on the leader
                assert leader._loop.node.raft.log.committed > leader.applied_index()
                assert leader.lease_valid()
                n.start_soon(lease_reader)
                await trio.testing.wait_all_tasks_blocked()
                assert got == []  # it waits for the apply
            finally:
                go.set()
        assert got == ["new"]


async def test_a_forwarded_round_is_stamped_when_the_leader_took_it(clock):
    """With the leader batching rounds (trio_raft/core/readonly.py), its heartbeats may carry a
    follower's context instead of its own: the lease credits an echo of that context from the
    instant the leader's loop first took the forwarded round (no heartbeat carried it before)."""
    node = RoundRecorder()
    reads = Reads(node, retry_after=10.0, probe_interval=1.0)  # type: ignore[arg-type]
    read(reads, 1)
    reads.start_rounds(is_leader=True, has_followers=True)
    own_started = trio.current_time()
    assert reads.started_at(node.contexts[0]) == own_started
    await trio.sleep(2.0)
    reads.note_forwarded(b"a follower's context")
    took = trio.current_time()
    await trio.sleep(3.0)
    reads.note_forwarded(b"a follower's context")  # seen again later: the first time counts
    assert reads.started_at(b"a follower's context") == took
    assert reads.started_at(node.contexts[0]) == own_started
    assert reads.started_at(b"never seen") is None


async def test_reads_on_every_node_at_once_see_every_earlier_write(tmp_path, clock):
    """Rounds from all three nodes meet at the leader, which batches them (its own and the
    forwarded ones share heartbeat broadcasts): every read still sees the write acknowledged
    before it started, and the leader's lease holds on through them."""
    async with open_memory_cluster(tmp_path, 3, KV) as c:
        leader = await c.wait_for_leader()
        handles = c.running()
        for i in range(4):
            await leader.propose(b"set k %d" % i)
            began = trio.current_time()
            seen: list[str] = []

            async def one(h: object, out: list[str]) -> None:
                await h.engine.linearizable_read()  # type: ignore[attr-defined]
                out.append(h.fsm.data["k"])  # type: ignore[attr-defined]

            async with trio.open_nursery() as n:
                for h in handles:
                    for _ in range(8):
                        n.start_soon(one, h, seen)
            assert seen == [str(i)] * 24
            ack = leader.last_quorum_ack()
            assert ack is not None and ack >= began  # the lease was fed by these rounds
        assert len(leader._loop.node.raft.read_only.pending) == 0  # white box: nothing stuck
