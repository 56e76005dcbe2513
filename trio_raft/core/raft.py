"""The Raft protocol state machine.

Theory of operation
-------------------
A :class:`Raft` is driven by three inputs: ``tick()`` (logical time), ``step(message)`` (a message
from a peer or a local request) and the driver acknowledging what it persisted/applied (through
:class:`~trio_raft.core.rawnode.RawNode`). It produces outgoing messages (``msgs``), read states,
and changes to the log. It never performs I/O and never reads a clock; randomness (election
timeouts) comes from an injected RNG, so a seeded run is reproducible.

Rules this module owns (Raft paper / thesis section in brackets):

* Terms: any message with a higher term makes us a follower of that term [§5.1], except vote
  requests inside a leader lease (CheckQuorum) and PreVote traffic, which never changes terms
  [thesis §9.6]. Messages with a lower term are ignored, or answered so a stale leader learns of
  the new term.
* Elections: a follower whose election timer (randomized in ``[et, 2*et)``) expires campaigns,
  first as a pre-candidate when PreVote is on; one vote per term; votes go only to candidates
  whose log is at least as up to date [§5.2, §5.4.1]. Learners and removed nodes never campaign.
* Replication: per-follower Progress in probe / replicate / snapshot; fast back-off on rejection
  using the follower's hint; ``max_size_per_msg`` and ``max_inflight`` bound each follower [§5.3].
* Commitment: only an entry of the current term is committed by counting a majority of voters;
  earlier entries commit with it [§5.4.2]. A new leader appends an empty entry to get there.
* CheckQuorum: a leader that has not heard from a quorum within an election timeout steps down.
* ReadIndex (ReadOnlySafe): a read is servable at the commit index once a quorum acknowledged a
  heartbeat carrying its context, and never before the leader committed an entry of its term.
* Membership: single-step changes, at most one pending (proposed but not applied) at a time.
* Leadership transfer: the leader stops accepting proposals, brings the target up to date, sends
  it TimeoutNow, and gives up after an election timeout [thesis §3.10].
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from typing import Protocol

import attrs

from trio_raft.core import leader as _leader
from trio_raft.core import membership as _membership
from trio_raft.core import replication as _replication
from trio_raft.core.errors import (
    CoreConfigError,
    ProposalDroppedError,
)
from trio_raft.core.log import RaftLog
from trio_raft.core.messages import (
    NONE,
    ConfChange,
    ConfState,
    Entry,
    EntryType,
    HardState,
    Message,
    MessageType,
    ReadState,
    Snapshot,
    SoftState,
    StateType,
)
from trio_raft.core.progress import Progress
from trio_raft.core.quorum import VoteResult
from trio_raft.core.readonly import ReadOnly
from trio_raft.core.storage import Storage
from trio_raft.core.tracker import ProgressTracker

logger = logging.getLogger(__name__)

MT = MessageType

#: Message types whose term the sender sets itself (vote traffic; forwarded requests carry 0).
_OWN_TERM = frozenset({MT.VOTE, MT.VOTE_RESP, MT.PRE_VOTE, MT.PRE_VOTE_RESP, MT.PROP,
                       MT.READ_INDEX})

#: Context of a vote request sent because of a leadership transfer: it bypasses the lease check.
CAMPAIGN_TRANSFER = b"CampaignTransfer"


class CampaignType(enum.Enum):
    PRE_ELECTION = "pre-election"
    ELECTION = "election"
    TRANSFER = "transfer"


class Rng(Protocol):
    """What the core needs of a random number generator (``random.Random`` fits)."""

    def randrange(self, start: int, stop: int = ..., /) -> int: ...


@attrs.frozen
class Config:
    id: int
    storage: Storage
    rng: Rng
    election_tick: int = 10
    heartbeat_tick: int = 1
    applied: int = 0
    max_size_per_msg: int = 1 << 20
    max_committed_size_per_ready: int | None = None
    max_inflight_msgs: int = 256
    check_quorum: bool = True
    pre_vote: bool = True
    disable_proposal_forwarding: bool = True
    #: The leader counts its own log toward the commit quorum only once the driver reports it
    #: durable (``RawNode.advance``). The driver may then send a leader's appends before its
    #: own write completes, overlapping the leader's fsync with the followers' (Raft thesis
    #: §10.2.1). Without it the leader counts its entries at once, and the driver must persist
    #: before sending.
    self_ack_on_persist: bool = False
    step_down_on_removal: bool = True

    def validate(self) -> None:
        if self.id == NONE:
            raise CoreConfigError("cannot use 0 as a node id")
        if self.heartbeat_tick <= 0:
            raise CoreConfigError("heartbeat tick must be greater than 0")
        if self.election_tick <= self.heartbeat_tick:
            raise CoreConfigError("election tick must be greater than heartbeat tick")
        if self.max_inflight_msgs <= 0:
            raise CoreConfigError("max inflight messages must be greater than 0")


class Raft:
    def __init__(self, c: Config) -> None:
        c.validate()
        self.id = c.id
        self.rng = c.rng
        max_ready = c.max_committed_size_per_ready or c.max_size_per_msg
        self.log = RaftLog(c.storage, max_ready)
        self.max_msg_size = c.max_size_per_msg
        self.prs = ProgressTracker(c.max_inflight_msgs)
        self.check_quorum = c.check_quorum
        self.pre_vote = c.pre_vote
        self.disable_proposal_forwarding = c.disable_proposal_forwarding
        self.self_ack_on_persist = c.self_ack_on_persist
        self.step_down_on_removal = c.step_down_on_removal
        self.heartbeat_timeout = c.heartbeat_tick
        self.election_timeout = c.election_tick

        self.term = 0
        self.vote = NONE
        self.lead = NONE
        self.lead_transferee = NONE
        self.state = StateType.FOLLOWER
        self.is_learner = False
        self.msgs: list[Message] = []
        #: Proposals were appended but not yet sent; RawNode flushes before building a Ready.
        self.bcast_pending = False
        self.read_states: list[ReadState] = []
        self.pending_conf_index = 0
        self.pending_read_index_messages: list[Message] = []
        self.read_only = ReadOnly()
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self.randomized_election_timeout = self.election_timeout
        self._tick: Callable[[], None] = self._tick_election
        self._step: Callable[[Message], None] = self._step_follower

        hs, cs = c.storage.initial_state()
        self.prs.apply_conf_state(cs, self.log.last_index() + 1)
        self._refresh_learner_flag()
        if not hs.is_empty():
            self.load_state(hs)
        if c.applied > self.log.applied:
            self.log.applied_to(min(c.applied, self.log.committed))
        self.become_follower(self.term, NONE)

    # ---------------------------------------------------------------------------------
    # state accessors
    # ---------------------------------------------------------------------------------
    def soft_state(self) -> SoftState:
        return SoftState(self.lead, self.state, self.lead_transferee)

    def hard_state(self) -> HardState:
        return HardState(self.term, self.vote, self.log.committed)

    def load_state(self, hs: HardState) -> None:
        if hs.commit < self.log.committed or hs.commit > self.log.last_index():
            raise CoreConfigError(
                f"hard state commit {hs.commit} is out of range "
                f"[{self.log.committed}, {self.log.last_index()}]"
            )
        self.log.committed = hs.commit
        self.term = hs.term
        self.vote = hs.vote

    def promotable(self) -> bool:
        pr = self.prs.progress.get(self.id)
        return pr is not None and not pr.is_learner and not self.log.has_pending_snapshot()

    def _refresh_learner_flag(self) -> None:
        pr = self.prs.progress.get(self.id)
        self.is_learner = pr is not None and pr.is_learner

    def _send(self, m: Message) -> None:
        """Queue ``m``, filling in ``from_`` and (except for vote traffic, which carries its own
        term, and forwarded requests, which carry none) the current term. Hot paths build
        complete messages and append to ``msgs`` directly instead."""
        from_ = self.id if m.from_ == NONE else m.from_
        term = m.term if m.type in _OWN_TERM else self.term
        if from_ != m.from_ or term != m.term:
            m = attrs.evolve(m, from_=from_, term=term)
        self.msgs.append(m)

    # ---------------------------------------------------------------------------------
    # transitions
    # ---------------------------------------------------------------------------------
    def _reset(self, term: int) -> None:
        if self.term != term:
            self.term = term
            self.vote = NONE
        self.lead = NONE
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self.randomized_election_timeout = self.election_timeout + self.rng.randrange(
            self.election_timeout
        )
        self.lead_transferee = NONE
        self.prs.reset_votes()
        last = self.log.last_index()
        mi = self.prs.max_inflight
        for i, pr in list(self.prs.progress.items()):
            np = Progress(last + 1, mi, is_learner=pr.is_learner)
            if i == self.id:
                # Only what is durable counts when the driver acknowledges our own writes.
                np.match = min(last, self.log.unstable.offset - 1) if (
                    self.self_ack_on_persist) else last
            self.prs.progress[i] = np
        self.pending_conf_index = 0
        self.read_only = ReadOnly()
        self.pending_read_index_messages = []

    def become_follower(self, term: int, lead: int) -> None:
        self._step = self._step_follower
        self._reset(term)
        self._tick = self._tick_election
        self.lead = lead
        self.state = StateType.FOLLOWER
        logger.debug("%x became follower at term %d (leader %x)", self.id, self.term, lead)

    def become_candidate(self) -> None:
        if self.state is StateType.LEADER:
            raise RuntimeError("invalid transition [leader -> candidate]")
        self._step = self._step_candidate
        self._reset(self.term + 1)
        self._tick = self._tick_election
        self.vote = self.id
        self.state = StateType.CANDIDATE

    def become_pre_candidate(self) -> None:
        if self.state is StateType.LEADER:
            raise RuntimeError("invalid transition [leader -> pre-candidate]")
        # A pre-candidate changes neither term nor vote.
        self._step = self._step_candidate
        self.prs.reset_votes()
        self._tick = self._tick_election
        self.lead = NONE
        self.state = StateType.PRE_CANDIDATE

    def become_leader(self) -> None:
        if self.state is StateType.FOLLOWER:
            raise RuntimeError("invalid transition [follower -> leader]")
        self._step = self._step_leader
        self._reset(self.term)
        self._tick = self._tick_heartbeat
        self.lead = self.id
        self.state = StateType.LEADER
        me = self.prs.progress[self.id]
        me.become_replicate()
        me.recent_active = True
        # Conservatively treat any uncommitted tail as possibly holding a conf change.
        self.pending_conf_index = self.log.last_index()
        # The empty entry of the new term: committing it commits everything before [§5.4.2]
        # and lets ReadIndex serve reads.
        self._append_entries([Entry(0, 0)])
        logger.info("%x became leader at term %d", self.id, self.term)

    # ---------------------------------------------------------------------------------
    # ticks
    # ---------------------------------------------------------------------------------
    def tick(self) -> None:
        self._tick()

    def _past_election_timeout(self) -> bool:
        return self.election_elapsed >= self.randomized_election_timeout

    def _tick_election(self) -> None:
        self.election_elapsed += 1
        if self.promotable() and self._past_election_timeout():
            self.election_elapsed = 0
            self.step(Message(MT.HUP, from_=self.id))

    def _tick_heartbeat(self) -> None:
        self.heartbeat_elapsed += 1
        self.election_elapsed += 1
        if self.election_elapsed >= self.election_timeout:
            self.election_elapsed = 0
            if self.check_quorum:
                self.step(Message(MT.CHECK_QUORUM, from_=self.id))
            if self.state is StateType.LEADER and self.lead_transferee != NONE:
                self.abort_leader_transfer()
            if (self.state is StateType.LEADER and self.step_down_on_removal
                    and not self._is_voter()):
                # A removed/demoted leader whose hand-over did not complete.
                self.become_follower(self.term, NONE)
                return
        if self.state is not StateType.LEADER:
            return
        if self.heartbeat_elapsed >= self.heartbeat_timeout:
            self.heartbeat_elapsed = 0
            self.step(Message(MT.BEAT, from_=self.id))

    # ---------------------------------------------------------------------------------
    # elections
    # ---------------------------------------------------------------------------------
    def hup(self, t: CampaignType) -> None:
        if self.state is StateType.LEADER:
            return
        if not self.promotable():
            return
        if self.log.committed > self.log.applied and self.log.has_conf_change_in(
            self.log.applied + 1, self.log.committed + 1
        ):
            logger.warning("%x cannot campaign: pending configuration changes to apply", self.id)
            return
        self.campaign(t)

    def campaign(self, t: CampaignType) -> None:
        if t is CampaignType.PRE_ELECTION:
            self.become_pre_candidate()
            vote_type, term = MT.PRE_VOTE, self.term + 1
        else:
            self.become_candidate()
            vote_type, term = MT.VOTE, self.term
        resp_type = MT.PRE_VOTE_RESP if vote_type is MT.PRE_VOTE else MT.VOTE_RESP
        if self._poll(self.id, resp_type, True) is VoteResult.WON:
            # Single-voter configuration: won already.
            if t is CampaignType.PRE_ELECTION:
                self.campaign(CampaignType.ELECTION)
            else:
                self.become_leader()
            return
        ctx = CAMPAIGN_TRANSFER if t is CampaignType.TRANSFER else b""
        last, last_term = self.log.last_index(), self.log.last_term()
        for vid in self.prs.voter_ids():
            if vid == self.id:
                continue
            self._send(
                Message(vote_type, to=vid, term=term, index=last, log_term=last_term, context=ctx)
            )

    def _poll(self, node_id: int, t: MessageType, granted: bool) -> VoteResult:
        self.prs.record_vote(node_id, granted)
        return self.prs.tally_votes()[2]

    # ---------------------------------------------------------------------------------
    # step: term handling and common messages
    # ---------------------------------------------------------------------------------
    def step(self, m: Message) -> None:
        if m.term == 0:
            pass  # local message
        elif m.term > self.term:
            if m.type in (MT.VOTE, MT.PRE_VOTE):
                force = m.context == CAMPAIGN_TRANSFER
                in_lease = (
                    self.check_quorum
                    and self.lead != NONE
                    and self.election_elapsed < self.election_timeout
                )
                if not force and in_lease:
                    # Within the lease of a live leader we neither vote nor bump the term:
                    # this is what keeps a partitioned node from disrupting the cluster.
                    return
            if m.type is MT.PRE_VOTE:
                pass  # never change term for a pre-vote
            elif m.type is MT.PRE_VOTE_RESP and not m.reject:
                pass  # the term is bumped when the pre-election is won
            elif m.type in (MT.APP, MT.HEARTBEAT, MT.SNAP):
                self.become_follower(m.term, m.from_)
            else:
                self.become_follower(m.term, NONE)
        elif m.term < self.term:
            if (self.check_quorum or self.pre_vote) and m.type in (MT.HEARTBEAT, MT.APP):
                # A stale leader (e.g. after a partition): tell it about our term.
                self._send(Message(MT.APP_RESP, to=m.from_))
            elif m.type is MT.PRE_VOTE:
                self._send(Message(MT.PRE_VOTE_RESP, to=m.from_, term=self.term, reject=True))
            return

        if m.type is MT.HUP:
            self.hup(CampaignType.PRE_ELECTION if self.pre_vote else CampaignType.ELECTION)
        elif m.type in (MT.VOTE, MT.PRE_VOTE):
            self._handle_vote_request(m)
        else:
            self._step(m)

    def _handle_vote_request(self, m: Message) -> None:
        can_vote = (
            self.vote == m.from_
            or (self.vote == NONE and self.lead == NONE)
            or (m.type is MT.PRE_VOTE and m.term > self.term)
        )
        resp = MT.VOTE_RESP if m.type is MT.VOTE else MT.PRE_VOTE_RESP
        if can_vote and self.log.is_up_to_date(m.index, m.log_term):
            # Respond at the request's term: a pre-vote grant is for the future term.
            self._send(Message(resp, to=m.from_, term=m.term))
            if m.type is MT.VOTE:
                self.election_elapsed = 0
                self.vote = m.from_
        else:
            self._send(Message(resp, to=m.from_, term=self.term, reject=True))

    # ---------------------------------------------------------------------------------
    # follower
    # ---------------------------------------------------------------------------------
    def _step_follower(self, m: Message) -> None:
        t = m.type
        if t is MT.PROP:
            raise ProposalDroppedError("not leader")
        if t is MT.APP:
            self.election_elapsed = 0
            self.lead = m.from_
            self._handle_append_entries(m)
        elif t is MT.HEARTBEAT:
            self.election_elapsed = 0
            self.lead = m.from_
            self._handle_heartbeat(m)
        elif t is MT.SNAP:
            self.election_elapsed = 0
            self.lead = m.from_
            self._handle_snapshot(m)
        elif t is MT.TRANSFER_LEADER:
            if self.lead != NONE:
                self._send(attrs.evolve(m, to=self.lead))
        elif t is MT.TIMEOUT_NOW:
            # Transfer: campaign at once, without pre-vote, bypassing leases.
            self.hup(CampaignType.TRANSFER)
        elif t is MT.READ_INDEX:
            if self.lead != NONE and len(m.entries) == 1:
                self._send(attrs.evolve(m, to=self.lead))
        elif t is MT.READ_INDEX_RESP and len(m.entries) == 1:
            self.read_states.append(ReadState(m.index, m.entries[0].data))

    def _handle_append_entries(self, m: Message) -> None:
        if m.index < self.log.committed:
            self._send(Message(MT.APP_RESP, to=m.from_, index=self.log.committed))
            return
        last_new = self.log.maybe_append(m.index, m.log_term, m.commit, m.entries)
        if last_new is not None:
            self.msgs.append(Message(MT.APP_RESP, m.from_, self.id, self.term, index=last_new))
            return
        hint_index = min(m.index, self.log.last_index())
        hint_index, hint_term = self.log.find_conflict_by_term(hint_index, m.log_term)
        self._send(
            Message(
                MT.APP_RESP,
                to=m.from_,
                index=m.index,
                reject=True,
                reject_hint=hint_index,
                log_term=hint_term,
            )
        )

    def _handle_heartbeat(self, m: Message) -> None:
        if m.commit <= self.log.last_index():
            self.log.commit_to(m.commit)
        self.msgs.append(
            Message(MT.HEARTBEAT_RESP, m.from_, self.id, self.term, context=m.context)
        )

    def _handle_snapshot(self, m: Message) -> None:
        if m.snapshot is None or m.snapshot.is_empty():
            return
        if self.restore(m.snapshot):
            self._send(Message(MT.APP_RESP, to=m.from_, index=self.log.last_index()))
        else:
            self._send(Message(MT.APP_RESP, to=m.from_, index=self.log.committed))

    def restore(self, s: Snapshot) -> bool:
        """Install snapshot ``s`` if it is newer than our commit index."""
        meta = s.metadata
        if meta.index <= self.log.committed:
            return False
        if self.state is not StateType.FOLLOWER:
            # Only a follower may receive a snapshot; be defensive against a buggy peer.
            self.become_follower(self.term + 1, NONE)
            return False
        cs = meta.conf_state
        if cs.is_joint():
            logger.warning("%x ignoring snapshot with a joint configuration", self.id)
            return False
        if self.id not in cs.voters and self.id not in cs.learners:
            logger.warning("%x ignoring snapshot %d that does not include it", self.id, meta.index)
            return False
        if self.log.match_term(meta.index, meta.term):
            # We already hold that prefix: just fast-forward the commit index.
            self.log.commit_to(meta.index)
            return False
        self.log.restore(s)
        self.prs.apply_conf_state(cs, self.log.last_index() + 1)
        me = self.prs.progress[self.id]
        me.match = self.log.last_index()
        self._refresh_learner_flag()
        return True

    # ---------------------------------------------------------------------------------
    # candidate / pre-candidate
    # ---------------------------------------------------------------------------------
    def _step_candidate(self, m: Message) -> None:
        my_resp = MT.PRE_VOTE_RESP if self.state is StateType.PRE_CANDIDATE else MT.VOTE_RESP
        t = m.type
        if t is MT.PROP:
            raise ProposalDroppedError("no leader")
        if t is MT.APP:
            self.become_follower(m.term, m.from_)
            self._handle_append_entries(m)
        elif t is MT.HEARTBEAT:
            self.become_follower(m.term, m.from_)
            self._handle_heartbeat(m)
        elif t is MT.SNAP:
            self.become_follower(m.term, m.from_)
            self._handle_snapshot(m)
        elif t is my_resp:
            res = self._poll(m.from_, t, not m.reject)
            if res is VoteResult.WON:
                if self.state is StateType.PRE_CANDIDATE:
                    self.campaign(CampaignType.ELECTION)
                else:
                    self.become_leader()
                    _replication.bcast_append(self)
            elif res is VoteResult.LOST:
                # A pre-vote rejection may carry a higher term; we still stay at ours.
                self.become_follower(self.term, NONE)

    # ---------------------------------------------------------------------------------
    # leader: see core/leader.py for the handlers
    # ---------------------------------------------------------------------------------
    def _step_leader(self, m: Message) -> None:
        _leader.step_leader(self, m)

    def _append_entries(self, es: list[Entry]) -> bool:
        li = self.log.last_index()
        term = self.term
        ents = [Entry(term, li + 1 + i, e.type, e.data) for i, e in enumerate(es)]
        self.log.append(ents)
        if self.self_ack_on_persist:
            return True  # acknowledged by RawNode.advance once durable
        self.prs.progress[self.id].maybe_update(li + len(ents))
        # Our own acknowledgement can only move the commit index when we are the only voter
        # (other voters never match beyond our previous last index).
        if len(self.prs.voters) <= 1:
            self.maybe_commit()
        return True

    def ack_own_stable(self, index: int) -> None:
        """The driver made our log durable up to ``index`` (``self_ack_on_persist`` mode)."""
        if self.state is not StateType.LEADER:
            return
        me = self.prs.progress.get(self.id)
        if me is not None and me.maybe_update(index) and self.maybe_commit():
            _leader.release_pending_read_index_messages(self)

    def maybe_commit(self) -> bool:
        return self.log.maybe_commit(self.prs.committed(), self.term)

    def abort_leader_transfer(self) -> None:
        self.lead_transferee = NONE

    def committed_entry_in_current_term(self) -> bool:
        return self.log.term_or_zero(self.log.committed) == self.term

    # ---------------------------------------------------------------------------------
    # membership
    # ---------------------------------------------------------------------------------
    def apply_conf_change(self, cc: ConfChange) -> ConfState:
        """Apply a committed single-step change to the configuration; returns the new state."""
        return _membership.apply_conf_change(self, cc)

    def _is_voter(self) -> bool:
        return self.id in self.prs.voters

    def conf_change_entry(self, cc: ConfChange) -> Entry:
        return Entry(0, 0, EntryType.CONF_CHANGE, cc.encode())
