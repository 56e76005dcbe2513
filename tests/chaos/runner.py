"""One chaos run: start a cluster behind the proxy, run clients and a fault schedule, then heal
and check.

Checks after the run (each failure is listed in :attr:`Report.problems`):

1. the recorded history, plus a final linearizable read of every key, is linearizable;
2. every node converges: same commit and applied index, same values for every key (LOCAL reads
   on each node, after a barrier write went through the leader);
3. every acknowledged ``d/<n>`` write is present on every node;
4. every node's data dir reopens cleanly after kill -9 of the whole cluster: its WAL, snapshot
   and ``.fsm`` files are opened with ``open_disk_state`` in a subprocess and the recovered
   state (snapshot plus the committed WAL entries after it) equals the converged one; then every
   node is restarted and must become healthy and keep the same state.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import time
from typing import Any

import attrs
import trio

from tests.chaos.cluster import ROOT, ChaosError, Cluster
from tests.chaos.nemesis import KINDS, Fault, Nemesis, churn, make_schedule
from tests.chaos.proxy import Proxy
from tests.chaos.workload import History, Workload
from trio_raft.testing.linearizability import GET, OK, Op, check
from trio_raft.transport.bridge import AsyncioBridge
from trio_raft_kv._proto.trio_raft.kv import v1 as pb


@attrs.frozen
class RunConfig:
    seed: int
    nodes: int = 3
    faults: int = 8
    duration: float | None = None  # seconds: keep drawing faults until then (soak)
    clients: int = 6
    keys: int = 5
    scale: float = 1.0  # hold/quiet durations multiplier
    kinds: tuple[str, ...] = KINDS
    snapshot_every: int = 300
    keep_dir: str | None = None
    store: str = "memory"  # kvnode serve --store


@attrs.define
class Report:
    seed: int
    nodes: int
    ops: int = 0
    op_counts: dict[str, int] = attrs.field(factory=dict)
    faults: dict[str, int] = attrs.field(factory=dict)
    schedule: list[str] = attrs.field(factory=list)
    durable_acked: int = 0
    linearizable: bool = False
    check_seconds: float = 0.0
    converged: bool = False
    reopened: bool = False
    problems: list[str] = attrs.field(factory=list)
    explanation: str = ""
    seconds: float = 0.0
    applied_index: int = 0
    root: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> dict[str, Any]:
        return {"seed": self.seed, "nodes": self.nodes, "ok": self.ok, "ops": self.ops,
                "op_counts": self.op_counts, "faults": self.faults,
                "durable_acked": self.durable_acked, "linearizable": self.linearizable,
                "check_seconds": round(self.check_seconds, 3), "converged": self.converged,
                "reopened": self.reopened, "applied_index": self.applied_index,
                "seconds": round(self.seconds, 1), "problems": self.problems}


async def run_chaos(cfg: RunConfig) -> Report:
    report = Report(cfg.seed, cfg.nodes)
    t0 = time.monotonic()
    root = cfg.keep_dir or tempfile.mkdtemp(prefix=f"chaos-{cfg.seed}-")
    os.makedirs(root, exist_ok=True)
    report.root = root
    names = [f"n{i + 1}" for i in range(cfg.nodes)]
    rng = random.Random(f"run-{cfg.seed}")
    history = History()
    async with AsyncioBridge(name="chaos-clients") as bridge, Proxy() as proxy:
        cluster = Cluster(root, names, proxy, bridge, snapshot_every=cfg.snapshot_every,
                          store=cfg.store)
        try:
            await cluster.setup()
            for n in names:
                await cluster.start(n)
            await cluster.wait_leader(90)
            workload = Workload(cluster, history, rng, clients=cfg.clients, keys=cfg.keys)
            nemesis = Nemesis(cluster, rng)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(workload.run)
                await _run_schedule(cfg, nemesis, report)
                workload.stop.set()
            report.faults = dict(sorted(nemesis.counts.items()))
            await _final_checks(cfg, cluster, history, report)
        except ChaosError as exc:
            report.problems.append(f"liveness: {exc}")
        finally:
            await cluster.aclose()
            _write_events(root, cluster, report)
            _write_history(root, history)
    report.ops = len(history.ops)
    report.op_counts = dict(sorted(history.counts.items()))
    report.durable_acked = len(history.durable_acked)
    report.seconds = time.monotonic() - t0
    if history.wrong_status:
        report.problems.append(f"unexpected statuses: {history.wrong_status[:5]}")
    return report


async def _run_schedule(cfg: RunConfig, nemesis: Nemesis, report: Report) -> None:
    await trio.sleep(1.0 * cfg.scale)  # let the clients run fault-free first
    if cfg.duration is None:
        schedule = make_schedule(cfg.seed, cfg.nodes, cfg.faults, cfg.scale, cfg.kinds)
    else:
        schedule = make_schedule(cfg.seed, cfg.nodes, 100_000, cfg.scale, cfg.kinds)
    deadline = trio.current_time() + (cfg.duration or 0)
    for fault in schedule:
        if cfg.duration is not None and trio.current_time() > deadline:
            break
        report.schedule.append(fault.describe())
        await nemesis.run(fault)


async def _heal_everything(cluster: Cluster) -> None:
    cluster.proxy.heal_all()
    for name in cluster.names:
        cluster.resume(name)
        cluster.set_disk_delay_file(cluster.nodes[name], 0.0)
    for name in cluster.names:
        if not cluster.nodes[name].alive():
            await cluster.start(name)
    await cluster.wait_leader(90)
    members = await cluster.members()
    for name in cluster.names:
        if members.get(name) != "voter":  # a churn cut short: finish bringing it back
            cluster.log(f"final heal: {name} is {members.get(name)!r}, re-adding")
            await churn(cluster, name)


async def _final_checks(cfg: RunConfig, c: Cluster, history: History, report: Report) -> None:
    await _heal_everything(c)
    # A barrier write through the leader; then every node must reach the same indexes.
    barrier = await c.admin("barrier write", "put", "barrier", b"done", timeout=90)
    target = barrier.index
    keys = [f"k{i}" for i in range(cfg.keys)]

    async def converged() -> dict[str, Any] | None:
        sts = {n: await c.status(n) for n in c.names}
        if any(s is None for s in sts.values()):
            return None
        applied = {s.applied_index for s in sts.values()}
        commits = {s.commit_index for s in sts.values()}
        if len(applied) == 1 and applied == commits and min(applied) >= target:
            return sts
        return None

    sts = await c.wait_for("all nodes to converge", converged, 120)
    report.applied_index = next(iter(sts.values())).applied_index
    # LOCAL reads on every node, and final linearizable reads (part of the history).
    values = await _local_values(c, keys)
    first = values[c.names[0]]
    report.converged = all(v == first for v in values.values())
    if not report.converged:
        report.problems.append(f"nodes disagree on values: {values}")
    for k in keys:
        t0 = time.monotonic()
        got = await _linearizable_get(c, k)
        history.add(Op(-1, GET, k, t0, time.monotonic(), OK, result=got))
        if got != first.get(k):
            report.problems.append(f"final read of {k}: {got!r}, LOCAL {first.get(k)!r}")
    result = check(history.ops)
    report.linearizable = result.ok
    report.check_seconds = result.seconds
    if not result.ok:
        report.explanation = result.explain()
        report.problems.append("history is not linearizable")
    # Reopen every data dir after kill -9 of everyone.
    for n in c.names:
        await c.kill(n)
    dumps = {}
    for n in c.names:
        dump = await trio.to_thread.run_sync(_dump_data_dir, c.nodes[n].data_dir)
        if "error" in dump:
            report.problems.append(f"{n}: data dir does not reopen: {dump['error']}")
            continue
        dumps[n] = dump
    expected = {k: v.hex() for k, v in first.items() if v is not None}
    for n, dump in dumps.items():
        data = dump["data"]
        if dump["commit"] < target:
            report.problems.append(f"{n}: recovered commit {dump['commit']} < barrier {target}")
            continue
        for k, v in expected.items():
            if data.get(k) != v:
                report.problems.append(f"{n}: recovered {k}={data.get(k)!r}, expected {v!r}")
        for k in keys:
            if k not in expected and k in data:
                report.problems.append(f"{n}: recovered {k} present, expected absent")
        missing = [k for k, v in history.durable_acked.items() if data.get(k) != v.hex()]
        if missing:
            report.problems.append(f"{n}: {len(missing)} acknowledged writes missing, e.g. "
                                   f"{missing[:5]}")
        invented = [k for k in data if k.startswith("d/") and k not in history.durable_acked
                    and k not in history.durable_unknown]
        if invented:
            report.problems.append(f"{n}: writes nobody made: {invented[:5]}")
    if len({json.dumps(d["data"], sort_keys=True) for d in dumps.values()}) > 1:
        report.problems.append("recovered states differ between nodes")
    # Restart everyone: all must come back healthy with the same state.
    for n in c.names:
        await c.start(n)
    await c.wait_leader(90)

    async def healthy() -> bool:
        sts = [await c.status(n) for n in c.names]
        return all(s is not None and s.applied_index >= report.applied_index for s in sts)

    await c.wait_for("every node healthy after restart", healthy, 120)
    again = await _local_values(c, keys)
    if any(v != first for v in again.values()):
        report.problems.append(f"values changed across restart: {again} vs {first}")
    report.reopened = not any("reopen" in p or "recovered" in p for p in report.problems)


async def _linearizable_get(c: Cluster, key: str) -> bytes | None:
    async def attempt() -> tuple[bytes | None] | None:
        leader = await c.leader()
        if leader is None:
            return None
        from trio_raft_kv.client import KV, KVError

        try:
            r = await c.rpc(c.client.call_at, c.nodes[leader].address, KV + "Get",
                            pb.GetRequest(key=key, mode=pb.ReadMode.LINEARIZABLE),
                            pb.GetResponse)
        except KVError:
            return None
        return (r.value if r.found else None,)

    return (await c.wait_for(f"a linearizable read of {key}", attempt, 60))[0]


async def _local_values(c: Cluster, keys: list[str]) -> dict[str, dict[str, bytes | None]]:
    from trio_raft_kv.client import KV

    out: dict[str, dict[str, bytes | None]] = {}
    for n in c.names:
        vals: dict[str, bytes | None] = {}
        for k in keys:
            r = await c.rpc(c.client.call_at, c.nodes[n].address, KV + "Get",
                            pb.GetRequest(key=k, mode=pb.ReadMode.LOCAL), pb.GetResponse)
            vals[k] = r.value if r.found else None
        out[n] = vals
    return out


_DUMP = r"""
import json, sys
from trio_raft_kv.statemachine import KVStateMachine
from trio_raft.core.messages import EntryType
from trio_raft.engine.contexts import decode_proposal
from trio_raft.storage.recovery import open_disk_state
fsm = KVStateMachine()
disk = open_disk_state(sys.argv[1], [], False, fsm)
try:
    commit = disk.hard_state.commit
    for e in disk.entries:
        if disk.applied_index < e.index <= commit and e.type is EntryType.NORMAL:
            env = decode_proposal(e.data)
            if env is not None:
                fsm.apply(env[1])
    print(json.dumps({"applied": disk.applied_index, "commit": commit,
                      "entries": len(disk.entries),
                      "data": {k: v.hex() for k, v in fsm.data.items()}}))
