"""Where one write's time goes: the per-stage timing of proposals, replication and reads.

The run loop and its collaborators time the stages below and report each as
``StageObserver.stage(name, seconds, ended)`` (``observer.py``; ``trio_raft.metrics`` turns
them into one histogram with a ``stage`` label). Every node reports what happens in its own
process, with ``time.perf_counter()``; a stage that spans two processes (a message's trip
between them) is the gap between one node's stage and the other's, which only a reader with a
clock both share can measure (``bench/latency_bench.py`` does, on one machine).

=================  ===============================================================================
stage              from -> to
=================  ===============================================================================
``queue``          a request put in the inbox -> taken by the run loop (the oldest one of a turn)
``wal``            one Ready's WAL write and fsync, inside the storage call
``wal_handoff``    the thread hand-offs around ``wal``: trio -> worker thread -> trio (what the
                   run loop waited minus ``wal``, ending when the loop resumed; 0 when storage
                   runs on the trio thread)
``send``           a replication message (an append carrying entries, or an append's answer)
                   handed to its peer's lane -> written to the peer's stream
``send_handoff``   the end of ``send`` from the moment the sender task handed the message to the
                   transport: encoding and the write (on a grpclib lane, with the trio ->
                   asyncio hop; a native lane crosses no thread, docs/transport.md 3.8)
``receive``        a replication message read from the network -> stepped by the loop
``receive_handoff``  the start of ``receive`` until the trio side has the message (a grpclib
                   lane: the asyncio -> trio hop; a native lane: HTTP/2 and decoding)
``replicate``      leader: an append written to a follower's stream -> that follower's answer
                   stepped (the follower's whole part: network both ways, its receive, fsync
                   and answer)
``commit``         leader: the commit index moved -> applying those entries begins
``apply``          one Ready's committed entries given to the state machine
``answer``         leader: a proposer's entry applied -> the proposer resumed (the first
                   ``Engine.propose`` caller of each Ready)
``read_round``     a ReadIndex round started on this node -> its read index known
=================  ===============================================================================

Per-request stages are sampled once per turn of the run loop (the oldest request queued, the
first caller answered), so their cost does not grow with the load; at one request in flight
every request is timed. Nothing is timed unless the observer has a ``stage`` method of its own
(:func:`stage_sink`): the default observer costs nothing here.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

from trio_raft.core.messages import Entry, Message, MessageType

logger = logging.getLogger(__name__)

QUEUE: Final = "queue"
WAL: Final = "wal"
WAL_HANDOFF: Final = "wal_handoff"
SEND: Final = "send"
SEND_HANDOFF: Final = "send_handoff"
RECEIVE: Final = "receive"
RECEIVE_HANDOFF: Final = "receive_handoff"
REPLICATE: Final = "replicate"
COMMIT: Final = "commit"
APPLY: Final = "apply"
ANSWER: Final = "answer"
READ_ROUND: Final = "read_round"

#: Every stage, in the order a write meets them.
STAGES: Final = (QUEUE, WAL, WAL_HANDOFF, SEND, SEND_HANDOFF, RECEIVE, RECEIVE_HANDOFF,
                 REPLICATE, COMMIT, APPLY, ANSWER, READ_ROUND)

#: ``sink(stage, seconds, ended)``: ``ended`` is the ``time.perf_counter()`` instant the stage
#: ended. Never raises (``observer.SafeObserver`` logs instead).
StageSink = Callable[[str, float, float], None]


def stage_sink(observer: object) -> StageSink | None:
    """The observer's ``stage`` method when it has one that does something (None otherwise:
    nothing is timed). ``observer.NullObserver.stage`` (and a subclass that keeps it) does
    nothing."""
    from trio_raft.engine.observer import NullObserver, SafeObserver

    inner = observer.inner if isinstance(observer, SafeObserver) else observer
    fn = getattr(type(inner), "stage", None)
    if fn is None or fn is NullObserver.stage:
        return None
    sink: StageSink = observer.stage  # type: ignore[attr-defined]
    return sink


class ReplicationClock:
    """Leader side of ``replicate``: when each append (by the index of its last entry) was
    written to each follower's stream, until that follower acknowledges it.

    Bounded per follower (:data:`KEEP` appends): a follower that never answers costs nothing
    more than that.
    """

    KEEP: Final = 64

    __slots__ = ("_written",)

    def __init__(self) -> None:
        self._written: dict[int, deque[tuple[int, float]]] = {}

    def written(self, peer: int, last_index: int, at: float) -> None:
        q = self._written.get(peer)
        if q is None:
            q = self._written[peer] = deque(maxlen=self.KEEP)
        q.append((last_index, at))

    def acked(self, peer: int, index: int, now: float) -> float | None:
        """``peer`` holds the log up to ``index``: the seconds since the newest append this
        answers was written (None when none was timed). Older appends it covers are dropped."""
        q = self._written.get(peer)
        if not q:
            return None
        last: float | None = None
        while q and q[0][0] <= index:
            last = q.popleft()[1]
        return None if last is None else now - last

    def forget(self, peer: int) -> None:
        self._written.pop(peer, None)


def is_replication(m: Message) -> bool:
    """Whether ``m`` is a replication message whose ``receive`` stage is timed (an append
    carrying entries, or an append's answer)."""
    return (m.type is MessageType.APP and bool(m.entries)) or m.type is MessageType.APP_RESP


class LoopTimer:
    """The run loop's stages (``loop.py``): ``queue``, ``receive``, ``receive_handoff``,
    ``replicate``, ``commit``, ``apply`` and ``answer``; the loop holds one only when stages
    are timed, and tells it what happened.

    Between turns it remembers two instants: when the commit index last moved (``commit``
    ends when applying begins) and when the last applied Ready finished (``answer`` ends when
    the first proposer of it resumes).
    """

    __slots__ = ("_answer_from", "_commit_moved", "_replication", "_sink")

    def __init__(self, sink: StageSink, replication: ReplicationClock) -> None:
        self._sink = sink
        self._replication = replication
        self._commit_moved: float | None = None
        self._answer_from: float | None = None

    def queued(self, since: float) -> None:
        """The loop took the requests queued since ``since``."""
        now = time.perf_counter()
        self._sink(QUEUE, now - since, now)

    def handed_over(self, m: Message, received: float | None) -> None:
        """The transport's handler queued ``m``, read from the network at ``received``."""
        if received is not None and is_replication(m):
            now = time.perf_counter()
            self._sink(RECEIVE_HANDOFF, now - received, now)

    def stepped(self, m: Message, received: float | None, committed_before: int,
                committed_after: int) -> None:
        """Raft stepped ``m``; the commit index went from ``committed_before`` to
        ``committed_after``."""
        if not is_replication(m):
            return
        now = time.perf_counter()
        if received is not None:
            self._sink(RECEIVE, now - received, now)
        if m.type is MessageType.APP_RESP and not m.reject:
            took = self._replication.acked(m.from_, m.index, now)
            if took is not None:
                self._sink(REPLICATE, took, now)
            if committed_after > committed_before:
                self.commit_moved(now)

    def commit_moved(self, now: float | None = None) -> None:
        if self._commit_moved is None:
            self._commit_moved = time.perf_counter() if now is None else now

    async def apply(self, apply: Callable[[Sequence[Entry]], Awaitable[None]],
                    entries: Sequence[Entry]) -> None:
        started = time.perf_counter()
        if self._commit_moved is not None:
            self._sink(COMMIT, started - self._commit_moved, started)
            self._commit_moved = None
        await apply(entries)
        self._answer_from = now = time.perf_counter()
        self._sink(APPLY, now - started, now)

    def answered(self) -> None:
        """A proposer resumed with its result."""
        if self._answer_from is not None:
            now = time.perf_counter()
            self._sink(ANSWER, now - self._answer_from, now)
            self._answer_from = None
