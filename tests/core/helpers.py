"""Small synchronous harness around core RawNodes for unit tests.

``Cluster`` wires RawNodes over MemoryStorages and delivers messages instantly (FIFO), with
optional filters to drop or cut links. ``drain`` handles Readys the way the engine does.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterable

from trio_raft.core.errors import ConfChangeError, StepPeerNotFoundError
from trio_raft.core.messages import (
    ConfChange,
    ConfState,
    Entry,
    EntryType,
    HardState,
    Message,
    MessageType,
    ReadState,
    Snapshot,
    SnapshotMetadata,
    StateType,
)
from trio_raft.core.raft import Config
from trio_raft.core.rawnode import RawNode
from trio_raft.core.storage import MemoryStorage

MT = MessageType


def boot_storage(voters: Iterable[int], learners: Iterable[int] = ()) -> MemoryStorage:
    """A storage bootstrapped with a snapshot at index 1, term 1 holding the configuration."""
    s = MemoryStorage()
    s.apply_snapshot(
        Snapshot(SnapshotMetadata(ConfState(voters=tuple(voters), learners=tuple(learners)), 1, 1))
    )
    s.set_hard_state(HardState(term=1, commit=1))
    return s


def new_node(
    node_id: int, storage: MemoryStorage, seed: int = 0, **kw: object
) -> RawNode:
    kw.setdefault("election_tick", 10)
    kw.setdefault("heartbeat_tick", 1)
    cfg = Config(id=node_id, storage=storage, rng=random.Random(seed * 1000 + node_id), **kw)  # type: ignore[arg-type]
    return RawNode(cfg)


class Cluster:
    def __init__(
        self,
        n: int = 3,
        *,
        learners: Iterable[int] = (),
        storages: dict[int, MemoryStorage] | None = None,
        **kw: object,
    ) -> None:
        learners = tuple(learners)
        ids = [i for i in range(1, n + 1) if i not in learners]
        self.storages: dict[int, MemoryStorage] = storages or {
            i: boot_storage(ids, learners) for i in range(1, n + 1)
        }
        self.nodes: dict[int, RawNode] = {
            i: new_node(i, s, **kw) for i, s in self.storages.items()
        }
        self.applied: dict[int, list[Entry]] = {i: [] for i in self.nodes}
        self.read_states: dict[int, list[ReadState]] = {i: [] for i in self.nodes}
        self.dropped: list[Message] = []
        self.cut: set[tuple[int, int]] = set()
        self.drop_types: set[MessageType] = set()
        self.filter: Callable[[Message], bool] | None = None  # return False to drop
        self.queue: list[Message] = []
        self.pending_drain()

    # -- driving ------------------------------------------------------------------------
    def drain_node(self, i: int) -> list[Message]:
        node = self.nodes[i]
        st = self.storages[i]
        out: list[Message] = []
        while node.has_ready():
            rd = node.ready()
            if rd.snapshot is not None:
                st.apply_snapshot(rd.snapshot)
            if rd.entries:
                st.append(rd.entries)
            if rd.hard_state is not None:
                st.set_hard_state(rd.hard_state)
            out.extend(rd.messages)
            for ent in rd.committed_entries:
                self.applied[i].append(ent)
                if ent.type is EntryType.CONF_CHANGE:
                    try:
                        cc = ConfChange.decode(ent.data)
                    except ConfChangeError:
                        continue
                    node.apply_conf_change(cc)
            self.read_states[i].extend(rd.read_states)
            node.advance(rd)
        return out

    def pending_drain(self) -> None:
        for i in self.nodes:
            self.queue.extend(self.drain_node(i))

    def deliver(self, limit: int = 100_000) -> None:
        """Deliver queued messages (and everything they cause) until quiet."""
        n = 0
        while self.queue and n < limit:
            n += 1
            m = self.queue.pop(0)
            if (
                m.to not in self.nodes
                or (m.from_, m.to) in self.cut
                or m.type in self.drop_types
                or (self.filter is not None and not self.filter(m))
            ):
                self.dropped.append(m)
                continue
            with contextlib.suppress(StepPeerNotFoundError):
                self.nodes[m.to].step(m)
            self.queue.extend(self.drain_node(m.to))

    def run(self, fn: Callable[[RawNode], object], i: int) -> None:
        fn(self.nodes[i])
        self.queue.extend(self.drain_node(i))
        self.deliver()

    def campaign(self, i: int) -> None:
        self.run(lambda n: n.campaign(), i)

    def propose(self, i: int, data: bytes) -> None:
        self.run(lambda n: n.propose(data), i)

    def tick(self, i: int, k: int = 1) -> None:
        for _ in range(k):
            self.run(lambda n: n.tick(), i)

    def tick_all(self, k: int = 1) -> None:
        for _ in range(k):
            for i in self.nodes:
                self.nodes[i].tick()
                self.queue.extend(self.drain_node(i))
            self.deliver()

    def isolate(self, i: int) -> None:
        for j in self.nodes:
            if j != i:
                self.cut |= {(i, j), (j, i)}

    def heal(self) -> None:
        self.cut.clear()
        self.drop_types.clear()
        self.filter = None

    # -- inspection ---------------------------------------------------------------------
    def state(self, i: int) -> StateType:
        return self.nodes[i].raft.state

    def term(self, i: int) -> int:
        return self.nodes[i].raft.term

    def leader(self) -> int | None:
        leaders = [i for i, n in self.nodes.items() if n.raft.state is StateType.LEADER]
        return max(leaders, key=lambda i: self.nodes[i].raft.term) if leaders else None

    def committed(self, i: int) -> int:
        return self.nodes[i].raft.log.committed

    def log_entries(self, i: int) -> list[Entry]:
        log = self.nodes[i].raft.log
        return log.entries(log.first_index())

    def data_applied(self, i: int) -> list[bytes]:
        return [e.data for e in self.applied[i] if e.type is EntryType.NORMAL and e.data]
