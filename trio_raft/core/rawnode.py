"""RawNode: the driver-facing API of the core (etcd-raft's RawNode/Ready/Advance shape).

The driver loop is::

    node.tick()            # every tick interval
    node.step(msg)         # for every message received
    node.propose(data)     # for every client proposal
    while node.has_ready():
        rd = node.ready()
        persist rd.snapshot, rd.entries, rd.hard_state   (fsync when rd.must_sync)
        send rd.messages                                 (only after the persist above)
        apply rd.committed_entries; deliver rd.read_states
        node.advance(rd)

``ready()`` hands out everything accumulated since the previous Ready; ``advance(rd)`` tells the
core that ``rd`` was handled (its entries are stable, its committed entries handed to apply).
"""

from __future__ import annotations

import logging

import attrs

from trio_raft.core import replication as _replication
from trio_raft.core.errors import (
    ProposalDroppedError,
    StepLocalMsgError,
    StepPeerNotFoundError,
)
from trio_raft.core.messages import (
    LOCAL_MESSAGE_TYPES,
    NONE,
    RESPONSE_MESSAGE_TYPES,
    ConfChange,
    ConfState,
    Entry,
    EntryType,
    HardState,
    Message,
    MessageType,
    Ready,
    SoftState,
    StateType,
)
from trio_raft.core.progress import ProgressInfo
from trio_raft.core.raft import CampaignType, Config, Raft

MT = MessageType
logger = logging.getLogger(__name__)

#: Peer messages that legitimately carry term 0 (forwarded requests). Any other peer message
#: without a term would be taken for a local one, so it is dropped.
_TERMLESS_OK = frozenset({MT.READ_INDEX, MT.TRANSFER_LEADER})


def malformed(m: Message, self_id: int) -> bool:
    """Whether a peer message is structurally impossible for a correct peer to send.

    Such messages are dropped (like a corrupt packet) rather than allowed to reach the protocol,
    where a bogus index or term could trip an internal invariant: negative numbers, a message
    addressed to another node, a term-less non-request, an append whose entries do not follow
    ``index`` contiguously with terms between ``log_term`` and the message term, a snapshot
    from the future.
    """
    if (
        m.term < 0 or m.log_term < 0 or m.index < 0 or m.commit < 0 or m.reject_hint < 0
        or m.from_ < 0 or (m.to != NONE and m.to != self_id)
    ):
        return True
    if m.term == 0 and m.type not in _TERMLESS_OK:
        return True
    if m.type is MT.APP:
        prev_term = m.log_term
        expect = m.index + 1
        for ent in m.entries:
            if ent.index != expect or ent.term < prev_term or ent.term > m.term:
                return True
            prev_term = ent.term
            expect += 1
    elif m.type is MT.SNAP:
        snap = m.snapshot
        if snap is None or snap.metadata.term > m.term or snap.metadata.index < 0:
            return True
    return False


@attrs.frozen(slots=True)
class Status:
    id: int
    hard_state: HardState
    soft_state: SoftState
    applied: int
    lead_transferee: int
    conf_state: ConfState
    progress: dict[int, ProgressInfo] = attrs.field(factory=dict)
    last_index: int = 0
    first_index: int = 0

    @property
    def raft_state(self) -> StateType:
        return self.soft_state.raft_state

    @property
    def lead(self) -> int:
        return self.soft_state.lead


