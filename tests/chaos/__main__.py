"""``python -m tests.chaos --minutes N --seed S [--nodes 3|5]``: a long soak, one run per seed.

Each run draws faults from its seed's schedule until its share of the time is used, then heals
and checks (see tests/chaos/runner.py). Prints one JSON summary line per run and a total.
Exit code 0 when every run passed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import trio

from tests.chaos.runner import RunConfig, run_chaos


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__)
    p.add_argument("--minutes", type=float, default=5.0, help="total fault time")
    p.add_argument("--seed", type=int, default=1, help="first seed")
    p.add_argument("--seeds", type=int, default=1, help="runs, with seeds seed, seed+1, ...")
    p.add_argument("--nodes", type=int, choices=(3, 5), default=3)
    p.add_argument("--alternate-nodes", action="store_true",
                   help="alternate 3- and 5-node clusters between runs")
    p.add_argument("--clients", type=int, default=6)
    p.add_argument("--keys", type=int, default=5)
    p.add_argument("--keep-dir", default=None, help="keep data dirs and logs under this dir")
    p.add_argument("--store", choices=("memory", "sqlite"), default="memory",
                   help="the nodes' KV store (kvnode serve --store)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    per_run = args.minutes * 60 / args.seeds
    total_ops, faults, failed = 0, {}, []  # type: ignore[var-annotated]
    for i in range(args.seeds):
        seed = args.seed + i
        nodes = (3 if i % 2 == 0 else 5) if args.alternate_nodes else args.nodes
        keep = f"{args.keep_dir}/seed-{seed}" if args.keep_dir else None
        cfg = RunConfig(seed=seed, nodes=nodes, duration=per_run, clients=args.clients,
                        keys=args.keys, keep_dir=keep, store=args.store)
        print(f"== seed {seed}: {nodes} nodes ({args.store} store), {per_run:.0f}s of faults",
              flush=True)
        report = trio.run(run_chaos, cfg)
        print("SUMMARY " + json.dumps(report.summary()), flush=True)
        print("   schedule: " + "; ".join(report.schedule), flush=True)
        if report.explanation:
            print(report.explanation, flush=True)
        print(f"   data and logs: {report.root}", flush=True)
        total_ops += report.ops
        for k, v in report.faults.items():
            faults[k] = faults.get(k, 0) + v
        if not report.ok:
            failed.append(seed)
    verdict = "PASS" if not failed else f"FAIL (seeds {failed})"
    print("TOTAL " + json.dumps({"runs": args.seeds, "ops": total_ops,
                                 "faults": dict(sorted(faults.items())),
                                 "faults_total": sum(faults.values()),
                                 "seeds": list(range(args.seed, args.seed + args.seeds)),
                                 "verdict": verdict}), flush=True)
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
