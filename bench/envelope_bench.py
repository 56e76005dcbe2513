"""Envelope benchmark: what encryption at rest costs (docs/benchmarks.md, docs/envelope.md).

    python bench/envelope_bench.py [--duration 5] [--concurrency 1,64,1024] [--size 100]
                                   [--snapshot-every 1000] [--snapshot-kb 1024] [--rounds 3]
                                   [--state-mb 100] [--runs 3] [--skip-cluster]

Two parts, figures only (nothing is asserted):

1. Throughput. bench/engine_bench.py's setup (3 node processes, gRPC on loopback, fsync on)
   twice: once in cleartext, once after ``enable_raft_envelope`` (every proposal wrapped with
   AES-256-GCM, unwrapped on every node's apply). In both runs every node takes a snapshot
   every ``--snapshot-every`` entries while the load runs, with a state machine whose payload
   is ``--snapshot-kb`` KiB, so with the envelope on the snapshots are *sealed* (chunked
   AES-256-GCM, ``trio_raft/envelope/stream.py``). The two modes alternate for ``--rounds``
   rounds (each round starts with the other mode than the last one); one
   ``envelope_overhead`` line per concurrency compares the medians.
2. Snapshot write and restore of a ``--state-mb`` MB state, in this process, through the same
   storage functions the engine uses (``write_fsm_snapshot_file`` with fsync, then
   ``open_and_restore_fsm_snapshot`` with the CRC checks), unsealed and sealed; the median of
   ``--runs`` runs each, and the sealed/unsealed ratio. Two state machines: ``bytes`` (1 MiB
   writes of incompressible bytes, a restore that only reads them: the cost of sealing alone)
   and ``kv`` (kvnode's in-memory store, 1 KiB values: what a restore that builds a state
   costs).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import IO, Any

HERE = os.path.dirname(os.path.abspath(__file__))

import engine_bench as eb  # noqa: E402  (a script's own directory is on the import path)

from trio_raft.gctune import GC_THRESHOLD  # noqa: E402

ENV = "TRIO_RAFT_BENCH_ENVELOPE"
KEK_ENV = "TRIO_RAFT_BENCH_KEK"
EVERY_ENV = "TRIO_RAFT_BENCH_SNAPSHOT_EVERY"
KB_ENV = "TRIO_RAFT_BENCH_SNAPSHOT_KB"


def install_node_hooks(data_dir: str, name: str, sealed: bool) -> None:
    """In a node process: snapshots every N entries with a padded payload; with ``sealed``, a
    cipher and the envelope enabled before the leader's workload starts."""
    import attrs

    import trio_raft
    from trio_raft.envelope import KEK, Cipher

    eb.CounterFSM.PAD = os.urandom(int(os.environ.get(KB_ENV, "1024")) << 10)
    every = int(os.environ.get(EVERY_ENV, "1000"))
    cipher = (Cipher.open(data_dir + "-keys", KEK.from_env(KEK_ENV), node_id=name)
              if sealed else None)
    real_config = trio_raft.OpenConfig

    def config(**kw: Any) -> Any:
        return attrs.evolve(real_config(**kw), raft_cipher=cipher, snapshot_every=every,
                            snapshot_catchup_entries=every)

    trio_raft.OpenConfig = config  # type: ignore[misc,assignment]
    if cipher is None:
        return
    real_workload = eb.run_workload

    async def workload(engine: Any, *args: Any) -> dict[str, Any]:
        await engine.enable_raft_envelope(cipher)
        return await real_workload(engine, *args)

    eb.run_workload = workload


