"""The leader's outbound replication: appends, snapshots and heartbeats to followers.

Functions of the leader's :class:`~trio_raft.core.raft.Raft` (``r``), as ``leader.py`` and
``membership.py`` hold the rest of the protocol; split out to keep ``raft.py`` readable. Appends
go out only to followers whose Progress is not paused (probe: one in flight; replicate: the
inflight window; snapshot: none), carrying at most ``max_size_per_msg`` bytes of entries. When a
follower needs entries the log no longer holds, it gets the current snapshot instead.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from trio_raft.core.errors import (
    CompactedError,
    SnapshotTemporarilyUnavailableError,
    UnavailableError,
)
from trio_raft.core.messages import Message, MessageType, StateType
from trio_raft.core.progress import Progress

if TYPE_CHECKING:
    from trio_raft.core.raft import Raft

logger = logging.getLogger(__name__)
MT = MessageType


def send_append(r: Raft, to: int) -> None:
    maybe_send_append(r, to, True)


def maybe_send_append(r: Raft, to: int, send_if_empty: bool) -> bool:
    pr = r.prs.progress.get(to)
    if pr is None or pr.is_paused():
        return False
    try:
        prev_term = r.log.term(pr.next - 1)
        ents = r.log.entries(pr.next, r.max_msg_size)
    except (CompactedError, UnavailableError):
        return _send_snapshot(r, to, pr)
    if not ents and not send_if_empty:
        return False
    r.msgs.append(
        Message(
            MT.APP,
            to,
            r.id,
            r.term,
            prev_term,
            pr.next - 1,
            tuple(ents),
            r.log.committed,
        )
    )
    pr.sent_entries(ents[-1].index if ents else pr.next - 1, len(ents))
    return True


def _send_snapshot(r: Raft, to: int, pr: Progress) -> bool:
    if not pr.recent_active:
        return False
    try:
        snap = r.log.snapshot()
    except SnapshotTemporarilyUnavailableError:
        return False
    if snap.is_empty():
        logger.warning("%x needs to send a snapshot to %x but has none", r.id, to)
        return False
    r._send(Message(MT.SNAP, to=to, snapshot=snap))
    pr.become_snapshot(snap.metadata.index)
    return True


def send_heartbeat(r: Raft, to: int, ctx: bytes) -> None:
    pr = r.prs.progress[to]
    commit = min(pr.match, r.log.committed)
    r.msgs.append(Message(MT.HEARTBEAT, to, r.id, r.term, commit=commit, context=ctx))


def bcast_append(r: Raft) -> None:
    for i in r.prs.progress:
        if i != r.id:
            send_append(r, i)


def flush_pending_bcast(r: Raft) -> None:
    """Send the appends deferred by proposals (see ``Raft.bcast_pending``)."""
    r.bcast_pending = False
    if r.state is not StateType.LEADER:
        return
    for i in r.prs.progress:
        if i != r.id:
            maybe_send_append(r, i, False)


def bcast_heartbeat(r: Raft, ctx: bytes | None = None) -> None:
    if ctx is None:
        ctx = r.read_only.last_pending_request_ctx()
    for i in r.prs.progress:
        if i != r.id:
            send_heartbeat(r, i, ctx)
