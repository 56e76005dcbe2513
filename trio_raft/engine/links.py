"""The run loop's links to the outside: the transport, the tick, and what comes back in.

``Links`` owns the engine's side of the transport (``transport/base.py``): attaching it with
the inbound handler and the snapshot exchange, serving it when the engine built it, opening the
dispatcher's lanes to the current peers; the tick task that turns trio's clock into raft ticks;
and the two ways work comes back to the loop from other tasks: inbound messages
(``handle_inbound``, called by the transport) and send reports (``on_send_report``, called by
the dispatcher's sender tasks). Both only queue into the loop's inbox (``inbox.py``); raft is
touched by the run loop alone (``loop.py``).

Invariants: nothing is queued once the engine has stopped (``closed()``); an inbound message
that arrives before the loop has started waits for it (at most 5 s), then is refused.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from trio_raft.core.messages import Message, MessageType
from trio_raft.engine.dispatch import Dispatcher, SendReport
from trio_raft.engine.inbox import Inbox
from trio_raft.engine.membership import Membership
from trio_raft.engine.observer import EngineCounters
from trio_raft.engine.stages import LoopTimer
from trio_raft.errors import EngineClosedError
from trio_raft.storage.snapshot_exchange import SnapshotExchange
from trio_raft.transport.base import RECEIVED_AT, ServingTransport, Transport


class Links:
    """See the module docstring."""

    def __init__(self, *, transport: Transport | None, owned: ServingTransport | None,
                 inbox: Inbox, counters: EngineCounters, closed: Callable[[], bool],
                 tick_interval: float) -> None:
        self.transport = transport
        #: The transport when the engine built it and runs it itself (else None).
        self.owned_transport = owned
        self._inbox = inbox
        self._counters = counters
        self._closed = closed
        self._tick_interval = tick_interval
        #: Set once the loop runs (inbound messages wait for it).
        self.started = trio.Event()
        #: Where stage timings of inbound messages go (set by the loop when it times them).
        self.timer: LoopTimer | None = None

    async def start(self, nursery: trio.Nursery, *, exchange: SnapshotExchange,
                    dispatcher: Dispatcher, membership: Membership,
                    commit_broadcast_delay: float) -> None:
        """Attach (and serve) the transport, open the lanes, start ticking."""
        t = self.transport
        if t is not None:
            t.attach(self.handle_inbound, exchange)
            if self.owned_transport is not None:
                await nursery.start(self.owned_transport.serve)
            dispatcher.start(nursery, commit_broadcast_delay)
            for p in membership.remote_peers():
                dispatcher.add_peer(p)
        nursery.start_soon(self._tick_forever)

    async def _tick_forever(self) -> None:
        interval = self._tick_interval
        deadline = trio.current_time()
        while True:
            deadline += interval
            await trio.sleep_until(deadline)
            self._inbox.put_tick()

    async def handle_inbound(self, m: Message) -> None:
        """The transport's inbound handler: queue ``m`` for the loop, or raise."""
        if not self.started.is_set():
            with trio.move_on_after(5):
                await self.started.wait()
        if self._closed() or not self.started.is_set():
            raise EngineClosedError()
        received = RECEIVED_AT.get()
        self._inbox.put_message(m, received)
        if self.timer is not None:
            self.timer.handed_over(m, received)
        if m.type is MessageType.SNAP:
            self._counters.snapshots_received += 1

    def on_send_report(self, node_id: int, report: SendReport) -> None:
        """A sender task's report on a send (the loop tells raft)."""
        if report is SendReport.SNAPSHOT_SENT:
            self._counters.snapshots_sent += 1
        if not self._closed():
            self._inbox.put_report(node_id, report)
