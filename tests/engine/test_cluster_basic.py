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


async def test_the_module_docstring_example_runs(tmp_path, clock):
    """The example in trio_raft/testing/cluster.py's docstring, run as written."""
    import textwrap

    from trio_raft.testing import cluster as cluster_mod

    doc = cluster_mod.__doc__ or ""
    start = doc.index("    async with open_memory_cluster(")
    body = textwrap.dedent(doc[start:doc.index("\n\n", start)])
    source = "async def example(tmp_path):\n" + textwrap.indent(body, "    ")
    namespace = {"open_memory_cluster": open_memory_cluster, "KV": KV}
    exec(compile(source, "cluster.py docstring", "exec"), namespace)
    await namespace["example"](tmp_path)


def test_core_demo_runs():
    import pathlib
    import subprocess
    import sys

    demo = pathlib.Path(__file__).resolve().parents[2] / "examples" / "core_demo.py"
    out = subprocess.run([sys.executable, str(demo)], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert "all state machines identical: True" in out
