"""Where one proposal's time goes: the per-stage breakdown of a 3-process cluster, fsync on.

    python bench/latency_bench.py [--duration 5] [--concurrency 1] [--runs 1]

Three node processes (gRPC on loopback, fsync on) each run an engine whose observer records
every stage timing (``trio_raft/engine/stages.py``: ``stage(name, seconds, ended)``); the
leader runs ``engine.propose`` from ``c`` trio tasks for ``--duration`` seconds per level, as
``bench/engine_bench.py`` does. Afterwards every node hands its records to this script, which
prints JSON lines:

* ``latency_stage``: per level, per role (leader, followers) and stage: count, p50, p99;
* at 1 in flight, ``latency_path``: each proposal's critical path cut at the instants the
  stages give (all three processes read the same ``CLOCK_MONOTONIC`` through
  ``time.perf_counter()``, so instants of different processes compare on one machine):

  ``queue`` (propose -> the run loop takes it), ``leader_turn`` (-> the append handed to the
  follower's lane), ``leader_send`` (-> written to the follower's stream), ``net_out`` (->
  read and decoded by the follower), ``follower_receive`` (-> stepped by its run loop),
  ``follower_turn`` (-> its WAL call), ``follower_wal`` (the write, fsync and the thread
  hand-offs around them, until its loop resumed), ``follower_answer`` (-> its answer handed to
  its lane), ``follower_send`` (-> written), ``net_back`` (-> read by the leader),
  ``leader_receive`` (-> stepped), ``commit`` (-> applying starts), ``apply``, ``answer`` (->
  the proposer resumed). They add up to the proposal's latency exactly; the JSON line
  ``latency_total`` compares the sum of their medians with the median latency;
* ``latency_handoffs``: the transport's own part of that path (``send_handoff`` and
  ``receive_handoff`` of each message: on native lanes encoding, HTTP/2 and the socket calls,
  on grpclib lanes also a trio <-> asyncio hop each) and the trio <-> worker thread hops around
  the follower's fsync, with their medians.

Each line carries the load average at its time. Figures, not assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Any

from engine_bench import CounterFSM, percentile

Event = tuple[str, float, float]  # (stage, seconds, ended)

#: Segments of the critical path at 1 in flight, in order.
PATH = ("queue", "leader_turn", "leader_send", "net_out", "follower_receive", "follower_turn",
        "follower_wal", "follower_answer", "follower_send", "net_back", "leader_receive",
        "commit", "apply", "answer")


def loadavg() -> float:
    return round(os.getloadavg()[0], 2)


class Recorder:
    """The benchmark's engine observer: keeps every stage timing."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def wal_write(self, seconds: float) -> None:
        pass

    def proposal(self, seconds: float) -> None:
        pass

    def stage(self, stage: str, seconds: float, ended: float) -> None:
        self.events.append((stage, seconds, ended))


# -- node process ----------------------------------------------------------------------------


async def run_level(engine: Any, concurrency: int, duration: float,
                    size: int) -> list[tuple[float, float]]:
    import trio

    payload = b"x" * size
    windows: list[tuple[float, float]] = []
    deadline = trio.current_time() + duration

    async def worker() -> None:
        while trio.current_time() < deadline:
            t0 = time.perf_counter()
            try:
                await engine.propose(payload)
            except Exception:
                await trio.sleep(0.01)
                continue
            windows.append((t0, time.perf_counter()))

    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    return windows


def node_main(args: argparse.Namespace) -> None:
    import trio

    import trio_raft

    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    recorder = Recorder()

    async def main() -> None:
        from nodes import node_transport, tune_node_gc

        peers = trio_raft.parse_peers(args.peers)
        address = next(p.address for p in peers if p.id == args.name)
        levels: list[dict[str, Any]] = []
        async with node_transport(args, address) as transport, trio_raft.open_engine(
                trio_raft.OpenConfig(
                    local_id=args.name, local_address=address, data_dir=args.data_dir,
                    peers=peers, bootstrap=True, state_machine=CounterFSM(),
                    observer=recorder, transport=transport)) as engine:
            tune_node_gc(args)
            async def announce() -> None:
                while engine.state() is not trio_raft.State.LEADER:
                    await trio.sleep(0.05)
                print(json.dumps({"event": "leader", "name": args.name}), flush=True)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(announce)
                stdin = trio.wrap_file(sys.stdin)
                while True:
                    line = (await stdin.readline()).strip()
                    if line == "run":
                        await engine.propose(b"warmup")
                        await run_level(engine, 1, 0.5, args.size)  # warm the paths
                        for c in [int(x) for x in args.concurrency.split(",")]:
                            windows = await run_level(engine, c, args.duration, args.size)
                            levels.append({"concurrency": c, "windows": windows})
                        print(json.dumps({"event": "done"}), flush=True)
                    elif line.startswith("dump "):
                        with open(line[5:], "w") as f:
                            json.dump({"name": args.name, "events": recorder.events,
                                       "levels": levels}, f)
                        print(json.dumps({"event": "dumped"}), flush=True)
                    elif line in ("quit", ""):
                        nursery.cancel_scope.cancel()
                        return

    trio.run(main)


