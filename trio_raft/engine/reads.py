"""Linearizable reads and leader verification through raft's ReadIndex (Raft thesis §6.4).

A read is safe once this node (1) knows the leader's commit index at a moment it was certainly
leader, and (2) has applied up to it. ``linearizable_read`` asks raft for a ReadIndex round:
the leader records its commit index, confirms with a heartbeat round that a quorum still follows
it, and answers with that index (the *read index*); the caller is released once the applied
index reaches it. ``verify_leader`` is the same round without the wait for apply.

``Reads`` owns the pending reads (request id -> caller) and matches raft's read states to them
by the request id carried in the round's context (``contexts.encode_read_context``).

Invariants: a read is only ever released with the index of a round started after the read
arrived (the context names the read); a released read is forgotten; leader loss, close and fatal
errors fail every pending read (``fail_all``).
"""

from __future__ import annotations

from collections.abc import Callable

import attrs

from trio_raft.core.messages import Ready
from trio_raft.core.rawnode import RawNode
from trio_raft.engine.contexts import decode_read_context, encode_read_context
from trio_raft.engine.requests import ReadRequest
from trio_raft.engine.waiters import Waiter


@attrs.define(slots=True)
class _PendingRead:
    waiter: Waiter
    wait_applied: bool
    #: The read index once raft answered (0 while unknown).
    index: int = 0


class Reads:
    """Pending ReadIndex requests of this node (see the module docstring)."""

    def __init__(self, node: RawNode) -> None:
        self._node = node
        self._pending: dict[int, _PendingRead] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, req: ReadRequest) -> None:
        """Caller side: register the read before it is queued for the loop."""
        self._pending[req.request_id] = _PendingRead(req.waiter, req.wait_applied)

    def discard(self, request_id: int, waiter: Waiter) -> None:
        """Caller side: forget a read whose caller stopped waiting."""
        p = self._pending.get(request_id)
        if p is not None and p.waiter is waiter:
            del self._pending[request_id]

    def start(self, req: ReadRequest, reject: BaseException | None) -> None:
        """Loop side: start the ReadIndex round of ``req`` (or fail it with ``reject``)."""
        if req.waiter.done:
            return
        if reject is not None:
            self.discard(req.request_id, req.waiter)
            req.waiter.fail(reject)
            return
        self._node.read_index(encode_read_context(req.request_id))

    def on_ready(self, rd: Ready) -> None:
        """Record the read indexes raft answered with; release leader verifications."""
        for rs in rd.read_states:
            rid = decode_read_context(rs.request_ctx)
            if rid is None:
                continue
            p = self._pending.get(rid)
            if p is None:
                continue
            if p.wait_applied:
                p.index = rs.index
            else:
                del self._pending[rid]
                p.waiter.resolve(rs.index)

    def release_applied(self, applied: int) -> None:
        """Release every read whose read index is applied."""
        if not self._pending:
            return
        for rid, p in list(self._pending.items()):
            if 0 < p.index <= applied:
                del self._pending[rid]
                p.waiter.resolve(p.index)

    def fail_all(self, error_factory: Callable[[], BaseException],
                 skip: frozenset[int] = frozenset()) -> None:
        """Fail every pending read but those in ``skip`` (still queued: raft never saw them)."""
        pending = self._pending
        self._pending = {k: p for k, p in pending.items() if k in skip}
        for k, p in pending.items():
            if k not in skip:
                p.waiter.fail(error_factory())