finally:
    disk.persistence.close()
"""


def _dump_data_dir(data_dir: str) -> dict[str, Any]:
    r = subprocess.run([sys.executable, "-c", _DUMP, data_dir],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    if r.returncode != 0:
        return {"error": r.stderr.strip().splitlines()[-1:] or [f"exit {r.returncode}"]}
    out: dict[str, Any] = json.loads(r.stdout)
    return out


def _write_history(root: str, history: History) -> None:
    with open(os.path.join(root, "history.jsonl"), "w") as f:
        for op in history.ops:
            f.write(json.dumps(op_to_json(op)) + "\n")


def op_to_json(op: Op) -> dict[str, Any]:
    def enc(v: Any) -> Any:
        if isinstance(v, bytes):
            return {"b": v.hex()}
        if isinstance(v, tuple):
            return [enc(x) for x in v]
        return v

    return {"p": op.process, "f": op.kind, "k": op.key, "t0": op.invoke, "t1": op.complete,
            "s": op.status, "v": enc(op.value), "e": enc(op.expected), "r": enc(op.result)}


def op_from_json(d: dict[str, Any]) -> Op:
    def dec(v: Any) -> Any:
        if isinstance(v, dict):
            return bytes.fromhex(v["b"])
        if isinstance(v, list):
            return tuple(dec(x) for x in v)
        return v

    return Op(d["p"], d["f"], d["k"], d["t0"], d["t1"], d["s"], dec(d["v"]), dec(d["e"]),
              dec(d["r"]))


def _write_events(root: str, cluster: Cluster, report: Report) -> None:
    with open(os.path.join(root, "events.log"), "w") as f:
        f.write("\n".join(cluster.events) + "\n")
        f.write(json.dumps(report.summary(), indent=1) + "\n")
        if report.explanation:
            f.write(report.explanation + "\n")


__all__ = ["Fault", "Report", "RunConfig", "run_chaos"]
