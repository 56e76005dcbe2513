"""Safety invariants of Raft, checked incrementally by the deterministic simulator.

Each check is fed events as they happen (an entry persisted, an entry applied, a node observed as
leader, a read state delivered) and keeps just enough history to detect a violation at the step
where it occurs:

* election safety: at most one leader per term, across the whole history;
* log matching: two entries with the same (index, term) carry the same payload and follow an
  entry of the same term (by induction, identical prefixes);
* leader completeness: a node that becomes leader holds every entry committed before;
* state machine safety: no two nodes apply different entries at one index, and two state
  machines at the same applied index have the same digest;
* committed entries never change: nothing persisted at a committed index ever differs from the
  committed entry, and no node's commit index goes backwards while it runs;
* reads: a read state never returns an index below an index known committed when the read was
  requested.
"""

from __future__ import annotations

from collections.abc import Callable

from trio_raft.core.errors import CompactedError, UnavailableError
from trio_raft.core.log import RaftLog
from trio_raft.core.messages import Entry, EntryType


class InvariantViolation(AssertionError):
    """A Raft safety property does not hold."""


def _key(ent: Entry) -> tuple[int, EntryType, bytes]:
    return (ent.term, ent.type, ent.data)


class Invariants:
    def __init__(self) -> None:
        self.leaders: dict[int, int] = {}  # term -> leader id
        # (index, term) -> (type, data, term of index-1 or -1 when unknown)
        self.entries: dict[tuple[int, int], tuple[EntryType, bytes, int]] = {}
        self.committed: dict[int, tuple[int, EntryType, bytes]] = {}  # index -> committed entry
        self.max_committed = 0
        self.applied: dict[int, tuple[int, EntryType, bytes]] = {}
        self.digests: dict[int, bytes] = {}  # applied index -> state machine digest

    # -- elections ----------------------------------------------------------------------
    def observe_leader(self, node_id: int, term: int) -> None:
        prev = self.leaders.setdefault(term, node_id)
        if prev != node_id:
            raise InvariantViolation(
                f"election safety: nodes {prev} and {node_id} both leader of term {term}"
            )

    def check_leader_completeness(
        self, node_id: int, term: int, log_term: Callable[[int], int | None]
    ) -> None:
        """``log_term(i)``: the new leader's term at ``i``, None when compacted (its snapshot
        covers it), -1 when the log does not reach ``i``."""
        for index, (want, _, _) in self.committed.items():
            t = log_term(index)
            if t is None:
                continue
            if t != want:
                raise InvariantViolation(
                    f"leader completeness: node {node_id} leader of term {term} has term {t} "
                    f"at committed index {index} (committed term {want})"
                )

    # -- logs ---------------------------------------------------------------------------
    def observe_persisted(
        self, node_id: int, ents: tuple[Entry, ...], prev_term: int, node_commit: int
    ) -> None:
        """Entries a node just wrote to its log; ``prev_term`` is its term at ents[0].index-1
        (-1 when unknown), ``node_commit`` the commit index it knew before. (A stale leader and
        its followers may well write other entries at indexes a newer leader committed; what
        must never happen is a node overwriting an entry it knows is committed.)"""
        for ent in ents:
            key = (ent.index, ent.term)
            rec = (ent.type, ent.data, prev_term)
            old = self.entries.get(key)
            if old is None:
                self.entries[key] = rec
            elif old[:2] != rec[:2] or (old[2] >= 0 and prev_term >= 0 and old[2] != prev_term):
                raise InvariantViolation(
                    f"log matching: node {node_id} holds a different entry at index {ent.index} "
                    f"term {ent.term}"
                )
            elif old[2] < 0 <= prev_term:
                self.entries[key] = rec
            c = self.committed.get(ent.index) if ent.index <= node_commit else None
            if c is not None and c != _key(ent):
                raise InvariantViolation(
                    f"committed entry changed: node {node_id} wrote term {ent.term} at index "
                    f"{ent.index}, committed term {c[0]}"
                )
            prev_term = ent.term

    def observe_committed(self, node_id: int, ent: Entry) -> None:
        c = self.committed.get(ent.index)
        if c is None:
            self.committed[ent.index] = _key(ent)
            self.max_committed = max(self.max_committed, ent.index)
        elif c != _key(ent):
            raise InvariantViolation(
                f"committed entry changed: node {node_id} has term {ent.term} at committed index "
                f"{ent.index}, first seen with term {c[0]}"
            )

    # -- state machines -----------------------------------------------------------------
    def observe_applied(self, node_id: int, ent: Entry, digest: bytes) -> None:
        self.observe_committed(node_id, ent)
        a = self.applied.setdefault(ent.index, _key(ent))
        if a != _key(ent):
            raise InvariantViolation(
                f"state machine safety: node {node_id} applied term {ent.term} at index "
                f"{ent.index}, another node applied term {a[0]}"
            )
        d = self.digests.setdefault(ent.index, digest)
        if d != digest:
            raise InvariantViolation(
                f"state machine safety: node {node_id} state digest differs at index {ent.index}"
            )

    def observe_restored(self, node_id: int, index: int, digest: bytes) -> None:
        d = self.digests.setdefault(index, digest)
        if d != digest:
            raise InvariantViolation(
                f"state machine safety: node {node_id} restored a snapshot at {index} whose "
                "state differs from what others applied there"
            )

    # -- reads --------------------------------------------------------------------------
    def check_read(self, node_id: int, index: int, required: int) -> None:
        if index < required:
            raise InvariantViolation(
                f"read: node {node_id} got read index {index} below {required}, which was "
                "committed before the read was requested"
            )


def log_term_of(log: RaftLog) -> Callable[[int], int | None]:
    """Term lookup over a core RaftLog: None where compacted, -1 beyond the last index."""

    def lt(index: int) -> int | None:
        try:
            return log.term(index)
        except CompactedError:
            return None
        except UnavailableError:
            return -1

    return lt
