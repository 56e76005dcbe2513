"""Leader lease bookkeeping: when did a quorum of followers last answer us (spec b.6)?

Times are trio clock instants (``trio.current_time()``), so leases follow MockClock in tests.
"""

from __future__ import annotations


class QuorumAckTracker:
    """Records the last response time of each voter follower and publishes the instant by which
    a quorum of them had answered: the ``q``-th most recent ack, ``q = voters // 2``."""

    __slots__ = ("_acks", "published")

    def __init__(self) -> None:
        self._acks: dict[int, float] = {}
        self.published: float | None = None

    def record(self, node_id: int, now: float, voter_count: int) -> None:
        self._acks[node_id] = now
        self._recompute(voter_count // 2)

    def _recompute(self, quorum: int) -> None:
        if quorum <= 0 or len(self._acks) < quorum:
            self.published = None
            return
        times = sorted(self._acks.values(), reverse=True)
        self.published = times[quorum - 1]

    def remove_peer(self, node_id: int, voter_count_after: int) -> None:
        self._acks.pop(node_id, None)
        if voter_count_after <= 1:
            self.reset()
            return
        q = voter_count_after // 2
        if q <= 0:
            return  # keep the published instant (spec: removal with q <= 0)
        self._recompute(q)

    def reset(self) -> None:
        self._acks.clear()
        self.published = None
