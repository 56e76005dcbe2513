"""Ticks that piled up while the run loop was busy (trio_raft/engine/loop.py, ``_take_inbox``):
the messages that queued meanwhile are stepped first, and fewer ticks than an election timeout
are given per turn, so a stall of the leader's own process does not make it step down (check
quorum, Raft thesis section 6.2) while its followers' answers wait in its inbox."""

from __future__ import annotations

import trio

from tests.engine.kv import KV
from trio_raft.testing.cluster import open_memory_cluster


async def test_a_burst_of_ticks_does_not_depose_a_healthy_leader(tmp_path, clock):
    async with open_memory_cluster(tmp_path, 3, KV) as c:
        leader = await c.wait_for_leader()
        name, term = c.leader_name(), leader.status().term
        await leader.propose(b"set a 1")
        loop = leader._loop  # white box: the ticks of a long stall, given at once
        election_tick = loop.cfg.election_tick
        for _ in range(5):
            loop.inbox.ticks += 10 * election_tick
            loop.inbox.put_tick()
            await trio.sleep(loop.cfg.tick_interval * 3)
            assert c.leader_name() == name and leader.status().term == term
        assert (await leader.propose(b"set b 2")).commit_index > 0
        assert leader.status().term == term
