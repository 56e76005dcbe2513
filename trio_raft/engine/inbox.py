"""The run loop's inbox: everything that reaches raft goes through here.

Owns the queues the run loop drains each turn (see ``loop.py``) and the event that wakes it:

* ``requests``: proposals, reads and admin requests from callers, in arrival order;
* ``priority`` and ``bulk``: inbound raft messages, each with the instant the transport read it
  (``transport.base.RECEIVED_AT``, None when unknown). Heartbeats, votes, read-index traffic
  and timeout-now (``PRIORITY_MESSAGE_TYPES``) queue apart from appends and snapshots, so a
  flood of appends never delays an election or a lease;
* ``reports``: what the dispatcher learned sending (peer unreachable, snapshot failed or
  delivered);
* ``ticks``: elapsed tick intervals not yet given to raft.

Invariants: only the run loop takes items out; anything may put items in (from the trio thread)
and must then call :meth:`Inbox.wake`, which every ``put`` method here does. The message queues
are bounded: a full queue refuses with :class:`~trio_raft.errors.StepQueueFullError` (counted),
and raft's retries cover the loss.
"""

from __future__ import annotations

import logging
import time
from collections import deque

import trio

from trio_raft.core.messages import PRIORITY_MESSAGE_TYPES, Message
from trio_raft.engine.dispatch import SendReport
from trio_raft.engine.requests import Request
from trio_raft.errors import StepQueueFullError

logger = logging.getLogger(__name__)

PRIORITY_QUEUE_CAPACITY = 1024


def bulk_queue_capacity(num_peers: int, max_inflight: int) -> int:
    """Room for a full pipeline of appends from every peer (``num_peers * max_inflight``),
    at least ``max_inflight`` and 128, and 1024 once the product would pass 1024."""
    scaled = 1024
    if max_inflight <= 1024 and num_peers > 0 and num_peers <= 1024 // max_inflight:
        scaled = num_peers * max_inflight
    return max(128, max(max_inflight, scaled))


class Inbox:
    """The queues of work for the run loop, and its wake-up event."""

    def __init__(self, bulk_capacity: int) -> None:
        self.requests: deque[Request] = deque()
        #: ``time.perf_counter()`` when the oldest request now queued was put (``stages.QUEUE``).
        self.requests_since = 0.0
        self.priority: deque[tuple[Message, float | None]] = deque()
        self.bulk: deque[tuple[Message, float | None]] = deque()
        self.reports: deque[tuple[int, SendReport]] = deque()
        self.ticks = 0
        self.close_requested = False
        self.bulk_capacity = bulk_capacity
        #: Inbound messages refused because their queue was full.
        self.full_count = 0
        self._wake = trio.Event()

    def wake(self) -> None:
        self._wake.set()

    def has_work(self) -> bool:
        return bool(
            self.ticks
            or self.requests
            or self.priority
            or self.bulk
            or self.reports
            or self.close_requested
        )

    async def wait(self) -> None:
        """Return once there is something to do."""
        while not self.has_work():
            self._wake = trio.Event()
            await self._wake.wait()

    def put_request(self, req: Request) -> None:
        if not self.requests:
            self.requests_since = time.perf_counter()
        self.requests.append(req)
        self.wake()

    def put_message(self, m: Message, received_at: float | None = None) -> None:
        """Queue an inbound raft message (read from the network at ``received_at``, when
        known); raises StepQueueFullError when its queue is full."""
        if m.type in PRIORITY_MESSAGE_TYPES:
            queue, cap = self.priority, PRIORITY_QUEUE_CAPACITY
        else:
            queue, cap = self.bulk, self.bulk_capacity
        if len(queue) >= cap:
            self.full_count += 1
            raise StepQueueFullError()
        queue.append((m, received_at))
        self.wake()

    def put_report(self, node_id: int, report: SendReport) -> None:
        """What a send to ``node_id`` came to (dropped when the queue is full: raft probes
        again)."""
        if len(self.reports) >= self.bulk_capacity:
            logger.warning("dispatch report queue full; dropping report for %x", node_id)
            return
        self.reports.append((node_id, report))
        self.wake()

    def put_tick(self) -> None:
        self.ticks += 1
        self.wake()

    def request_close(self) -> None:
        self.close_requested = True
        self.wake()
