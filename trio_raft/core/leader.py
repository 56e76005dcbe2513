"""Message handling of a Raft leader (split from raft.py to keep modules small).

One function per message type the leader reacts to; ``step_leader`` dispatches through a table.
Responses from nodes the leader does not track are dropped (RawNode reports them first).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from trio_raft.core import replication as _replication
from trio_raft.core.errors import ConfChangeError, ProposalDroppedError
from trio_raft.core.messages import (
    NONE,
    ConfChange,
    Entry,
    EntryType,
    Message,
    MessageType,
    ReadState,
)
from trio_raft.core.progress import ProgressState
from trio_raft.core.quorum import VoteResult, vote_result

if TYPE_CHECKING:
    from trio_raft.core.raft import Raft

logger = logging.getLogger(__name__)
MT = MessageType


def step_leader(r: Raft, m: Message) -> None:
    handler = _LOCAL.get(m.type)
    if handler is not None:
        handler(r, m)
        return
    pr_handler = _PEER.get(m.type)
    if pr_handler is None:
        return
    if m.from_ not in r.prs.progress:
        logger.debug("%x: no progress for %x, dropping %s", r.id, m.from_, m.type.name)
        return
    pr_handler(r, m)


# -- local / client-originated ---------------------------------------------------------------


def _beat(r: Raft, m: Message) -> None:
    _replication.bcast_heartbeat(r)


def _check_quorum(r: Raft, m: Message) -> None:
    if not r.prs.quorum_active():
        logger.warning("%x stepped down to follower since quorum is not active", r.id)
        r.become_follower(r.term, NONE)
    # Mark everyone inactive again; a response within the next timeout re-activates them.
    for i, pr in r.prs.progress.items():
        if i != r.id:
            pr.recent_active = False


def _propose(r: Raft, m: Message) -> None:
    if not m.entries:
        raise ProposalDroppedError("empty proposal")
    if r.id not in r.prs.progress:
        # Removed from the configuration: refuse, a new leader will be elected.
        raise ProposalDroppedError("leader is not a member of the configuration")
    if r.lead_transferee != NONE:
        raise ProposalDroppedError("leadership transfer in progress")
    n_cc = 0
    for ent in m.entries:
        if ent.type is EntryType.NORMAL:
            continue
        if ent.type is EntryType.CONF_CHANGE_V2:
            raise ConfChangeError("joint-consensus (V2) configuration changes are not supported")
        n_cc += 1
        if n_cc > 1:
            raise ProposalDroppedError("at most one configuration change per proposal")
        if r.pending_conf_index > r.log.applied:
            raise ProposalDroppedError("a configuration change is already pending")
        cc = ConfChange.decode(ent.data)
        _validate_conf_change(r, cc)
    first_new = r.log.last_index() + 1
    r._append_entries(list(m.entries))
    if n_cc:
        for i, ent in enumerate(m.entries):
            if ent.type is not EntryType.NORMAL:
                r.pending_conf_index = first_new + i
    # Appends go out when the driver next asks for a Ready (RawNode flushes), so proposals made
    # between two Readys share one append message per follower.
    r.bcast_pending = True


def _validate_conf_change(r: Raft, cc: ConfChange) -> None:
    from trio_raft.core.messages import ConfChangeType

    voters = set(r.prs.voters)
    if cc.type is ConfChangeType.REMOVE_NODE or cc.type is ConfChangeType.ADD_LEARNER_NODE:
        voters.discard(cc.node_id)
    elif cc.type is ConfChangeType.ADD_NODE:
        voters.add(cc.node_id)
    if not voters:
        raise ConfChangeError("removed all voters")
    if cc.node_id == NONE:
        raise ConfChangeError("node id 0 is not allowed in a configuration change")


def _read_index(r: Raft, m: Message) -> None:
    if len(m.entries) != 1:
        return
    if r.prs.is_singleton() and r.id in r.prs.voters:
        _respond_read_index(r, m, r.log.committed)
        return
    if not r.committed_entry_in_current_term():
        # A new leader does not know the commit index until its own empty entry commits.
        r.pending_read_index_messages.append(m)
        return
    send_read_index_response(r, m)


def send_read_index_response(r: Raft, m: Message) -> None:
    ctx = m.entries[0].data
    r.read_only.add_request(r.log.committed, m)
    r.read_only.recv_ack(r.id, ctx)
    _broadcast_next_round(r)


def _broadcast_next_round(r: Raft) -> None:
    """Send the heartbeat of the next batch of read requests, unless one is in flight (those
    requests then wait for the broadcast after it: readonly.py, "Batching")."""
    ctx = r.read_only.take_round()
    if ctx is not None:
        _replication.bcast_heartbeat(r, ctx)


def _respond_read_index(r: Raft, req: Message, index: int) -> None:
    ctx = req.entries[0].data
    if req.from_ in (NONE, r.id):
        r.read_states.append(ReadState(index, ctx))
    else:
        r._send(Message(MT.READ_INDEX_RESP, to=req.from_, index=index, entries=req.entries))


def release_pending_read_index_messages(r: Raft) -> None:
    if not r.pending_read_index_messages or not r.committed_entry_in_current_term():
        return
    msgs, r.pending_read_index_messages = r.pending_read_index_messages, []
    for m in msgs:
        send_read_index_response(r, m)


def _transfer_leader(r: Raft, m: Message) -> None:
    target = m.from_
    pr = r.prs.progress.get(target)
    if pr is None or pr.is_learner:
        logger.debug("%x ignoring transfer to %x: not a voter", r.id, target)
        return
    if r.lead_transferee != NONE:
        if r.lead_transferee == target:
            return
        r.abort_leader_transfer()
    if target == r.id:
        return
    # The transfer must finish within one election timeout.
    r.election_elapsed = 0
    r.lead_transferee = target
    if pr.match == r.log.last_index():
        r._send(Message(MT.TIMEOUT_NOW, to=target))
    else:
        _replication.send_append(r, target)


_LOCAL: dict[MessageType, Callable[[Raft, Message], None]] = {
    MT.BEAT: _beat,
    MT.CHECK_QUORUM: _check_quorum,
    MT.PROP: _propose,
    MT.READ_INDEX: _read_index,
}


# -- from followers ------------------------------------------------------------------------


def _app_resp(r: Raft, m: Message) -> None:
    pr = r.prs.progress[m.from_]
    pr.recent_active = True
    if m.reject:
        next_probe = m.reject_hint
        if m.log_term > 0:
            next_probe, _ = r.log.find_conflict_by_term(m.reject_hint, m.log_term)
        if pr.maybe_decr_to(m.index, next_probe):
            if pr.state is ProgressState.REPLICATE:
                pr.become_probe()
            _replication.send_append(r, m.from_)
        return
    if m.index > r.log.last_index():
        # Acknowledges entries we never sent: a confused or malicious peer. Ignore it.
        logger.warning("%x: %x acknowledged index %d beyond last index %d", r.id, m.from_,
                       m.index, r.log.last_index())
        return
    old_paused = pr.is_paused()
    if not pr.maybe_update(m.index) and not (
        pr.match == m.index and pr.state is ProgressState.PROBE
    ):
        # Stale. (A probe answered at exactly ``match`` still proves where the follower's log
        # matches, so it moves the follower to replicate below.)
        return
    if pr.state is ProgressState.PROBE:
        pr.become_replicate()
    elif pr.state is ProgressState.SNAPSHOT and pr.match + 1 >= r.log.first_index():
        pr.become_probe()
        pr.become_replicate()
    elif pr.state is ProgressState.REPLICATE:
        pr.inflights.free_le(m.index)
    if r.maybe_commit():
        release_pending_read_index_messages(r)
        _replication.bcast_append(r)
    elif old_paused:
        _replication.send_append(r, m.from_)
    while _replication.maybe_send_append(r, m.from_, False):
        pass
    if m.from_ == r.lead_transferee and pr.match == r.log.last_index():
        r._send(Message(MT.TIMEOUT_NOW, to=m.from_))


def _heartbeat_resp(r: Raft, m: Message) -> None:
    pr = r.prs.progress[m.from_]
    pr.recent_active = True
    pr.probe_sent = False
    if pr.state is ProgressState.REPLICATE and pr.inflights.full():
        pr.inflights.free_first_one()
    if pr.match < r.log.last_index():
        _replication.send_append(r, m.from_)
    if not m.context:
        return
    acks = r.read_only.recv_ack(m.from_, m.context)
    if acks is None or vote_result(r.prs.voters, acks) is not VoteResult.WON:
        return
    for rs in r.read_only.advance(m.context):
        _respond_read_index(r, rs.req, rs.index)
    _broadcast_next_round(r)


def _snap_status(r: Raft, m: Message) -> None:
    pr = r.prs.progress[m.from_]
    if pr.state is not ProgressState.SNAPSHOT:
        return
    if m.reject:
        pr.pending_snapshot = 0
    pr.become_probe()
    # Wait for a heartbeat response before probing again.
    pr.probe_sent = True


def _unreachable(r: Raft, m: Message) -> None:
    pr = r.prs.progress[m.from_]
    if pr.state is ProgressState.REPLICATE:
        pr.become_probe()


_PEER: dict[MessageType, Callable[[Raft, Message], None]] = {
    MT.APP_RESP: _app_resp,
    MT.HEARTBEAT_RESP: _heartbeat_resp,
    MT.SNAP_STATUS: _snap_status,
    MT.UNREACHABLE: _unreachable,
    MT.TRANSFER_LEADER: _transfer_leader,
}


def conf_change_entry(cc: ConfChange) -> Entry:
    return Entry(0, 0, EntryType.CONF_CHANGE, cc.encode())
