"""ReadIndex bookkeeping for ReadOnlySafe reads (Raft thesis §6.4).

A read request is tagged with the commit index at the time it arrived; it becomes servable once a
quorum of voters has acknowledged a heartbeat carrying the request's context, which proves this
node was still the leader when the read arrived.
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
    __slots__ = ("pending", "queue")

    def __init__(self) -> None:
        self.pending: dict[bytes, ReadIndexStatus] = {}
        self.queue: list[bytes] = []

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

    def last_pending_request_ctx(self) -> bytes:
        return self.queue[-1] if self.queue else b""
