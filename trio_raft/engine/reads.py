"""Linearizable reads, leader verification and the lease probe, batched into ReadIndex rounds.

A read is safe once this node (1) knows a commit index that the leader held at a moment, after
the read arrived, when it was certainly still leader, and (2) has applied up to it (Raft thesis
§6.4). One *round* is one raft ReadIndex: the leader records its commit index, confirms with a
heartbeat round that a quorum still follows it, and answers with that index (the *read index*).
On a follower, raft forwards the round to the leader and the leader's answer comes back (Raft
thesis §6.4, "reads from followers"); the follower then waits until it has applied the index
and serves the read from its own state machine.

Batching. At most one round of this node is in flight. Reads that arrive meanwhile wait for the
*next* round, which starts as soon as the current one completes, and carries them all: one
quorum confirmation serves every read that arrived before its round was started.

Safety argument. A round's read index is the leader's commit index at the moment the leader
handles the round, which is after the round was started here, which is after every read in the
round arrived (a read is put in a round only when that round starts, never into one already
sent). The leader's commit index then covers every write acknowledged before that moment
(Leader Completeness, Raft paper §5.4; raft holds a new leader's rounds until it has committed
an entry of its own term), and the quorum confirmation shows no other leader could have
acknowledged a newer write at that moment. So a read released with that index, once it is
applied here, sees every write that completed before the read arrived: it is linearizable.
``test_reads.py`` fails if a read is ever served from a round started before it arrived.

Rounds that never answer (the forward to the leader lost, the leader gone) are started again
after an election timeout with every read they held, plus any that arrived meanwhile; the new
round is started after all of them arrived, so the argument above holds for it too.

The leader batches too (``trio_raft/core/readonly.py``, "Batching"): while one heartbeat
broadcast for rounds is in flight, rounds that reach it (its own, and those followers forward)
wait for the next broadcast, which carries the newest of their contexts. Every round is still
confirmed only by a broadcast sent after it reached the leader, which is after it was started
here, so the argument above is unchanged.

``verify_leader`` uses the same rounds, without waiting for apply, and only on the leader. The
leader's lease (``lease.py``) is fed by the same rounds: a round this node started is stamped
with the trio clock instant it started (``started_at``), and every voter that echoes it in a
heartbeat answer heard from this leader after that instant. A round a follower forwarded is
stamped with the instant the leader's loop took it (``note_forwarded``): its context, too, is
only broadcast after that, and with batching the broadcast may carry a follower's context
rather than the leader's own. When no round was started for a heartbeat interval, the leader
starts one with no reads in it (the lease probe).
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Callable

import attrs
import trio

from trio_raft.core.errors import RaftError as CoreRaftError
from trio_raft.core.messages import Ready
from trio_raft.core.rawnode import RawNode
from trio_raft.engine.contexts import decode_read_context, encode_read_context
from trio_raft.engine.requests import ReadRequest
from trio_raft.engine.stages import READ_ROUND, StageSink
from trio_raft.engine.waiters import Waiter

#: Rounds whose start instant is remembered for crediting late heartbeat answers.
_REMEMBERED_ROUNDS = 64


@attrs.define(slots=True)
class _PendingRead:
    waiter: Waiter
    wait_applied: bool
    #: The read index once its round answered (0 while unknown).
    index: int = 0


@attrs.define(slots=True)
class _Round:
    round_id: int
    started_at: float
    reads: list[int]


class Reads:
    """Pending reads of this node and its ReadIndex rounds (see the module docstring)."""

    def __init__(self, node: RawNode, *, retry_after: float, probe_interval: float,
                 stage: StageSink | None = None) -> None:
        self._node = node
        #: Told of the ``read_round`` stage (None: not timed).
        self._stage = stage
        self._retry_after = retry_after
        self._probe_interval = probe_interval
        self._pending: dict[int, _PendingRead] = {}
        #: Admitted reads not yet in a round, in arrival order.
        self._waiting: list[int] = []
        self._in_flight: _Round | None = None
        self._round_ids = secrets.randbits(62)
        self._last_start = float("-inf")
        #: Start instants of recent rounds this node started, for the lease.
        self._started: OrderedDict[int, float] = OrderedDict()
        #: When this node (as leader) took recent rounds followers forwarded, by context.
        self._forwarded: OrderedDict[bytes, float] = OrderedDict()
        #: Rounds started so far (for tests and metrics).
        self.rounds = 0

    def __len__(self) -> int:
        return len(self._pending)

    # -- caller side ---------------------------------------------------------------------------
    def add(self, req: ReadRequest) -> None:
        """Register the read before it is queued for the loop."""
        self._pending[req.request_id] = _PendingRead(req.waiter, req.wait_applied)

    def add_known(self, req: ReadRequest, index: int) -> None:
        """Register a read whose read index is already known (a lease read: the leader's
        commit index while its lease holds); it is released once ``index`` is applied."""
        self._pending[req.request_id] = _PendingRead(req.waiter, True, index)

    def discard(self, request_id: int, waiter: Waiter) -> None:
        """Forget a read whose caller stopped waiting."""
        p = self._pending.get(request_id)
        if p is not None and p.waiter is waiter:
            del self._pending[request_id]

    # -- loop side -----------------------------------------------------------------------------
    def admit(self, req: ReadRequest, reject: BaseException | None) -> None:
        """Take ``req`` from the inbox: fail it with ``reject``, or queue it for the next
        round (started by :meth:`start_rounds`)."""
        if req.waiter.done or req.request_id not in self._pending:
            return
        if reject is not None:
            del self._pending[req.request_id]
            req.waiter.fail(reject)
            return
        self._waiting.append(req.request_id)

    def start_rounds(self, *, is_leader: bool, has_followers: bool) -> None:
        """After the inbox was taken: start the next round when reads wait and none is in
        flight; retry a round that did not answer; on a leader, probe the lease."""
        now = trio.current_time()
        current = self._in_flight
        if current is not None and now - current.started_at >= self._retry_after:
            self._waiting[:0] = current.reads
            self._in_flight = current = None
        if current is not None:
            return
        live = [rid for rid in self._waiting if rid in self._pending]
        self._waiting = []
        probe = is_leader and has_followers and now - self._last_start >= self._probe_interval
        if not live and not probe:
            return
        self._round_ids += 1
        rnd = _Round(self._round_ids, now, live)
        try:
            self._node.read_index(encode_read_context(rnd.round_id))
        except CoreRaftError:
            self._waiting = live
            return
        self._in_flight = rnd
        self._last_start = now
        self.rounds += 1
        self._started[rnd.round_id] = now
        while len(self._started) > _REMEMBERED_ROUNDS:
            self._started.popitem(last=False)

    def on_ready(self, rd: Ready) -> None:
        """A round answered: its reads learn their read index (verifications are done)."""
        for rs in rd.read_states:
            round_id = decode_read_context(rs.request_ctx)
            current = self._in_flight
            if round_id is None or current is None or round_id != current.round_id:
                continue
            self._in_flight = None
            if self._stage is not None:
                self._stage(READ_ROUND, trio.current_time() - current.started_at,
                            time.perf_counter())
            for rid in current.reads:
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

    def note_forwarded(self, ctx: bytes) -> None:
        """A follower's round ``ctx`` reached this node's loop now (the first time counts: a
        heartbeat carrying it may have left since)."""
        if ctx in self._forwarded:
            return
        self._forwarded[ctx] = trio.current_time()
        while len(self._forwarded) > _REMEMBERED_ROUNDS:
            self._forwarded.popitem(last=False)

    def started_at(self, ctx: bytes) -> float | None:
        """When this node started the round ``ctx`` names, or took it from a follower (None:
        neither)."""
        round_id = decode_read_context(ctx)
        started = None if round_id is None else self._started.get(round_id)
        return started if started is not None else self._forwarded.get(ctx)

    def has_work(self) -> bool:
        return bool(self._waiting) or self._in_flight is not None

    def fail_all(self, error_factory: Callable[[], BaseException],
                 skip: frozenset[int] = frozenset()) -> None:
        """Fail every pending read but those in ``skip`` (still queued: raft never saw them);
        the round in flight is abandoned."""
        pending = self._pending
        self._pending = {k: p for k, p in pending.items() if k in skip}
        self._waiting = []
        self._in_flight = None
        for k, p in pending.items():
            if k not in skip:
                p.waiter.fail(error_factory())