# -- analysis ----------------------------------------------------------------------------------


def ms(x: float) -> float:
    return round(x * 1000, 3)


def dist(values: list[float]) -> dict[str, Any]:
    v = sorted(values)
    return {"count": len(v), "p50_ms": ms(percentile(v, 0.5)), "p99_ms": ms(percentile(v, 0.99))}


def in_window(events: list[Event], lo: float, hi: float) -> list[Event]:
    return [e for e in events if lo <= e[2] <= hi]


def first(events: list[Event], stage: str, *, start_after: float = float("-inf"),
          end_after: float = float("-inf")) -> Event | None:
    """The earliest-ending event of ``stage`` that starts after ``start_after`` and ends after
    ``end_after``."""
    best: Event | None = None
    for e in events:
        if (e[0] == stage and e[2] - e[1] >= start_after and e[2] >= end_after
                and (best is None or e[2] < best[2])):
            best = e
    return best


def path_of(a: float, b: float, leader: list[Event],
            followers: list[list[Event]]) -> dict[str, float] | None:
    """One proposal's critical path (see the module docstring), or None when a piece is
    missing (e.g. a heartbeat round interleaved in a way the cut cannot follow)."""
    eps = 1e-4
    q = first(leader, "queue")
    send = first(leader, "send")
    if q is None or send is None:
        return None
    written = send[2]
    best: tuple[Event, list[Event]] | None = None
    for fev in followers:
        r = first(fev, "receive", start_after=written - eps)
        if r is not None and (best is None or r[2] - r[1] < best[0][2] - best[0][1]):
            best = (r, fev)
    if best is None:
        return None
    fr, fev = best
    wal = first(fev, "wal", end_after=fr[2])
    hand = first(fev, "wal_handoff", end_after=fr[2])
    if wal is None or hand is None:
        return None
    call = hand[2] - hand[1] - wal[1]
    fs = first(fev, "send", start_after=hand[2] - eps)
    if fs is None:
        return None
    lr = first(leader, "receive", start_after=fs[2] - eps)
    ap = first(leader, "apply", end_after=lr[2] if lr is not None else b)
    if lr is None or ap is None:
        return None
    ap_start = ap[2] - ap[1]
    cut = [a, q[2], written - send[1], written, fr[2] - fr[1], fr[2], call, hand[2],
           fs[2] - fs[1], fs[2], lr[2] - lr[1], lr[2], ap_start, ap[2], b]
    seg = {name: cut[i + 1] - cut[i] for i, name in enumerate(PATH)}
    seg["_handoffs"] = sum(e[1] for e in (
        first(leader, "send_handoff"), first(fev, "receive_handoff", end_after=fr[2] - fr[1]),
        hand, first(fev, "send_handoff", start_after=hand[2] - eps),
        first(leader, "receive_handoff", end_after=lr[2] - lr[1])) if e is not None)
    seg["_leader_wal"] = sum(e[1] for e in (first(leader, "wal"), first(leader, "wal_handoff"))
                             if e is not None)
    return seg


