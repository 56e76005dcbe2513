"""ReadIndex rounds (engine/reads.py): batching, and the rule that makes batching safe: a read
is only ever served by a round started after it arrived."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from tests.engine.kv import KV
from trio_raft import State, errors
from trio_raft.core.messages import Ready, ReadState
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

            async def one() -> None:
                await follower.linearizable_read()
                results.append(handle.fsm.data["k"])  # read right after, no await between

            async with trio.open_nursery() as n:
                for _ in range(16):
                    n.start_soon(one)
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