class RawNode:
    def __init__(self, config: Config) -> None:
        self.raft = Raft(config)
        self._prev_soft = self.raft.soft_state()
        self._prev_hard = self.raft.hard_state()

    # -- inputs ------------------------------------------------------------------------
    def tick(self) -> None:
        self.raft.tick()

    def campaign(self) -> None:
        """Start an election now (pre-vote first when enabled)."""
        self.raft.step(Message(MT.HUP, from_=self.raft.id))

    def propose(self, data: bytes) -> None:
        """Append ``data`` as a normal entry. Raises ProposalDroppedError when not leader."""
        self.propose_entries([Entry(0, 0, EntryType.NORMAL, data)])

    def propose_entries(self, entries: list[Entry]) -> None:
        """Propose several entries at once (they land in one append, in order)."""
        self.raft.step(Message(MT.PROP, from_=self.raft.id, entries=tuple(entries)))

    def propose_conf_change(self, cc: ConfChange) -> None:
        self.raft.step(
            Message(MT.PROP, from_=self.raft.id, entries=(self.raft.conf_change_entry(cc),))
        )

    def apply_conf_change(self, cc: ConfChange) -> ConfState:
        """Apply a committed configuration change; returns the resulting configuration."""
        return self.raft.apply_conf_change(cc)

    def step(self, m: Message) -> None:
        """Feed a message from a peer. Raises StepLocalMsgError for local-only types and
        StepPeerNotFoundError for responses from untracked nodes (both safe to ignore)."""
        if m.type in LOCAL_MESSAGE_TYPES:
            raise StepLocalMsgError()
        if m.type is MT.PROP:
            raise ProposalDroppedError("proposals are not accepted from peers")
        if (
            m.type in RESPONSE_MESSAGE_TYPES
            and m.from_ != NONE
            and m.from_ not in self.raft.prs.progress
        ):
            raise StepPeerNotFoundError()
        if m.from_ == NONE or m.from_ == self.raft.id:
            return  # a message must come from another node
        if malformed(m, self.raft.id):
            logger.debug("%x dropping malformed %s from %x", self.raft.id, m.type.name, m.from_)
            return
        self.raft.step(m)

    def read_index(self, rctx: bytes) -> None:
        """Request a read index; the answer arrives as a ReadState carrying ``rctx``."""
        self.raft.step(
            Message(MT.READ_INDEX, from_=self.raft.id, entries=(Entry(0, 0, data=rctx),))
        )

    def transfer_leader(self, transferee: int) -> None:
        self.raft.step(Message(MT.TRANSFER_LEADER, from_=transferee))

    def report_unreachable(self, node_id: int) -> None:
        self._step_local(Message(MT.UNREACHABLE, from_=node_id))

    def report_snapshot(self, node_id: int, ok: bool) -> None:
        self._step_local(Message(MT.SNAP_STATUS, from_=node_id, reject=not ok))

    def _step_local(self, m: Message) -> None:
        if self.raft.state is StateType.LEADER:
            self.raft.step(m)

    # -- outputs -----------------------------------------------------------------------
    def has_ready(self) -> bool:
        r = self.raft
        if r.bcast_pending:
            _replication.flush_pending_bcast(r)
        if r.msgs or r.read_states:
            return True
        log = r.log
        if log.unstable.entries or log.unstable.snapshot is not None:
            return True
        if log.has_next_committed_ents():
            return True
        if r.soft_state() != self._prev_soft:
            return True
        hs = r.hard_state()
        return not hs.is_empty() and hs != self._prev_hard

    def ready(self) -> Ready:
        r = self.raft
        if r.bcast_pending:
            _replication.flush_pending_bcast(r)
        log = r.log
        soft = r.soft_state()
        hard = r.hard_state()
        entries = tuple(log.unstable.entries)
        hs_changed = hard != self._prev_hard and not hard.is_empty()
        rd = Ready(
            soft_state=soft if soft != self._prev_soft else None,
            hard_state=hard if hs_changed else None,
            read_states=tuple(r.read_states),
            entries=entries,
            snapshot=log.unstable.snapshot,
            committed_entries=tuple(log.next_committed_ents()),
            messages=tuple(r.msgs),
            must_sync=bool(entries)
            or (hs_changed and (hard.term != self._prev_hard.term
                                or hard.vote != self._prev_hard.vote)),
        )
        r.msgs = []
        r.read_states = []
        if rd.soft_state is not None:
            self._prev_soft = soft
        return rd

    def advance(self, rd: Ready) -> None:
        r = self.raft
        if rd.hard_state is not None:
            self._prev_hard = rd.hard_state
        if rd.committed_entries:
            r.log.applied_to(rd.committed_entries[-1].index)
        if rd.entries:
            last = rd.entries[-1]
            r.log.stable_to(last.index, last.term)
            if r.self_ack_on_persist:
                r.ack_own_stable(last.index)
        if rd.snapshot is not None:
            idx = rd.snapshot.metadata.index
            r.log.stable_snap_to(idx)
            if idx > r.log.applied:
                r.log.applied_to(idx)

    # -- inspection --------------------------------------------------------------------
    def status(self) -> Status:
        r = self.raft
        progress: dict[int, ProgressInfo] = {}
        if r.state is StateType.LEADER:
            progress = {i: pr.info() for i, pr in r.prs.progress.items()}
        return Status(
            id=r.id,
            hard_state=r.hard_state(),
            soft_state=r.soft_state(),
            applied=r.log.applied,
            lead_transferee=r.lead_transferee,
            conf_state=r.prs.conf_state(),
            progress=progress,
            last_index=r.log.last_index(),
            first_index=r.log.first_index(),
        )

    def campaign_type(self) -> CampaignType:
        return CampaignType.PRE_ELECTION if self.raft.pre_vote else CampaignType.ELECTION