def cluster_part(args: argparse.Namespace) -> None:
    eb.__file__ = os.path.abspath(__file__)  # the orchestrator spawns this script as nodes
    os.environ.setdefault(KEK_ENV, os.urandom(32).hex())
    os.environ[EVERY_ENV] = str(args.snapshot_every)
    os.environ[KB_ENV] = str(args.snapshot_kb)
    argv = [sys.argv[0], "--duration", str(args.duration), "--concurrency", args.concurrency,
            "--size", str(args.size), "--gc-threshold", str(args.gc_threshold)]
    results: dict[str, dict[int, list[float]]] = {}
    cpu: dict[str, dict[int, list[tuple[float, float]]]] = {}
    machine_printed = False
    for rnd in range(args.rounds):
        # Alternate which mode goes first, so neither always runs on a warmer or busier
        # machine; the medians over the rounds are compared.
        for mode in (("off", "on") if rnd % 2 == 0 else ("on", "off")):
            os.environ[ENV] = "1" if mode == "on" else "0"
            buf = io.StringIO()
            saved, sys.argv = sys.argv, argv
            try:
                with contextlib.redirect_stdout(buf):
                    eb.main()
            finally:
                sys.argv = saved
            for line in buf.getvalue().splitlines():
                rec = json.loads(line)
                if rec.get("bench"):
                    rec["envelope"], rec["round"] = mode, rnd
                    results.setdefault(mode, {}).setdefault(rec["concurrency"], []).append(
                        rec["proposals_per_s"])
                    per = rec.get("cpu_us_per_proposal", {})
                    cpu.setdefault(mode, {}).setdefault(rec["concurrency"], []).append(
                        (per.get("leader", 0.0), per.get("followers", 0.0)))
                elif machine_printed:
                    continue  # the machine line once
                machine_printed = True
                print(json.dumps(rec), flush=True)
    for conc, offs in sorted(results.get("off", {}).items()):
        ons = results.get("on", {}).get(conc)
        if not ons or not offs:
            continue
        off, on = statistics.median(offs), statistics.median(ons)
        # CPU per proposal (medians over the rounds): less moved by the machine's speed of
        # the moment than throughput, so it shows what the envelope itself adds.
        cpu_off = [statistics.median(x) for x in zip(*cpu["off"][conc])]
        cpu_on = [statistics.median(x) for x in zip(*cpu["on"][conc])]
        print(json.dumps({"bench": "envelope_overhead", "concurrency": conc,
                          "rounds": args.rounds, "snapshot_every": args.snapshot_every,
                          "snapshot_kb": args.snapshot_kb,
                          "off_per_s": off, "on_per_s": on,
                          "throughput_change_pct": round((on - off) / off * 100, 1),
                          "cpu_us_per_proposal_off": {"leader": cpu_off[0],
                                                      "followers": cpu_off[1]},
                          "cpu_us_per_proposal_on": {"leader": cpu_on[0],
                                                     "followers": cpu_on[1]},
                          "cpu_change_pct": round((sum(cpu_on) - sum(cpu_off))
                                                  / max(sum(cpu_off), 1e-9) * 100, 1)}),
              flush=True)


class _State:
    """A state machine snapshot handle writing ``mb`` MB of incompressible bytes."""

    def __init__(self, block: bytes, mb: int) -> None:
        self._block, self._mb = block, mb

    def write_to(self, w: IO[bytes]) -> int:
        for _ in range(self._mb):
            w.write(self._block)
        return self._mb * len(self._block)

    def close(self) -> None:
        pass


class _KVState:
    """kvnode's in-memory KV store with ``mb`` MB of 1 KiB values."""

    def __init__(self, mb: int) -> None:
        from trio_raft_kv.statemachine import KVStateMachine, encode_put

        self.fsm = KVStateMachine()
        value = os.urandom(1024)
        for i in range(mb * 1024):
            self.fsm.apply(encode_put(f"key-{i:08d}", value[i % 64:] + value[:i % 64]))

    def write_to(self, w: IO[bytes]) -> int:
        handle = self.fsm.snapshot()
        try:
            return int(handle.write_to(w))
        finally:
            handle.close()

    def close(self) -> None:
        pass


