"""Leader lease bookkeeping: since when has a quorum of followers certainly heard from us?

The spec (b.6) credits a follower with the time its answer was *received*. An answer that waited
in a socket (the leader was paused, the network slow) would then refresh the lease although the
follower may have voted for someone else since. Here a follower is credited with the time the
leader *issued* the lease probe it echoes (see ``RunLoop._maybe_probe_lease``): a lower bound of
when that follower last heard from this leader, however late the answer arrives.

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

    def record(self, node_id: int, heard_by: float, voter_count: int) -> None:
        """``node_id`` certainly heard from us at or after ``heard_by`` (answers may arrive
        out of order: an older instant never replaces a newer one)."""
        prev = self._acks.get(node_id)
        if prev is None or heard_by > prev:
            self._acks[node_id] = heard_by
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
