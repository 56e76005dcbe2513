"""The sans-IO core on its own: ``python examples/core_demo.py``.

Three Raft nodes (``trio_raft.core.RawNode``) run in one process over a simulated network, with
no trio, no files and no sockets: they elect a leader, replicate some writes, lose the leader
(it crashes), elect a new one, serve a linearizable read, and let the old leader rejoin and
catch up. Everything is deterministic (seeded); it takes well under a second. ``make demo``
runs the real thing instead: three kvnode processes (``examples/kvnode.py demo``).
"""

from __future__ import annotations

import random

from trio_raft.core.messages import (
    ConfState,
    EntryType,
    HardState,
    Message,
    Snapshot,
    SnapshotMetadata,
    StateType,
)
from trio_raft.core.raft import Config
from trio_raft.core.rawnode import RawNode
from trio_raft.core.storage import MemoryStorage

IDS = (1, 2, 3)


class DemoCluster:
    """Nodes, their "disks" (MemoryStorage), a key-value state machine each, and a network."""

    def __init__(self, seed: int = 2) -> None:
        self.rng = random.Random(seed)
        self.disks: dict[int, MemoryStorage] = {}
        self.nodes: dict[int, RawNode | None] = {}
        self.kv: dict[int, dict[str, str]] = {}
        self.inbox: list[Message] = []
        self.reads: dict[int, list[int]] = {i: [] for i in IDS}
        for i in IDS:
            disk = MemoryStorage()
            disk.apply_snapshot(Snapshot(SnapshotMetadata(ConfState(voters=IDS), 1, 1)))
            disk.set_hard_state(HardState(term=1, commit=1))
            self.disks[i] = disk
            self.start(i)

    def start(self, i: int) -> None:
        self.nodes[i] = RawNode(Config(id=i, storage=self.disks[i], heartbeat_tick=1,
                                       election_tick=10, rng=random.Random(self.rng.random())))
        self.kv[i] = {}  # re-applied from the log after a restart

    def crash(self, i: int) -> None:
        self.nodes[i] = None

    def handle_readys(self, i: int) -> None:
        node = self.nodes[i]
        while node is not None and node.has_ready():
            rd = node.ready()
            if rd.entries:
                self.disks[i].append(rd.entries)  # "fsync" before sending anything
            if rd.hard_state is not None:
                self.disks[i].set_hard_state(rd.hard_state)
            self.inbox.extend(rd.messages)
            for ent in rd.committed_entries:
                if ent.type is EntryType.NORMAL and ent.data:
                    key, _, value = ent.data.decode().partition("=")
                    self.kv[i][key] = value
            self.reads[i].extend(rs.index for rs in rd.read_states)
            node.advance(rd)

    def tick(self, n: int = 1) -> None:
        for _ in range(n):
            for i, node in self.nodes.items():
                if node is not None:
                    node.tick()
                    self.handle_readys(i)
            self.deliver()

    def deliver(self) -> None:
        while self.inbox:
            m = self.inbox.pop(0)
            node = self.nodes.get(m.to)
            if node is None:
                continue  # the destination is down: the message is lost
            node.step(m)
            self.handle_readys(m.to)

    def leader(self) -> int | None:
        for i, node in self.nodes.items():
            if node is not None and node.raft.state is StateType.LEADER:
                return i
        return None

    def wait_for_leader(self) -> tuple[int, int]:
        ticks = 0
        while (lead := self.leader()) is None:
            self.tick()
            ticks += 1
        node = self.nodes[lead]
        assert node is not None
        return lead, ticks

    def write(self, key: str, value: str) -> None:
        lead = self.leader()
        assert lead is not None
        node = self.nodes[lead]
        assert node is not None
        node.propose(f"{key}={value}".encode())
        self.handle_readys(lead)
        self.deliver()
        self.tick()  # one heartbeat round carries the new commit index to the followers


def main() -> None:
    c = DemoCluster()
    print("trio_raft core demo: 3 nodes, in-process network, deterministic clock\n")

    lead, ticks = c.wait_for_leader()
    term = c.nodes[lead].raft.term  # type: ignore[union-attr]
    print(f"1. after {ticks} ticks node {lead} won the election for term {term}")

    for k, v in [("color", "blue"), ("size", "large"), ("shape", "round")]:
        c.write(k, v)
    same = c.kv[1] == c.kv[2] == c.kv[3]
    print(f"2. the leader replicated 3 writes; every node applied them: {same}")
    for i in IDS:
        print(f"     node {i}: {c.kv[i]}")

    old = lead
    c.crash(old)
    print(f"3. node {old} (the leader) crashed")
    new, ticks = c.wait_for_leader()
    term = c.nodes[new].raft.term  # type: ignore[union-attr]
    print(f"   after {ticks} ticks node {new} was elected leader for term {term}")

    c.write("color", "green")
    color = c.kv[new]["color"]
    print(f"4. the new leader committed another write with 2 of 3 nodes: color={color}")

    reader = next(i for i in IDS if i not in (old, new))
    node = c.nodes[reader]
    assert node is not None
    node.read_index(b"read-1")
    c.handle_readys(reader)
    c.deliver()
    index = c.reads[reader][-1]
    applied = node.raft.log.applied
    print(f"5. node {reader} asked the leader for a linearizable read: read index {index}, "
          f"applied {applied} >= {index}, so its local value color={c.kv[reader]['color']} "
          "is up to date")

    c.start(old)
    c.tick(3)
    print(f"6. node {old} restarted from its disk, rejoined as a follower and caught up: "
          f"{c.kv[old]}")
    same = c.kv[1] == c.kv[2] == c.kv[3]
    print(f"\nall state machines identical: {same}")


if __name__ == "__main__":
    main()