class _Sink:
    """Restores by reading everything (1 MiB reads), counting the bytes."""

    def __init__(self) -> None:
        self.bytes = 0

    def restore(self, reader: IO[bytes]) -> None:
        while chunk := reader.read(1 << 20):
            self.bytes += len(chunk)


def snapshot_part(args: argparse.Namespace) -> None:
    from trio_raft.envelope import KEK, Cipher

    base = tempfile.mkdtemp(prefix="envelope-bench-")
    try:
        cipher = Cipher.open(os.path.join(base, "keys"), KEK.generate(), node_id="bench")
        assert cipher.keystore is not None
        cipher.keystore.install(1, os.urandom(32))
        block = os.urandom(1 << 20)
        for state in ("bytes", "kv"):
            _snapshot_runs(args, base, cipher, state, block)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _snapshot_runs(args: argparse.Namespace, base: str, cipher: Any, state: str,
                   block: bytes) -> None:
    from trio_raft.storage import fsm_snapshot as fsm
    from trio_raft_kv.statemachine import KVStateMachine

    source: Any = _State(block, args.state_mb) if state == "bytes" else _KVState(args.state_mb)
    times: dict[str, dict[str, list[float]]] = {}
    for run in range(args.runs):
        for mode in ("unsealed", "sealed"):
            directory = os.path.join(base, f"{mode}-{run}")
            index, term = 100 + run, 3
            seal = (cipher, term) if mode == "sealed" else None
            t0 = time.perf_counter()
            crc = fsm.write_fsm_snapshot_file(source, directory, index, seal=seal)
            t1 = time.perf_counter()
            sink: Any = _Sink() if state == "bytes" else KVStateMachine()
            fsm.open_and_restore_fsm_snapshot(
                sink, fsm.fsm_snapshot_path(directory, index), crc,
                sealed=(cipher, index, term) if mode == "sealed" else None)
            t2 = time.perf_counter()
            if state == "bytes":
                assert sink.bytes == args.state_mb << 20
            else:
                assert len(sink.data) == args.state_mb * 1024
            rec = times.setdefault(mode, {"write": [], "restore": []})
            rec["write"].append(t1 - t0)
            rec["restore"].append(t2 - t1)
            shutil.rmtree(directory)
    med = {m: {k: statistics.median(v) for k, v in d.items()} for m, d in times.items()}
    for mode, d in med.items():
        print(json.dumps({"bench": "snapshot_io", "state": state, "mode": mode,
                          "state_mb": args.state_mb, "runs": args.runs,
                          "write_s": round(d["write"], 3),
                          "restore_s": round(d["restore"], 3)}), flush=True)
    print(json.dumps({
        "bench": "snapshot_io_ratio", "state": state, "state_mb": args.state_mb,
        "write_ratio": round(med["sealed"]["write"] / med["unsealed"]["write"], 2),
        "restore_ratio": round(med["sealed"]["restore"] / med["unsealed"]["restore"], 2)}),
        flush=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "node":
        argv = sys.argv
        install_node_hooks(argv[argv.index("--data-dir") + 1], argv[argv.index("--name") + 1],
                           os.environ.get(ENV) == "1")
        eb.main()
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--concurrency", default="1,64,1024")
    ap.add_argument("--size", type=int, default=100)
    ap.add_argument("--snapshot-every", type=int, default=1000)
    ap.add_argument("--snapshot-kb", type=int, default=1024)
    ap.add_argument("--state-mb", type=int, default=100)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3,
                    help="cluster runs per mode, alternating off/on; medians compared")
    ap.add_argument("--skip-cluster", action="store_true")
    ap.add_argument("--gc-threshold", type=int, default=GC_THRESHOLD,
                    help="the nodes' garbage collector young-generation threshold "
                         "(bench/engine_bench.py's option; 0: the interpreter's settings)")
    args = ap.parse_args()
    if not args.skip_cluster:
        cluster_part(args)
    snapshot_part(args)


if __name__ == "__main__":
    main()
