"""The leader's outbound replication: appends, snapshots and heartbeats to followers.

Mixed into :class:`~trio_raft.core.raft.Raft`; split out to keep that module readable. Appends
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
    from trio_raft.core.log import RaftLog
    from trio_raft.core.readonly import ReadOnly
    from trio_raft.core.tracker import ProgressTracker

logger = logging.getLogger(__name__)
MT = MessageType


class ReplicationMixin:
    id: int
    term: int
    state: StateType
    log: RaftLog
    prs: ProgressTracker
    msgs: list[Message]
    max_msg_size: int
    bcast_pending: bool
    read_only: ReadOnly

    def _send(self, m: Message) -> None:
        raise NotImplementedError

    def send_append(self, to: int) -> None:
        self.maybe_send_append(to, True)

    def maybe_send_append(self, to: int, send_if_empty: bool) -> bool:
        pr = self.prs.progress.get(to)
        if pr is None or pr.is_paused():
            return False
        try:
            prev_term = self.log.term(pr.next - 1)
            ents = self.log.entries(pr.next, self.max_msg_size)
        except (CompactedError, UnavailableError):
            return self._send_snapshot(to, pr)
        if not ents and not send_if_empty:
            return False
        self.msgs.append(
            Message(
                MT.APP,
                to,
                self.id,
                self.term,
                prev_term,
                pr.next - 1,
                tuple(ents),
                self.log.committed,
            )
        )
        pr.sent_entries(ents[-1].index if ents else pr.next - 1, len(ents))
        return True

    def _send_snapshot(self, to: int, pr: Progress) -> bool:
        if not pr.recent_active:
            return False
        try:
            snap = self.log.snapshot()
        except SnapshotTemporarilyUnavailableError:
            return False
        if snap.is_empty():
            logger.warning("%x needs to send a snapshot to %x but has none", self.id, to)
            return False
        self._send(Message(MT.SNAP, to=to, snapshot=snap))
        pr.become_snapshot(snap.metadata.index)
        return True

    def send_heartbeat(self, to: int, ctx: bytes) -> None:
        pr = self.prs.progress[to]
        commit = min(pr.match, self.log.committed)
        self.msgs.append(
            Message(MT.HEARTBEAT, to, self.id, self.term, commit=commit, context=ctx)
        )

    def bcast_append(self) -> None:
        for i in self.prs.progress:
            if i != self.id:
                self.send_append(i)

    def flush_pending_bcast(self) -> None:
        """Send the appends deferred by proposals (see ``bcast_pending``)."""
        self.bcast_pending = False
        if self.state is not StateType.LEADER:
            return
        for i in self.prs.progress:
            if i != self.id:
                self.maybe_send_append(i, False)

    def bcast_heartbeat(self, ctx: bytes | None = None) -> None:
        if ctx is None:
            ctx = self.read_only.last_pending_request_ctx()
        for i in self.prs.progress:
            if i != self.id:
                self.send_heartbeat(i, ctx)

