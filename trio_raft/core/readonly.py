"""ReadIndex bookkeeping for ReadOnlySafe reads (Raft thesis §6.4).

A read request is tagged with the commit index at the time it arrived; it becomes servable once a
quorum of voters has acknowledged a heartbeat carrying the request's context, which proves this
node was still the leader when the read arrived.

Batching (rounds). At most one heartbeat broadcast for reads is in flight (``in_flight``, the
context it carries). Requests that arrive meanwhile are queued behind it and wait: when it is
confirmed, :meth:`ReadOnly.take_round` names the newest queued context, and one broadcast
carrying it serves them all (:meth:`ReadOnly.advance` pops every request queued up to a
confirmed context). Whatever confirms a request, a heartbeat carrying its own context or a
later one, was sent after the request was queued: a request is never served by a broadcast
that left before it arrived, so the argument above holds for each of them.
"""

from __future__ import annotations

import attrs

from trio_raft.core.messages import Message


@attrs.define(slots=True)
class ReadIndexStatus:
    req: Message
    index: int
    acks: dict[int, bool] = attrs.field(factory=dict)


class ReadOnly:
    __slots__ = ("in_flight", "pending", "queue")

    def __init__(self) -> None:
        self.pending: dict[bytes, ReadIndexStatus] = {}
        self.queue: list[bytes] = []
        #: The context of the broadcast for reads in flight (None: none, or it was confirmed).
        self.in_flight: bytes | None = None

    def add_request(self, index: int, m: Message) -> None:
        ctx = m.entries[0].data
        if ctx in self.pending:
            return
        self.pending[ctx] = ReadIndexStatus(m, index)
        self.queue.append(ctx)

    def recv_ack(self, node_id: int, ctx: bytes) -> dict[int, bool] | None:
        rs = self.pending.get(ctx)
        if rs is None:
            return None
        rs.acks[node_id] = True
        return rs.acks

    def advance(self, ctx: bytes) -> list[ReadIndexStatus]:
        """Pop every request up to and including ``ctx`` (earlier ones are confirmed too)."""
        if ctx not in self.pending:
            return []
        out: list[ReadIndexStatus] = []
        n = 0
        for c in self.queue:
            n += 1
            out.append(self.pending.pop(c))
            if c == ctx:
                break
        del self.queue[:n]
        return out

    def take_round(self) -> bytes | None:
        """The context to broadcast now for the queued requests: the newest one, unless a
        broadcast is still in flight (its requests not yet confirmed) or nothing is queued;
        None then."""
        if self.in_flight is not None and self.in_flight in self.pending:
            return None
        self.in_flight = self.queue[-1] if self.queue else None
        return self.in_flight

    def last_pending_request_ctx(self) -> bytes:
        return self.queue[-1] if self.queue else b""
