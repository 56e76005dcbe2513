"""Engine benchmark: a 3-node cluster, one OS process per node, gRPC on loopback, fsync on.

    python bench/engine_bench.py [--duration 5] [--concurrency 1,64,1024] [--size 100]
                                 [--plot DIR] [--system LABEL]

The orchestrator starts three node processes (this script with ``node``), waits for one to
report leadership, and tells that node to run the workload: for each concurrency level, that
many trio tasks propose 100-byte entries back to back for ``--duration`` seconds. The leader
prints one JSON line per level (proposals/s, p50/p99 latency in ms); the orchestrator echoes them
with the machine description. Figures, not assertions. ``--plot DIR`` also draws the
latency-throughput curve (``bench/plot.py``; matplotlib, the ``bench`` extra) as
``DIR/engine.png`` and ``.svg``; ``--system`` labels the rows (and the curve).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import IO, Any


class CounterFSM:
    """Counts the entries it applies; its snapshot is the count (then ``PAD``, which a
    subclass may fill to give the snapshot a chosen size), written in 1 MiB slices."""

    PAD = b""

    def __init__(self) -> None:
        self.count = 0

    def apply(self, data: bytes) -> int:
        self.count += 1
        return self.count

    def snapshot(self) -> Any:
        blob = str(self.count).encode() + b"\n" + self.PAD

        class Snap:
            def write_to(self, w: IO[bytes]) -> int:
                view = memoryview(blob)
                for i in range(0, len(view), 1 << 20):
                    w.write(view[i:i + (1 << 20)])
                return len(blob)

            def close(self) -> None:
                pass

        return Snap()

    def restore(self, reader: IO[bytes]) -> None:
        blob = reader.read()
        self.count = int(blob.split(b"\n", 1)[0]) if blob else 0


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    k = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[k]


async def run_workload(engine: Any, concurrency: int, duration: float, size: int,
                       pids: list[int] | None = None) -> dict[str, Any]:
    """``pids``: the node processes, this one (the leader) first, whose CPU time the level
    is charged with."""
    import trio
    from nodes import cpu_seconds

    payload = b"x" * size
    latencies: list[float] = []
    errors = 0
    deadline = trio.current_time() + duration

    async def worker() -> None:
        nonlocal errors
        while trio.current_time() < deadline:
            t0 = time.perf_counter()
            try:
                await engine.propose(payload)
            except Exception:
                errors += 1
                await trio.sleep(0.01)
                continue
            latencies.append(time.perf_counter() - t0)

    pids = pids or [os.getpid()]
    cpu_before = cpu_seconds(pids)
    t_start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    elapsed = time.perf_counter() - t_start
    cpu_used = [b - a for a, b in zip(cpu_before, cpu_seconds(pids))]
    per = 1e6 / max(1, len(latencies))
    latencies.sort()
    counters = engine.counters()
    return {
        "bench": "engine_propose",
        "nodes": 3,
        "transport": "grpc-loopback",
        "fsync": True,
        "entry_bytes": size,
        "concurrency": concurrency,
        "proposals": len(latencies),
        "errors": errors,
        "seconds": round(elapsed, 3),
        "proposals_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(percentile(latencies, 0.50) * 1000, 3),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 3),
        # CPU time (user + system, /proc) per acknowledged proposal over the level: the
        # leader's process and the others' together (0 for the others when not given).
        "cpu_us_per_proposal": {"leader": round(cpu_used[0] * per, 1),
                                "followers": round(sum(cpu_used[1:]) * per, 1)},
        # The leader's totals so far (the levels run one after another).
        "snapshots_written": counters.snapshots_written,
        "snapshots_sent": counters.snapshots_sent,
    }


def node_main(args: argparse.Namespace) -> None:
    import trio

    import trio_raft

    async def main() -> None:
        from nodes import node_transport, tune_node_gc

        peers = trio_raft.parse_peers(args.peers)
        address = next(p.address for p in peers if p.id == args.name)
        async with node_transport(args, address) as transport, trio_raft.open_engine(
                trio_raft.OpenConfig(local_id=args.name, local_address=address,
                                     data_dir=args.data_dir, peers=peers, bootstrap=True,
                                     state_machine=CounterFSM(),
                                     transport=transport)) as engine:
            tune_node_gc(args)
            announced = False
            stdin = trio.wrap_file(sys.stdin)
            while True:
                if engine.state() is trio_raft.State.LEADER and not announced:
                    print(json.dumps({"event": "leader", "name": args.name}), flush=True)
                    announced = True
                    line = await stdin.readline()
                    words = line.split()
                    if words[:1] == ["run"]:
                        # ``run PID,PID,PID``: the nodes' processes, for the CPU figures.
                        pids = [int(p) for p in words[1].split(",")] if len(words) > 1 else []
                        pids = [os.getpid()] + [p for p in pids if p != os.getpid()]
                        # Warm up: one proposal commits the leader's term everywhere.
                        await engine.propose(b"warmup")
                        for c in [int(x) for x in args.concurrency.split(",")]:
                            result = await run_workload(engine, c, args.duration, args.size,
                                                        pids)
                            print(json.dumps(result), flush=True)
                        print(json.dumps({"event": "done"}), flush=True)
                    return
                await trio.sleep(0.05)

    trio.run(main)


def orchestrate(args: argparse.Namespace) -> None:
    from nodes import NodeProcesses, node_arguments

    print(json.dumps({
        "event": "machine", "python": platform.python_version(), "cpus": os.cpu_count(),
        "platform": platform.platform(), "data_dir": "tmp",
    }), flush=True)
    extra = node_arguments(args)
    with NodeProcesses(__file__, extra, prefix="trio-raft-bench-", parent=args.dir) as nodes:
        leader = nodes.leader()
        nodes.command(leader, "run " + ",".join(str(p.pid) for p in nodes.procs.values()))
        budget = 60 + len(args.concurrency.split(",")) * (args.duration + 30)
        ok = nodes.wait_for(leader, '"event": "done"', budget)
        rows = []
        for line in nodes.outputs[leader]:
            if line.startswith("{") and '"bench"' in line:
                row = json.loads(line)
                if args.system:
                    row["system"] = args.system
                rows.append(row)
                print(json.dumps(row), flush=True)
        if args.plot and rows:
            from plot import plot_rows

            for path in plot_rows(rows, args.plot, "engine", "engine.propose, 3 processes, "
                                  "fsync on"):
                print(json.dumps({"event": "plot", "file": path}), flush=True)
        if not ok:
            raise SystemExit("benchmark did not finish in time")


def main() -> None:
    from nodes import add_node_arguments

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_node_arguments(ap, concurrency="1,64,1024")
    ap.add_argument("--plot", default=None, metavar="DIR",
                    help="draw the latency-throughput curve into DIR (needs the bench extra)")
    ap.add_argument("--system", default="", help="a label for the rows and the curve")
    args = ap.parse_args()
    if args.mode == "node":
        node_main(args)
    else:
        orchestrate(args)


if __name__ == "__main__":
    main()
