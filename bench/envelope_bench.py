"""Envelope benchmark: proposals/s with raft envelope wrapping off vs on.

    python bench/envelope_bench.py [--duration 5] [--concurrency 1,64,1024] [--size 100]

Runs bench/engine_bench.py's setup (3 node processes, gRPC on loopback, fsync on) twice: once
in cleartext, once after ``enable_raft_envelope`` (AES-256-GCM on every proposal, unwrap on
every node's apply). Prints the engine benchmark's JSON lines tagged with ``"envelope"`` and one
summary line per concurrency with the throughput change. Figures, not assertions.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import engine_bench as eb  # noqa: E402

ENV = "TRIO_RAFT_BENCH_ENVELOPE"
KEK_ENV = "TRIO_RAFT_BENCH_KEK"


def install_envelope_hooks(data_dir: str, name: str) -> None:
    """In a node process: give the engine a cipher, and enable the envelope before the
    leader's workload starts."""
    import attrs

    import trio_raft
    from trio_raft.envelope import KEK, Cipher

    cipher = Cipher.open(data_dir + "-keys", KEK.from_env(KEK_ENV),
                         node_id=trio_raft.derive_node_id(name))
    real_config = trio_raft.OpenConfig

    def config(**kw: Any) -> Any:
        return attrs.evolve(real_config(**kw), raft_cipher=cipher)

    trio_raft.OpenConfig = config  # type: ignore[misc,assignment]
    real_workload = eb.run_workload

    async def workload(engine: Any, *args: Any) -> dict[str, Any]:
        await engine.enable_raft_envelope(cipher)
        return await real_workload(engine, *args)

    eb.run_workload = workload


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "node":
        if os.environ.get(ENV) == "1":
            argv = sys.argv
            install_envelope_hooks(argv[argv.index("--data-dir") + 1],
                                   argv[argv.index("--name") + 1])
        eb.main()
        return
    eb.__file__ = os.path.abspath(__file__)  # the orchestrator spawns this script as nodes
    os.environ.setdefault(KEK_ENV, os.urandom(32).hex())
    results: dict[str, dict[int, float]] = {}
    for mode in ("off", "on"):
        os.environ[ENV] = "1" if mode == "on" else "0"
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            eb.main()
        for line in buf.getvalue().splitlines():
            rec = json.loads(line)
            rec["envelope"] = mode
            if rec.get("bench"):
                results.setdefault(mode, {})[rec["concurrency"]] = rec["proposals_per_s"]
            elif mode == "on":
                continue  # the machine line once
            print(json.dumps(rec), flush=True)
    for conc, off in sorted(results.get("off", {}).items()):
        on = results.get("on", {}).get(conc)
        if on is None or not off:
            continue
        print(json.dumps({"bench": "envelope_overhead", "concurrency": conc,
                          "off_per_s": off, "on_per_s": on,
                          "throughput_change_pct": round((on - off) / off * 100, 1)}),
              flush=True)


if __name__ == "__main__":
    main()
