from __future__ import annotations

import trio

from tests.engine.kv import KV
from trio_raft import State
from trio_raft.testing.cluster import open_memory_cluster


async def test_three_nodes_elect_and_replicate(tmp_path, clock):
    async with open_memory_cluster(tmp_path, 3, KV) as c:
        leader = await c.wait_for_leader()
        res = await leader.propose(b"set a 1")
        assert res.commit_index > 0
        await c.wait_applied(res.commit_index)
        for h in c.running():
            assert h.fsm.data == {"a": "1"}
        idx = await leader.linearizable_read()
        assert idx >= res.commit_index
        followers = [h for h in c.running() if h.engine.state() is State.FOLLOWER]
        assert len(followers) == 2
        await trio.sleep(1)
        assert followers[0].engine.status().last_contact >= 0
