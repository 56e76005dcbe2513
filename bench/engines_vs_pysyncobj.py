"""Raft against raft: trio_raft's engine and PySyncObj, proposals made inside the leader process.

    python bench/engines_vs_pysyncobj.py [--duration 10] [--concurrency 1,64,1024] [--size 100]

``bench/vs_pysyncobj.py`` measures both systems through the same client RPC front end, whose
per-call cost caps what any system can show there. This script takes the front end away: each
system runs as 3 OS processes on loopback, and ``c`` concurrent proposals of ``--size`` bytes are
made inside the leader process for a fixed duration, each followed by the next when it is
acknowledged.

* trio_raft: ``bench/engine_bench.py`` (``engine.propose`` from ``c`` trio tasks; acknowledged =
  committed by a quorum with the WAL fsynced on each, and applied on the leader).
* PySyncObj (its own venv, as in vs_pysyncobj.py): a ``ReplDict`` whose ``set`` is called with a
  callback; ``c`` chains, each issuing its next ``set`` from the previous one's callback
  (acknowledged = PySyncObj reported the command applied; its log is in memory, no fsync).

Prints one JSON line per system and setting (ops/s, p50/p99 ms), then a table. Figures, not
assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from typing import IO, Any

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)


# -- the PySyncObj node (runs under the PySyncObj venv's python) ---------------------------------

def pysyncobj_driver(args: argparse.Namespace) -> None:
    """One PySyncObj node; the one that becomes leader runs the workload when told to."""
    from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf
    from pysyncobj.batteries import ReplDict

    peers = dict(item.split("=", 1) for item in args.peers.split(","))
    store = ReplDict()
    sync = SyncObj(peers[args.id], [a for n, a in peers.items() if n != args.id],
                   consumers=[store], conf=SyncObjConf(dynamicMembershipChange=False))
    while not sync._isLeader():
        if sys.stdin.closed:
            return
        time.sleep(0.05)
        if sync._getLeader() is not None and not sync._isLeader():
            # A follower: serve until the orchestrator closes our stdin.
            sys.stdin.read()
            sync.destroy()
            return
    print(json.dumps({"event": "leader", "id": args.id}), flush=True)
    if sys.stdin.readline().strip() != "run":
        sync.destroy()
        return
    value = os.urandom(args.size)
    warm = threading.Event()
    store.set("warmup", value, callback=lambda _r, _e: warm.set())
    warm.wait(30)
    for c in (int(x) for x in args.concurrency.split(",")):
        print(json.dumps(_pysyncobj_level(store, FAIL_REASON.SUCCESS, c, args.duration, value)),
              flush=True)
    print(json.dumps({"event": "done"}), flush=True)
    sys.stdin.read()
    sync.destroy()


def _pysyncobj_level(store: Any, success: int, concurrency: int, duration: float,
                     value: bytes) -> dict[str, Any]:
    latencies: list[float] = []
    errors = [0]
    running = [concurrency]
    finished = threading.Event()
    lock = threading.Lock()
    end = time.perf_counter() + duration

    def issue(chain: int, n: int) -> None:
        t0 = time.perf_counter()

        def done(_result: Any, err: int) -> None:  # PySyncObj's thread
            now = time.perf_counter()
            if err == success:
                latencies.append(now - t0)
            else:
                errors[0] += 1
            if now < end:
                issue(chain, n + 1)
                return
            with lock:
                running[0] -= 1
                if running[0] == 0:
                    finished.set()

        store.set(f"k{chain}-{n}", value, callback=done)

    t_start = time.perf_counter()
    for chain in range(concurrency):
        issue(chain, 0)
    finished.wait(duration + 60)
    elapsed = time.perf_counter() - t_start
    latencies.sort()
    return level_row("pysyncobj", concurrency, latencies, errors[0], elapsed, fsync=False)


def level_row(system: str, concurrency: int, latencies: list[float], errors: int,
              elapsed: float, fsync: bool) -> dict[str, Any]:
    def pct(q: float) -> float:
        if not latencies:
            return 0.0
        return latencies[min(len(latencies) - 1, round(q * (len(latencies) - 1)))] * 1000

    return {"bench": "engines_vs_pysyncobj", "system": system, "nodes": 3, "fsync": fsync,
            "concurrency": concurrency, "ops": len(latencies), "errors": errors,
            "seconds": round(elapsed, 2), "ops_per_s": round(len(latencies) / elapsed, 1),
            "p50_ms": round(pct(0.50), 3), "p99_ms": round(pct(0.99), 3)}


# -- orchestration -------------------------------------------------------------------------------

def run_pysyncobj(args: argparse.Namespace, py: str) -> list[dict[str, Any]]:
    from trio_raft.testing.net import free_loopback_ports

    names = ["n1", "n2", "n3"]
    peers = ",".join(f"{n}=127.0.0.1:{p}" for n, p in zip(names, free_loopback_ports(3)))
    procs = {n: subprocess.Popen(
        [py, os.path.abspath(__file__), "pysyncobj-driver", "--id", n, "--peers", peers,
         "--duration", str(args.duration), "--concurrency", args.concurrency,
         "--size", str(args.size)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=BENCH) for n in names}
    lines: dict[str, list[str]] = {n: [] for n in names}
    cond = threading.Condition()

    def reader(name: str, stream: IO[str]) -> None:
        for line in stream:
            with cond:
                lines[name].append(line.strip())
                cond.notify_all()

    for n, p in procs.items():
        threading.Thread(target=reader, args=(n, p.stdout), daemon=True).start()
    rows: list[dict[str, Any]] = []
    try:
        with cond:
            if not cond.wait_for(lambda: any('"leader"' in x for v in lines.values() for x in v),
                                 timeout=60):
                raise SystemExit("PySyncObj elected no leader within 60 s")
            leader = next(n for n, v in lines.items() if any('"leader"' in x for x in v))
        stdin = procs[leader].stdin
        assert stdin is not None
        stdin.write("run\n")
        stdin.flush()
        budget = len(args.concurrency.split(",")) * (args.duration + 90)
        with cond:
            if not cond.wait_for(lambda: any('"done"' in x for x in lines[leader]),
                                 timeout=budget):
                raise SystemExit("PySyncObj workload did not finish in time")
            rows = _rows(lines[leader])
        for row in rows:
            print(json.dumps(row), flush=True)
    finally:
        for p in procs.values():
            if p.stdin is not None and not p.stdin.closed:
                p.stdin.close()
        for p in procs.values():
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    return rows


def _rows(lines: list[str]) -> list[dict[str, Any]]:
    return [json.loads(x) for x in lines if '"bench"' in x]


def run_trio_raft(args: argparse.Namespace) -> list[dict[str, Any]]:
    out = subprocess.run(
        [sys.executable, os.path.join(BENCH, "engine_bench.py"), "--duration",
         str(args.duration), "--concurrency", args.concurrency, "--size", str(args.size)],
        capture_output=True, text=True, check=True, cwd=ROOT)
    rows = []
    for line in out.stdout.splitlines():
        if '"bench"' not in line:
            continue
        r = json.loads(line)
        row = {"bench": "engines_vs_pysyncobj", "system": "trio_raft", "nodes": 3,
               "fsync": True, "concurrency": r["concurrency"], "ops": r["proposals"],
               "errors": r["errors"], "seconds": r["seconds"], "ops_per_s": r["proposals_per_s"],
               "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"]}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    by = {(r["system"], r["concurrency"]): r for r in rows}
    out = ["| in flight | trio_raft ops/s | p50 / p99 ms | PySyncObj ops/s | p50 / p99 ms "
           "| throughput ratio | p50 ratio |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for c in sorted({r["concurrency"] for r in rows}):
        t, p = by.get(("trio_raft", c)), by.get(("pysyncobj", c))
        if t is None or p is None:
            continue
        tr = t["ops_per_s"] / p["ops_per_s"] if p["ops_per_s"] else float("inf")
        lr = p["p50_ms"] / t["p50_ms"] if t["p50_ms"] else float("inf")
        out.append(f"| {c} | {t['ops_per_s']:.0f} | {t['p50_ms']:.2f} / {t['p99_ms']:.2f} | "
                   f"{p['ops_per_s']:.0f} | {p['p50_ms']:.2f} / {p['p99_ms']:.2f} | "
                   f"{tr:.2f}x | {lr:.1f}x lower |")
    return "\n".join(out)


def orchestrate(args: argparse.Namespace) -> None:
    from vs_pysyncobj import prepare

    py = prepare(args.duration)
    rows = run_trio_raft(args) + run_pysyncobj(args, py)
    print()
    print(table(rows), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", nargs="?", default="run", choices=["run", "pysyncobj-driver"])
    ap.add_argument("--id")
    ap.add_argument("--peers")
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--concurrency", default="1,64,1024")
    ap.add_argument("--size", type=int, default=100)
    args = ap.parse_args()
    if args.mode == "pysyncobj-driver":
        pysyncobj_driver(args)
    else:
        orchestrate(args)


if __name__ == "__main__":
    main()
