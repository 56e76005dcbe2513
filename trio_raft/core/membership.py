"""Single-step membership changes (add voter, add learner, promote, remove) as the Raft state
machine applies them, and the hand-over of a leader that removed or demoted itself.

Split from raft.py to keep modules small; functions take the :class:`Raft` as ``self``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from trio_raft.core import leader as _leader
from trio_raft.core import replication as _replication
from trio_raft.core.messages import (
    NONE,
    ConfChange,
    ConfChangeType,
    ConfState,
    Message,
    MessageType,
    StateType,
)
from trio_raft.core.progress import Progress

if TYPE_CHECKING:
    from trio_raft.core.raft import Raft

MT = MessageType


def apply_conf_change(self: Raft, cc: ConfChange) -> ConfState:
    """Apply a committed single-step change to ``self``'s configuration; returns it."""
    prs = self.prs
    nid = cc.node_id
    next_index = self.log.last_index() + 1
    if cc.type is ConfChangeType.ADD_NODE:
        prs.learners.discard(nid)
        prs.voters.add(nid)
        pr = prs.progress.get(nid)
        if pr is None:
            prs.progress[nid] = Progress(next_index, prs.max_inflight, recent_active=True)
        else:
            pr.is_learner = False
    elif cc.type is ConfChangeType.ADD_LEARNER_NODE:
        prs.voters.discard(nid)
        prs.learners.add(nid)
        pr = prs.progress.get(nid)
        if pr is None:
            prs.progress[nid] = Progress(
                next_index, prs.max_inflight, is_learner=True, recent_active=True
            )
        else:
            pr.is_learner = True
    elif cc.type is ConfChangeType.REMOVE_NODE:
        prs.voters.discard(nid)
        prs.learners.discard(nid)
        prs.progress.pop(nid, None)
        prs.votes.pop(nid, None)
    # UPDATE_NODE changes no membership.
    if nid == self.id:
        me = prs.progress.get(self.id)
        if me is not None and me.match == 0:
            last = self.log.last_index()
            me.match = min(last, self.log.unstable.offset - 1) if self.self_ack_on_persist else last
    self._refresh_learner_flag()
    cs = prs.conf_state()

    if self.state is not StateType.LEADER or not prs.voters:
        return cs
    if self.maybe_commit():
        _leader.release_pending_read_index_messages(self)
        _replication.bcast_append(self)
    else:
        for i in list(prs.progress):
            if i != self.id:
                _replication.maybe_send_append(self, i, False)
    if self.lead_transferee != NONE and self.lead_transferee not in prs.voters:
        self.abort_leader_transfer()
    if self.step_down_on_removal and not self._is_voter():
        hand_over_leadership(self)
    return cs


def hand_over_leadership(self: Raft) -> None:
    """We were removed or demoted while leading. Stepping down at once can wedge the
    cluster: the remaining voters may not know the change committed (the append carrying
    the commit index can be lost) and still need our vote under the old configuration,
    which our longer log refuses. So hand over instead: transfer leadership to the most
    up-to-date voter (it is caught up first, and proposals are refused meanwhile); if that
    does not finish within an election timeout, step down anyway (see _tick_heartbeat)."""
    best = max(
        (i for i in self.prs.voters if i != self.id),
        key=lambda i: (self.prs.progress[i].match, -i),
        default=NONE,
    )
    if best == NONE:
        self.become_follower(self.term, NONE)
        return
    if self.lead_transferee != best:
        self.step(Message(MT.TRANSFER_LEADER, from_=best))
