"""Every caller waiting on the engine, by request, and how they are failed in bulk.

``Pending`` holds the three tables of waiters: proposals (by request id, matched when the entry
applies), reads (``reads.py``: matched to ReadIndex rounds) and admin requests (matched when a
configuration change applies). A caller registers before its request is queued and forgets it
when it stops waiting, so a cancelled caller leaves nothing behind.

Bulk failure distinguishes what raft has seen from what it has not (``docs/api.md``, errors):
requests still queued in the inbox are "not applied"; the others get the outcome the event
implies (leadership lost, closed, failed: "outcome unknown").
"""

from __future__ import annotations

from collections.abc import Callable

from trio_raft.engine.inbox import Inbox
from trio_raft.engine.reads import Reads
from trio_raft.engine.requests import ProposeRequest, ReadRequest, Request
from trio_raft.engine.waiters import WaiterTable


class Pending:
    """See the module docstring."""

    def __init__(self, reads: Reads) -> None:
        self.proposals = WaiterTable()
        self.reads = reads
        self.admin = WaiterTable()

    def register(self, req: Request) -> None:
        if isinstance(req, ProposeRequest):
            self.proposals.add(req.request_id, req.waiter)
        elif isinstance(req, ReadRequest):
            self.reads.add(req)
        else:
            self.admin.add(req.request_id, req.waiter)

    def forget(self, req: Request) -> None:
        """The caller of ``req`` stopped waiting (answered, failed or cancelled)."""
        if isinstance(req, ProposeRequest):
            self.proposals.discard(req.request_id, req.waiter)
        elif isinstance(req, ReadRequest):
            self.reads.discard(req.request_id, req.waiter)
        else:
            self.admin.discard(req.request_id, req.waiter)

    def fail_seen(self, factory: Callable[[], BaseException], inbox: Inbox) -> None:
        """Fail every caller whose request raft has seen (not the ones still queued in
        ``inbox``), each with a fresh ``factory()``."""
        skip = frozenset(req.request_id for req in inbox.requests)
        self.proposals.fail_all(factory, skip)
        self.reads.fail_all(factory, skip)
        self.admin.fail_all(factory, skip)

    def fail_queued(self, factory: Callable[[], BaseException], inbox: Inbox) -> None:
        """Fail the requests still queued in ``inbox``: raft never saw them."""
        requests = inbox.requests
        while requests:
            req = requests.popleft()
            self.forget(req)
            req.waiter.fail(factory())
