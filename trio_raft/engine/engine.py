"""The Engine: trio_raft's public API over the sans-IO core.

Everything that touches the RawNode happens in one task, the run loop (``loop.py``). Public
methods either read state the loop caches after every Ready (plain methods), or put a request
in the loop's inbox and await a :class:`Waiter` (async methods). Cancelling a waiting caller only
stops the wait: an entry already handed to raft may still commit.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import outcome
import trio

from trio_raft.core.messages import StateType
from trio_raft.engine.config import OpenConfig, lease_duration
from trio_raft.engine.envelope_support import EnvelopeMixin
from trio_raft.engine.loop import RunLoop
from trio_raft.engine.requests import ProposeRequest, ReadRequest
from trio_raft.engine.types import (
    Configuration,
    LeaderInfo,
    PeerProgress,
    ProposalResult,
    State,
    Status,
)
from trio_raft.engine.waiters import CallbackWaiter, Waiter
from trio_raft.errors import (
    EngineClosedError,
    LeadershipTransferInProgressError,
    NotLeaderError,
)

logger = logging.getLogger(__name__)

_join_role_violation_total = 0


def join_role_violation_count() -> int:
    """Process-wide count of join-as-learner alarms (a learner-joined node found to be a voter)."""
    return _join_role_violation_total


def _bump_join_role_violation() -> None:
    global _join_role_violation_total
    _join_role_violation_total += 1


class Engine(EnvelopeMixin, RunLoop):
    """A running Raft node. Create it with :func:`open_engine`."""

    _yielded = False

    # -- proposals ---------------------------------------------------------------------
    async def propose(self, data: bytes) -> ProposalResult:
        """Replicate ``data`` and apply it; returns the commit index and the FSM's response.

        Raises NotLeaderError / LeadershipTransferInProgressError when rejected before reaching
        raft (certainly not applied), LeadershipLostError when leadership was lost while
        waiting (outcome unknown), EngineClosedError when the engine closes meanwhile.
        """
        return await self._propose(bytes(data), admin=False)

    async def propose_admin(self, data: bytes) -> ProposalResult:
        """Like :meth:`propose`, but admitted while the envelope cutover barrier is up."""
        return await self._propose(bytes(data), admin=True)

    def propose_nowait(
        self, data: bytes, on_done: Callable[[outcome.Outcome[ProposalResult]], object]
    ) -> None:
        """Submit ``data`` without waiting; for callers that hand many requests over from
        another thread and would otherwise start a trio task per request.

        Call it from the engine's trio thread (e.g. inside a function a portal hands over).
        ``on_done`` is called once, later, in that thread, with ``outcome.Value(ProposalResult)``
        or ``outcome.Error`` carrying the errors :meth:`propose` raises; it must not block.
        Rejections known at once (closed engine, envelope barrier) raise here instead.
        There is no cancellation: like a cancelled :meth:`propose`, an entry already handed
        to raft may still commit.
        """
        self._raise_if_closed()
        payload = self._envelope_payload(bytes(data), False)
        self._submit(
            ProposeRequest(self._next_request_id(), payload, CallbackWaiter(on_done), False)
        )

    async def _propose(self, data: bytes, *, admin: bool) -> ProposalResult:
        await trio.lowlevel.checkpoint_if_cancelled()
        self._raise_if_closed()
        data = self._envelope_payload(data, admin)  # wrap above the cutover (envelope_support)
        w = Waiter()
        rid = self._next_request_id()
        self._submit(ProposeRequest(rid, data, w, admin))
        try:
            result: ProposalResult = await w.wait()
            return result
        finally:
            self._pending_proposals.discard(rid, w)

    # -- reads -------------------------------------------------------------------------
    async def linearizable_read(self) -> int:
        """ReadIndex round: returns the read index once the local applied index reaches it."""
        return int(await self._read(wait_applied=True))

    async def verify_leader(self) -> None:
        """Confirm leadership with a quorum round (no apply wait)."""
        await self._read(wait_applied=False)

    async def _read(self, *, wait_applied: bool) -> int:
        await trio.lowlevel.checkpoint_if_cancelled()
        self._raise_if_closed()
        w = Waiter()
        rid = self._next_request_id()
        self._submit(ReadRequest(rid, w, wait_applied))
        try:
            return int(await w.wait())
        finally:
            self._pending_reads.discard(rid, w)

    async def check_serving(self) -> None:
        """Raise NotLeaderError unless the cached state is leader (no network round)."""
        await trio.lowlevel.checkpoint()
        self._raise_if_closed()
        if self._status.state is not State.LEADER:
            raise NotLeaderError()

    # -- cached state ------------------------------------------------------------------
    def applied_index(self) -> int:
        return self._applied

    def state(self) -> State:
        return self._status.state

    def leader(self) -> LeaderInfo:
        return self._status.leader

    def status(self) -> Status:
        return self._status

    def replication(self) -> dict[str, PeerProgress]:
        """The leader's view of every other member's log, keyed by server id.

        Empty unless this engine is the leader. ``match`` moves when a peer's acknowledgement
        arrives, which can be after the peer applied the entry; wait on it (not on the peer's
        ``applied_index()``) before ``promote_learner`` with a ``min_applied_index``.
        """
        node = self._node
        if node is None or self._closed or node.raft.state is not StateType.LEADER:
            return {}
        out: dict[str, PeerProgress] = {}
        for nid, pr in node.raft.prs.progress.items():
            if nid == self._node_id:
                continue
            p = self._peers.get(nid)
            sid = p.id if p is not None else str(nid)
            out[sid] = PeerProgress(
                id=sid,
                match=pr.match,
                next=pr.next,
                state=pr.state.value,
                learner=pr.is_learner,
                recent_active=pr.recent_active,
            )
        return out

    def lease_duration(self) -> float:
        return lease_duration(self._cfg)

    def last_quorum_ack(self) -> float | None:
        """trio clock instant by which a quorum last answered this leader; None when unknown."""
        if self._status.state is not State.LEADER:
            return None
        if self._single_node_ack is not None:
            return self._single_node_ack
        return self._acks.published

    def lease_valid(self) -> bool:
        """Whether a lease read may be served locally now (caller-side validity of spec b.6)."""
        ack = self.last_quorum_ack()
        if ack is None:
            return False
        now = trio.current_time()
        return ack <= now and now - ack < self.lease_duration()

    async def configuration(self) -> Configuration:
        await trio.lowlevel.checkpoint()
        return self._configuration()

    # -- callbacks ---------------------------------------------------------------------
    def register_leader_acquired_callback(
        self, fn: Callable[[], object] | None
    ) -> Callable[[], None]:
        return self._on_acquired.register(fn)

    def register_leader_loss_callback(self, fn: Callable[[], object] | None) -> Callable[[], None]:
        return self._on_lost.register(fn)

    # -- counters ----------------------------------------------------------------------
    def dispatch_drop_count(self) -> int:
        return self._dispatcher.stats.drop_count

    def dispatch_error_count(self) -> int:
        return self._dispatcher.stats.error_count

    def dispatch_error_counts_by_code(self) -> dict[str, int]:
        return dict(self._dispatcher.stats.errors_by_code)

    def step_queue_full_count(self) -> int:
        return self._step_queue_full

    # -- lifecycle ---------------------------------------------------------------------
    def err(self) -> BaseException | None:
        return self._run_error

    async def wait_closed(self) -> None:
        await self._done.wait()

    async def aclose(self) -> None:
        """Close the engine: pending callers get EngineClosedError; tasks stop."""
        self._close_requested = True
        self._wake()
        with trio.CancelScope(shield=True):
            await self._done.wait()

    def _raise_if_closed(self) -> None:
        if self._closed:
            if self._run_error is not None:
                raise self._run_error
            raise EngineClosedError()

    def _check_transfer(self) -> None:
        if self._lead_transferee:
            raise LeadershipTransferInProgressError()


@asynccontextmanager
async def open_engine(config: OpenConfig) -> AsyncIterator[Engine]:
    """Open (and on exit close) an engine. A fatal error cancels the block and is re-raised."""
    engine = Engine(config)
    await engine._open_disk()
    try:
        async with trio.open_nursery() as nursery:
            engine._nursery = nursery
            await nursery.start(engine._run)
            if not engine._closed:
                engine._yielded = True
                try:
                    yield engine
                finally:
                    await engine.aclose()
            nursery.cancel_scope.cancel()
    finally:
        await engine._close_disk()
    if engine._run_error is not None:
        raise engine._run_error
    if not engine._yielded:
        raise EngineClosedError("engine stopped during startup")
