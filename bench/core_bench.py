"""Throughput of the sans-IO core alone: a 3-node in-process cluster, no I/O.

Messages are handed straight to the destination's ``step``; each Ready is "persisted" into a
MemoryStorage. Each cycle proposes ``batch`` 100-byte entries at the leader, then handles Readys
and delivers messages until the cluster is quiet. Prints one JSON line per batch size:
entries committed (and applied on the leader) per second.

    python bench/core_bench.py [--entries N] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import random
import time

from trio_raft.core.messages import (
    ConfState,
    Entry,
    HardState,
    Snapshot,
    SnapshotMetadata,
    StateType,
)
from trio_raft.core.raft import Config
from trio_raft.core.rawnode import RawNode
from trio_raft.core.storage import MemoryStorage

PAYLOAD = b"x" * 100


class Bench:
    def __init__(self) -> None:
        ids = (1, 2, 3)
        self.storages: dict[int, MemoryStorage] = {}
        self.nodes: dict[int, RawNode] = {}
        for i in ids:
            s = MemoryStorage()
            s.apply_snapshot(Snapshot(SnapshotMetadata(ConfState(voters=ids), 1, 1)))
            s.set_hard_state(HardState(term=1, commit=1))
            self.storages[i] = s
            self.nodes[i] = RawNode(Config(id=i, storage=s, rng=random.Random(i),
                                           max_inflight_msgs=256))
        self.applied = 0
        self.nodes[1].campaign()
        self.settle()
        assert self.nodes[1].raft.state is StateType.LEADER

    def settle(self) -> None:
        nodes, storages = self.nodes, self.storages
        pending = True
        while pending:
            pending = False
            for i, node in nodes.items():
                if not node.has_ready():
                    continue
                pending = True
                rd = node.ready()
                st = storages[i]
                if rd.entries:
                    st.append(rd.entries)
                if rd.hard_state is not None:
                    st.set_hard_state(rd.hard_state)
                if i == 1:
                    self.applied += len(rd.committed_entries)
                node.advance(rd)
                for m in rd.messages:
                    nodes[m.to].step(m)

    def run(self, total: int, batch: int, *, one_call: bool = False) -> float:
        leader = self.nodes[1]
        start_applied = self.applied
        t0 = time.perf_counter()
        for _ in range(total // batch):
            if one_call:
                # As the engine proposes: everything waiting in one call.
                leader.propose_entries([Entry(0, 0, data=PAYLOAD) for _ in range(batch)])
            else:
                for _ in range(batch):
                    leader.propose(PAYLOAD)
            self.settle()
        dt = time.perf_counter() - t0
        done = self.applied - start_applied
        assert done == (total // batch) * batch, (done, total)
        return done / dt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--entries", type=int, default=64_000)
    p.add_argument("--profile", action="store_true")
    args = p.parse_args()
    for batch, one_call in ((1, False), (64, False), (64, True)):
        total = args.entries // (8 if batch == 1 else 1)
        b = Bench()
        b.run(min(total, 2000), batch, one_call=one_call)  # warm up
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
        rate = b.run(total, batch, one_call=one_call)
        if args.profile:
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(15)
        print(json.dumps({"bench": "core_commit", "nodes": 3, "entry_bytes": len(PAYLOAD),
                          "batch": batch,
                          "proposal_calls": "propose_entries" if one_call else "propose",
                          "entries": total, "entries_per_sec": round(rate)}))


if __name__ == "__main__":
    main()