def analyse(dumps: dict[str, dict[str, Any]], leader_name: str) -> list[dict[str, Any]]:
    leader = dumps[leader_name]
    lev: list[Event] = [tuple(e) for e in leader["events"]]  # type: ignore[misc]
    fevs: list[list[Event]] = [[tuple(e) for e in d["events"]]  # type: ignore[misc]
                               for n, d in dumps.items() if n != leader_name]
    out: list[dict[str, Any]] = []
    for level in leader["levels"]:
        c = level["concurrency"]
        windows = [tuple(w) for w in level["windows"]]
        if not windows:
            continue
        lo, hi = windows[0][0], windows[-1][1]
        for role, evs in (("leader", lev), ("followers", [e for f in fevs for e in f])):
            sel = in_window(evs, lo, hi)
            for stage in sorted({e[0] for e in sel}):
                out.append({"bench": "latency_stage", "concurrency": c, "role": role,
                            "stage": stage, **dist([e[1] for e in sel if e[0] == stage])})
        lat = [b - a for a, b in windows]
        total = {"bench": "latency_total", "concurrency": c,
                 "proposals_per_s": round(len(windows) / (hi - lo), 1), **dist(lat)}
        if c == 1:
            paths = []
            for a, b in windows:
                p = path_of(a, b, in_window(lev, a, b), [in_window(f, a, b) for f in fevs])
                if p is not None:
                    paths.append(p)
            p50_total = percentile(sorted(lat), 0.5)
            seg_sum = 0.0
            for name in PATH:
                d = dist([p[name] for p in paths])
                seg_sum += d["p50_ms"]
                out.append({"bench": "latency_path", "concurrency": 1, "segment": name, **d,
                            "share_of_p50": round(d["p50_ms"] / (p50_total * 1000), 3)
                            if p50_total else None})
            out.append({"bench": "latency_handoffs", "concurrency": 1,
                        "on_path": dist([p["_handoffs"] for p in paths]),
                        "leader_own_wal_and_handoff": dist([p["_leader_wal"] for p in paths])})
            total["sum_of_segment_p50s_ms"] = round(seg_sum, 3)
            total["paths_cut"] = len(paths)
        out.append(total)
    return out


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| segment | p50 ms | p99 ms | share of p50 |", "|---|---:|---:|---:|"]
    for r in rows:
        if r["bench"] == "latency_path":
            share = r["share_of_p50"]
            lines.append(f"| {r['segment']} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | "
                         f"{share * 100:.0f} % |" if share is not None else "")
    for r in rows:
        if r["bench"] == "latency_total" and r["concurrency"] == 1:
            lines.append(f"| **proposal** | **{r['p50_ms']:.3f}** | **{r['p99_ms']:.3f}** | "
                         f"(sum of p50s {r.get('sum_of_segment_p50s_ms')}) |")
    return "\n".join(lines)


# -- orchestration ------------------------------------------------------------------------------


def run_once(args: argparse.Namespace) -> list[dict[str, Any]]:
    from nodes import NAMES, NodeProcesses, node_arguments

    extra = [*node_arguments(args), "--switch-interval", str(args.switch_interval)]
    with NodeProcesses(__file__, extra, prefix="trio-raft-latency-", parent=args.dir,
                       grace=5.0) as nodes:
        leader = nodes.leader()
        nodes.command(leader, "run")
        budget = 60 + len(args.concurrency.split(",")) * (args.duration + 30)
        if not nodes.wait_for(leader, '"event": "done"', budget):
            raise SystemExit("benchmark did not finish in time")
        dumps: dict[str, dict[str, Any]] = {}
        for n in NAMES:
            path = os.path.join(nodes.base, f"events-{n}.json")
            nodes.command(n, f"dump {path}")
            if not nodes.wait_for(n, '"event": "dumped"', 60):
                raise SystemExit(f"{n} did not write its records")
            with open(path) as f:
                dumps[n] = json.load(f)
        for n in NAMES:
            nodes.command(n, "quit")
        return analyse(dumps, leader)


def orchestrate(args: argparse.Namespace) -> None:
    print(json.dumps({
        "event": "machine", "python": platform.python_version(), "cpus": os.cpu_count(),
        "platform": platform.platform(), "loadavg": loadavg(),
        "switch_interval": args.switch_interval or sys.getswitchinterval(),
    }), flush=True)
    last: list[dict[str, Any]] = []
    for run in range(args.runs):
        rows = run_once(args)
        for r in rows:
            print(json.dumps({**r, "run": run + 1, "loadavg": loadavg()}), flush=True)
        last = rows
    print()
    print(table(last), flush=True)


def main() -> None:
    from nodes import add_node_arguments

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_node_arguments(ap, concurrency="1")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--switch-interval", type=float, default=0.0,
                    help="sys.setswitchinterval in the node processes (0: the default)")
    args = ap.parse_args()
    if args.mode == "node":
        node_main(args)
    else:
        orchestrate(args)


if __name__ == "__main__":
    main()
