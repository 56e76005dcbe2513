"""The published view of the node: the cached :class:`Status` and the leader edges.

``StatusView`` recomputes :class:`Status` from raft, membership and storage after every Ready
(``loop.py``); public accessors read the cached value without touching raft. It also remembers
when the leader was last heard from (``note_contact``) and owns the leader-acquired /
leader-loss callback registries.

An *edge* is a change of leadership seen between two refreshes: :meth:`refresh` returns
``Edge.ACQUIRED`` or ``Edge.LOST`` and the run loop acts on it (failing waiters on loss) before
calling :meth:`fire`, so callbacks run after the engine's own bookkeeping.
"""

from __future__ import annotations

import enum

import attrs
import trio

from trio_raft.core.messages import NONE, Message, MessageType, StateType
from trio_raft.core.rawnode import RawNode
from trio_raft.core.storage import MemoryStorage
from trio_raft.engine.callbacks import CallbackRegistry
from trio_raft.engine.membership import Membership
from trio_raft.engine.types import State, Status

MT = MessageType

#: Messages that only the leader sends: receiving one is contact with the leader.
_CONTACT_TYPES = frozenset({MT.APP, MT.HEARTBEAT, MT.SNAP, MT.READ_INDEX_RESP})


class Edge(enum.Enum):
    ACQUIRED = "acquired"
    LOST = "lost"


class StatusView:
    """See the module docstring."""

    def __init__(self, node: RawNode, membership: Membership, storage: MemoryStorage) -> None:
        self._node = node
        self._membership = membership
        self._storage = storage
        self.current = Status(state=State.FOLLOWER)
        self.on_acquired = CallbackRegistry("leader-acquired")
        self.on_lost = CallbackRegistry("leader-loss")
        self._contact_at: float | None = None
        self._contact_from = NONE
        #: Times a new leader (another node, or this one) became known here.
        self.leader_changes = 0
        self._lead = NONE

    def note_contact(self, m: Message) -> None:
        if m.type in _CONTACT_TYPES:
            self._contact_at, self._contact_from = trio.current_time(), m.from_

    def refresh(self, applied: int) -> Edge | None:
        r = self._node.raft
        prev = self.current.state
        if r.lead != self._lead:
            self._lead = r.lead
            if r.lead != NONE:
                self.leader_changes += 1
        if r.state is StateType.LEADER:
            state = State.LEADER
        elif r.state is StateType.FOLLOWER:
            state = State.FOLLOWER
        else:
            state = State.CANDIDATE
        if state is State.LEADER:
            contact = 0.0
        elif (
            state is not State.FOLLOWER
            or self._contact_at is None
            or (r.lead != NONE and self._contact_from != r.lead)
        ):
            contact = -1.0
        else:
            contact = max(0.0, trio.current_time() - self._contact_at)
        m = self._membership
        self.current = Status(
            state=state,
            leader=m.leader_info(r.lead),
            term=r.term,
            commit_index=r.log.committed,
            applied_index=applied,
            last_log_index=self._storage.last_index(),
            last_snapshot_index=self._storage.snapshot().metadata.index,
            fsm_pending=max(0, r.log.committed - applied),
            num_peers=sum(1 for nid in m.peers if nid != m.node_id),
            last_contact=contact,
            configuration_index=m.config_index,
            lead_transferee=r.lead_transferee,
            pending_conf_change=m.fence != 0,
        )
        if prev is not State.LEADER and state is State.LEADER:
            return Edge.ACQUIRED
        if prev is State.LEADER and state is not State.LEADER:
            return Edge.LOST
        return None

    def shut_down(self) -> bool:
        """Publish the shutdown state; returns whether this node was leader until now."""
        was_leader = self.current.state is State.LEADER
        self.current = attrs.evolve(self.current, state=State.SHUTDOWN)
        return was_leader

    def fire(self, edge: Edge) -> None:
        (self.on_acquired if edge is Edge.ACQUIRED else self.on_lost).fire()
