"""CI configuration of the fault suite: short seeded runs on 3- and 5-node kvnode clusters.

Every run starts real kvnode processes (fsync on) behind the chaos proxy, runs concurrent
clients through a seeded fault schedule, heals, and asserts on the evidence only: the history
is linearizable, every node converges to the same state, no acknowledged write is missing, and
every data dir reopens cleanly (see tests/chaos/runner.py). Deadlines are generous upper bounds
on liveness, never the thing asserted. A longer soak: ``python -m tests.chaos --minutes 15``
(``--store sqlite`` for nodes on the SQLite store).
"""

from __future__ import annotations

import pytest
import trio

from tests.chaos.nemesis import make_schedule
from tests.chaos.proxy import Proxy
from tests.chaos.runner import Report, RunConfig, run_chaos

pytestmark = pytest.mark.slow


def _run(cfg: RunConfig) -> Report:
    report = trio.run(run_chaos, cfg)
    detail = "\n".join([*report.problems, report.explanation, f"logs: {report.root}",
                        "schedule: " + "; ".join(report.schedule)])
    assert report.ok, detail
    assert report.linearizable and report.converged and report.reopened, detail
    assert report.op_counts.get("put:ok", 0) > 0 and report.op_counts.get("get:ok", 0) > 0
    assert report.op_counts.get("stream-put:ok", 0) > 0  # writes over PutStream calls too
    assert report.durable_acked > 0
    return report


def test_schedule_is_a_function_of_the_seed() -> None:
    a = [f.describe() for f in make_schedule(5, 3, 20)]
    assert a == [f.describe() for f in make_schedule(5, 3, 20)]
    assert a != [f.describe() for f in make_schedule(6, 3, 20)]


async def test_proxy_cuts_delays_and_heals_links() -> None:
    async def echo(stream: trio.SocketStream) -> None:
        async for data in stream:
            await stream.send_all(data)

    async with trio.open_nursery() as nursery, Proxy() as proxy:
        listeners = await nursery.start(trio.serve_tcp, echo, 0)
        port = listeners[0].socket.getsockname()[1]
        pport = await proxy.add_link("a", "b", ("127.0.0.1", port))
        s = await trio.open_tcp_stream("127.0.0.1", pport)
        await s.send_all(b"ping")
        assert await s.receive_some(10) == b"ping"
        proxy.cut("a", "b")  # blackhole: nothing comes back
        await s.send_all(b"lost")
        with trio.move_on_after(0.3) as scope:
            await s.receive_some(10)
        assert scope.cancelled_caught
        with trio.fail_after(10):  # the proxy holds "lost" at its gate
            while not proxy.links[("a", "b")].stalled:
                await trio.sleep(0.01)
        proxy.heal("a", "b")  # stalled connections are closed on heal
        assert await s.receive_some(10) == b""
        s2 = await trio.open_tcp_stream("127.0.0.1", pport)
        proxy.set_delay("a", "b", 0.2)
        t0 = trio.current_time()
        await s2.send_all(b"slow")
        assert await s2.receive_some(10) == b"slow"
        assert trio.current_time() - t0 >= 0.35  # both directions delayed
        proxy.cut("a", "b", "reset")
        assert await s2.receive_some(10) == b""
        await s.aclose()
        await s2.aclose()
        nursery.cancel_scope.cancel()


def test_three_nodes_mixed_faults() -> None:
    r = _run(RunConfig(seed=101, nodes=3, faults=6))
    assert sum(r.faults.values()) >= 6


def test_five_nodes_mixed_faults() -> None:
    r = _run(RunConfig(seed=202, nodes=5, faults=5, clients=5))
    assert sum(r.faults.values()) >= 5


def test_three_nodes_crashes_pauses_and_membership_churn() -> None:
    r = _run(RunConfig(seed=303, nodes=3, faults=5,
                       kinds=("kill-all", "kill-leader", "pause", "churn", "transfer")))
    assert r.faults


def test_five_nodes_partitions_and_slow_disk() -> None:
    r = _run(RunConfig(seed=404, nodes=5, faults=4, clients=5,
                       kinds=("partition", "asymmetric", "bridge", "slow-disk", "combo")))
    assert r.faults


def test_three_nodes_on_the_sqlite_store_crashes_and_pauses() -> None:
    """kvnode's SQLite store under crashes (kill -9 of the leader and of every node) and pauses:
    restarts skip the snapshot restore when the store holds it, and nothing acknowledged is
    lost."""
    r = _run(RunConfig(seed=505, nodes=3, faults=3, store="sqlite",
                       kinds=("kill-all", "kill-leader", "pause")))
    assert r.faults
