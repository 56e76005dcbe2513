"""Leader lease: since when has a quorum of voters certainly heard from this leader?

A follower that answers a heartbeat has heard from the leader, and will not vote for anyone else
until an election timeout has passed since then (Raft thesis §6.4.1: a leader may serve reads
locally while that holds). Crediting the follower with the time its answer was *received* would
be wrong when the answer waited in a socket (the leader paused, the network slow): the follower
may have voted for someone else since. So the leader remembers when it started each ReadIndex
round (``reads.py``: user reads and, when none ran for a heartbeat interval, a lease probe),
followers echo the round's context in their heartbeat answers, and each is credited with the
round's start instant: a lower bound of when it last heard from this leader, however late the
answer arrives.

``Lease`` owns the per-voter credit (:class:`QuorumAckTracker`). The
instant it publishes, ``last_quorum_ack``, is the ``q``-th most recent credit with
``q = voters // 2`` (with the leader itself, a majority). A single voter is its own quorum: the
instant is "now" at every status refresh. Times are trio clock instants, so leases follow
MockClock in tests.
"""

from __future__ import annotations

from collections.abc import Sequence

import trio

from trio_raft.core.messages import NONE, Message, MessageType, StateType
from trio_raft.core.rawnode import RawNode


class QuorumAckTracker:
    """Records the last credit of each voter follower and publishes the instant by which a
    quorum of them had answered: the ``q``-th most recent credit, ``q = voters // 2``."""

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
            return
        self._recompute(q)

    def reset(self) -> None:
        self._acks.clear()
        self.published = None


class Lease:
    """The quorum credit of this node's leader lease (module docstring)."""

    def __init__(self, node: RawNode, node_id: int) -> None:
        self._node = node
        self._node_id = node_id
        self.acks = QuorumAckTracker()
        #: "now" at the last status refresh while this node is the only voter and leader.
        self.single_node_ack: float | None = None

    def on_heartbeat_response(self, m: Message, voter_ids: Sequence[int],
                              started_at: float | None) -> None:
        """Credit a voter that echoed, in this term, a round this leader started at
        ``started_at`` (None: not one of its rounds, no credit)."""
        if m.type is not MessageType.HEARTBEAT_RESP or started_at is None:
            return
        node = self._node
        if m.term != node.raft.term or node.raft.state is not StateType.LEADER:
            return
        if m.from_ in (NONE, self._node_id) or m.from_ not in voter_ids or len(voter_ids) <= 1:
            return
        self.acks.record(m.from_, started_at, len(voter_ids))

    def on_refresh(self, is_leader: bool, voters: int) -> None:
        self.single_node_ack = trio.current_time() if is_leader and voters <= 1 else None

    def remove_peer(self, node_id: int, voters_after: int) -> None:
        self.acks.remove_peer(node_id, voters_after)

    def reset(self) -> None:
        self.acks.reset()

    def last_quorum_ack(self) -> float | None:
        """For a leader: the instant by which a quorum last answered (None when unknown)."""
        if self.single_node_ack is not None:
            return self.single_node_ack
        return self.acks.published
