"""What the leader knows of each follower: Progress (probe / replicate / snapshot) and the
Inflights window that bounds how many append messages are outstanding to one follower.

Theory of operation
-------------------
* PROBE: the leader does not know where the follower's log ends. It sends at most one append
  per heartbeat interval (``probe_sent`` pauses it) and walks ``next`` back on rejection.
* REPLICATE: the follower is known to match up to ``match``. The leader streams appends
  optimistically, advancing ``next`` as it sends; ``inflights`` caps the unacknowledged ones.
* SNAPSHOT: the follower needs entries the leader compacted. One snapshot is in flight; no
  appends go out until it is acknowledged (or reported failed) and the follower is probed again.
"""

from __future__ import annotations

import enum
from collections import deque

import attrs


class ProgressState(enum.Enum):
    PROBE = "probe"
    REPLICATE = "replicate"
    SNAPSHOT = "snapshot"


class Inflights:
    """Last indexes of the append messages sent and not yet acknowledged, oldest first."""

    __slots__ = ("_q", "capacity")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._q: deque[int] = deque()

    def add(self, index: int) -> None:
        if self.full():
            raise OverflowError("cannot add into a full inflights window")
        self._q.append(index)

    def free_le(self, index: int) -> None:
        """Free every inflight message whose last index is <= ``index``."""
        q = self._q
        while q and q[0] <= index:
            q.popleft()

    def free_first_one(self) -> None:
        if self._q:
            self._q.popleft()

    def full(self) -> bool:
        return len(self._q) >= self.capacity

    def count(self) -> int:
        return len(self._q)

    def reset(self) -> None:
        self._q.clear()


class Progress:
    __slots__ = (
        "inflights",
        "is_learner",
        "match",
        "next",
        "pending_snapshot",
        "probe_sent",
        "recent_active",
        "state",
    )

    def __init__(
        self,
        next_index: int,
        max_inflight: int,
        *,
        match: int = 0,
        is_learner: bool = False,
        recent_active: bool = False,
    ) -> None:
        self.match = match
        self.next = next_index
        self.state = ProgressState.PROBE
        self.pending_snapshot = 0
        self.recent_active = recent_active
        self.probe_sent = False
        self.inflights = Inflights(max_inflight)
        self.is_learner = is_learner

    def _reset_state(self, state: ProgressState) -> None:
        self.probe_sent = False
        self.pending_snapshot = 0
        self.state = state
        self.inflights.reset()

    def become_probe(self) -> None:
        if self.state is ProgressState.SNAPSHOT:
            pending = self.pending_snapshot
            self._reset_state(ProgressState.PROBE)
            self.next = max(self.match + 1, pending + 1)
        else:
            self._reset_state(ProgressState.PROBE)
            self.next = self.match + 1

    def become_replicate(self) -> None:
        self._reset_state(ProgressState.REPLICATE)
        self.next = self.match + 1

    def become_snapshot(self, snapshot_index: int) -> None:
        self._reset_state(ProgressState.SNAPSHOT)
        self.pending_snapshot = snapshot_index

    def maybe_update(self, n: int) -> bool:
        """Record an acknowledgement of index ``n``; True when ``match`` moved."""
        updated = False
        if self.match < n:
            self.match = n
            updated = True
            self.probe_sent = False
        if self.next < n + 1:
            self.next = n + 1
        return updated

    def sent_entries(self, last_index: int, n_entries: int) -> None:
        """Account for an append just sent (``last_index`` is its last entry's index)."""
        if self.state is ProgressState.REPLICATE:
            if n_entries:
                self.next = last_index + 1
                self.inflights.add(last_index)
        elif self.state is ProgressState.PROBE:
            self.probe_sent = True

    def maybe_decr_to(self, rejected: int, match_hint: int) -> bool:
        """Handle a rejection of the append at ``rejected``; False when the rejection is stale."""
        if self.state is ProgressState.REPLICATE:
            if rejected <= self.match:
                return False
            self.next = self.match + 1
            return True
        if self.next - 1 != rejected:
            return False
        self.next = max(min(rejected, match_hint + 1), self.match + 1, 1)
        self.probe_sent = False
        return True

    def is_paused(self) -> bool:
        if self.state is ProgressState.PROBE:
            return self.probe_sent
        if self.state is ProgressState.REPLICATE:
            return self.inflights.full()
        return True

    def info(self) -> ProgressInfo:
        return ProgressInfo(
            match=self.match,
            next=self.next,
            state=self.state,
            recent_active=self.recent_active,
            is_learner=self.is_learner,
            pending_snapshot=self.pending_snapshot,
            inflight=self.inflights.count(),
        )


@attrs.frozen(slots=True)
class ProgressInfo:
    """A read-only copy of a Progress, as exposed by ``RawNode.status()``."""

    match: int
    next: int
    state: ProgressState
    recent_active: bool
    is_learner: bool
    pending_snapshot: int = 0
    inflight: int = 0
