"""The run loop: the one task that owns the RawNode, and the collaborators it calls.

Theory of operation
-------------------
Callers and the transport never touch raft. They put work in the :class:`Inbox` (requests,
inbound messages, dispatch reports, ticks) and it wakes the loop. Each turn the loop drains
*everything* waiting, feeds it to raft, then handles Readys until raft has nothing more:

1. install the Ready's snapshot (``Applier.install_snapshot``: state machine restore, log
   storage, membership, peers file);
2. persist entries + hard state (+ snapshot marker) in one WAL write, fsynced when required
   (``LogWriter``: every proposal drained this turn shares one fsync, group commit);
3. only then hand messages to the per-peer lanes (``Dispatcher``);
4. apply committed entries in order (``Applier``), resolving the callers waiting on them;
5. record read states (``Reads``), ``advance``, maybe start a periodic snapshot
   (``Snapshots``), refresh the published status (``StatusView``) and act on leader edges.

On a leader the order of 2-4 differs (Raft thesis §10.2.1): appends carrying new entries go to
the lanes before its own WAL write (``parallel_leader_write``), since followers can write while
the leader does; a Ready with no new entries is applied before its messages (which only carry
the new commit index) are handed out, so proposers are answered first, except when it applies a
configuration change (which may remove the very peer that must learn of its commit).

Collaborators (each in its own module, built once, called explicitly): ``Inbox``, ``Links``
(the transport, the tick, inbound messages and send reports), ``Pending``, ``Admission``
(with ``AdminHandler``), ``LogWriter``, ``Applier``, ``Snapshots``, ``Membership``, ``Reads``,
``Lease``, ``EnvelopeGate``, ``StatusView``, ``Dispatcher``, ``LoopTimer`` (``stages.py``).
``docs/architecture.md`` lists the tasks and who cancels them.

Lifecycle: ``run`` (a task of the engine's nursery) starts the transport link, the tick task and
the lanes, then loops until ``request_close``, removal of this node, cancellation or a fatal
error. Every exit goes through ``_shutdown``: pending callers are failed, the status becomes
``shutdown``, and the nursery is cancelled so no task of the engine survives.
"""

from __future__ import annotations

import logging
import random
import secrets
from collections.abc import Callable
from typing import Any

import trio

from trio_raft.core.errors import RaftError as CoreRaftError
from trio_raft.core.errors import StepPeerNotFoundError
from trio_raft.core.messages import NONE, EntryType, Message, MessageType, Ready, StateType
from trio_raft.core.raft import Config as CoreConfig
from trio_raft.core.rawnode import RawNode
from trio_raft.engine import stages
from trio_raft.engine.admin import AdminHandler
from trio_raft.engine.admission import Admission
from trio_raft.engine.applier import Applier
from trio_raft.engine.config import OpenConfig
from trio_raft.engine.diskio import DiskRunner, InlineWrites
from trio_raft.engine.dispatch import Dispatcher, SendReport
from trio_raft.engine.envelope_gate import EnvelopeGate
from trio_raft.engine.inbox import Inbox, bulk_queue_capacity
from trio_raft.engine.lease import Lease
from trio_raft.engine.links import Links
from trio_raft.engine.membership import Membership
from trio_raft.engine.observer import EngineCounters, safe_observer
from trio_raft.engine.opening import OpenedState
from trio_raft.engine.pending import Pending
from trio_raft.engine.persist import LogWriter
from trio_raft.engine.reads import Reads
from trio_raft.engine.requests import ProposeRequest, Request
from trio_raft.engine.snapshots import Snapshots
from trio_raft.engine.status import Edge, StatusView
from trio_raft.engine.types import StateMachine, Status
from trio_raft.errors import (
    EngineClosedError,
    EngineClosedWhileWaitingError,
    EngineFailedError,
    LeadershipLostError,
)
from trio_raft.storage.snapshot_exchange import SnapshotExchange
from trio_raft.transport.base import ServingTransport, Transport

logger = logging.getLogger(__name__)


class RunLoop:
    """See the module docstring."""

    def __init__(self, cfg: OpenConfig, opened: OpenedState, io: DiskRunner,
                 transport: Transport | None, *, owned: ServingTransport | None) -> None:
        assert cfg.state_machine is not None
        fsm: StateMachine = cfg.state_machine
        self.cfg = cfg
        self.node_id = cfg.node_id
        self.local_id = cfg.local_id
        self.transport = transport
        self.disk = opened.disk
        self.storage = opened.storage
        self._io = io
        #: How snapshot payloads leave and arrive (given to the transport once).
        self.exchange = SnapshotExchange(self.disk.fsm_dir, lambda: self.applier.applied,
                                         file_io=self.disk.file_io,
                                         sealed_required=lambda i: self.gate.sealed_required(i))
        self.node = RawNode(
            CoreConfig(
                id=cfg.node_id,
                storage=opened.storage,
                rng=random.Random(cfg.rng_seed),
                election_tick=cfg.election_tick,
                heartbeat_tick=cfg.heartbeat_tick,
                applied=opened.applied,
                max_size_per_msg=cfg.max_size_per_msg,
                max_inflight_msgs=cfg.max_inflight_msg,
                check_quorum=True,
                pre_vote=cfg.pre_vote,
                self_ack_on_persist=cfg.parallel_leader_write,
            )
        )
        # Request ids travel inside log entries and are matched on apply by whichever node is
        # leader then; a random 62-bit start keeps ids from different nodes and from earlier
        # runs of this node from colliding with the ones this run waits on.
        self._request_ids = secrets.randbits(62)
        self.inbox = Inbox(bulk_queue_capacity(len(opened.peers), cfg.max_inflight_msg))
        self.membership = Membership(
            node_id=cfg.node_id, local_id=cfg.local_id, local_address=cfg.local_address,
            peers=opened.peers, conf_state=opened.conf_state,
            config_index=opened.config_index, fence=opened.fence,
            join_as_learner=cfg.join_as_learner)
        #: Told of WAL writes, proposals and stages (``observer.py``); counts kept here.
        self.observer = safe_observer(cfg.observer)
        self.counters = EngineCounters()
        #: The transport, the tick and what comes back in (``links.py``).
        self.links = Links(transport=transport, owned=owned, inbox=self.inbox,
                           counters=self.counters, closed=lambda: self.closed,
                           tick_interval=cfg.tick_interval)
        #: Where stage timings go (``stages.py``); None: nothing is timed.
        self.stage = stages.stage_sink(self.observer)
        self.reads = Reads(self.node, retry_after=cfg.election_tick * cfg.tick_interval,
                           probe_interval=cfg.heartbeat_tick * cfg.tick_interval,
                           stage=self.stage)
        self.pending = Pending(self.reads)
        self.lease = Lease(self.node, cfg.node_id)
        self.dispatcher = Dispatcher(transport, cfg.max_inflight_msg,
                                     self.links.on_send_report, self.stage)
        #: The loop's own stages (None: not timed).
        self.timer = self.links.timer = (
            None if self.stage is None
            else stages.LoopTimer(self.stage, self.dispatcher.replication))
        self.status_view = StatusView(self.node, self.membership, self.storage)
        self.gate = EnvelopeGate(
            cipher=cfg.raft_cipher, configured=cfg.raft_cutover_index, recorded=opened.cutover,
            data_dir=self.disk.data_dir, file_io=self.disk.file_io, inbox=self.inbox,
            proposals=self.pending.proposals, applied=lambda: self.applier.applied,
            tick_interval=cfg.tick_interval)
        self.log_writer = LogWriter(disk=self.disk, storage=self.storage, io=io,
                                    observer=self.observer.wal_write, stage=self.stage,
                                    test_delay=cfg.test_persist_delay, inline=InlineWrites())
        self.snapshots = Snapshots(
            fsm=fsm, disk=self.disk, storage=self.storage, io=io,
            position=lambda: (self.applier.applied, self.membership.conf_state,
                              self.membership.members()),
            every=cfg.snapshot_every, catchup_entries=cfg.snapshot_catchup_entries,
            protected=self.exchange.protected_indexes,
            cluster_id=lambda: opened.identity.cluster_id,
            floor=lambda: self.applier.fsm_index,
            envelope=self.gate.snapshot_envelope)
        self.applier = Applier(
            applied=opened.applied, fsm=fsm, node=self.node, membership=self.membership,
            gate=self.gate, snapshots=self.snapshots, disk=self.disk, storage=self.storage,
            io=io, dispatcher=self.dispatcher, lease=self.lease,
            proposals=self.pending.proposals, admin=self.pending.admin,
            identity=opened.identity, fsm_index=opened.fsm_index)
        self.admission = Admission(
            node=self.node, gate=self.gate, pending=self.pending,
            admin=AdminHandler(node=self.node, membership=self.membership,
                               storage=self.storage, pending=self.pending.admin,
                               applied=lambda: self.applier.applied))
        self.gate.note_unapplied(self.storage, opened.applied)
        self._nursery: trio.Nursery | None = None
        self.done = trio.Event()
        self.closed = False
        self.error: BaseException | None = None

    # -- what callers use ---------------------------------------------------------------------
    @property
    def applied(self) -> int:
        return self.applier.applied

    @property
    def status(self) -> Status:
        return self.status_view.current

    def is_leader(self) -> bool:
        return self.node.raft.state is StateType.LEADER

    def last_log_index(self) -> int:
        return self.node.raft.log.last_index()

    def check_open(self) -> None:
        """Raise EngineClosedError (not applied) once the engine has stopped; after a fatal
        error its ``__cause__`` is that error."""
        if self.closed:
            if self.error is not None:
                raise EngineClosedError("raft engine stopped on a fatal error") from self.error
            raise EngineClosedError()

    def new_request_id(self) -> int:
        self._request_ids += 1
        return self._request_ids

    def submit(self, req: Request) -> None:
        """Register ``req``'s waiter and queue it for the loop."""
        self.pending.register(req)
        self.inbox.put_request(req)

    async def run_request(self, req: Request) -> Any:
        """Submit ``req`` and wait for its outcome; a cancelled caller leaves nothing behind
        (an entry already handed to raft may still commit)."""
        self.submit(req)
        try:
            result = await req.waiter.wait()
        finally:
            self.pending.forget(req)
        if self.timer is not None and isinstance(req, ProposeRequest):
            self.timer.answered()
        return result

    def request_close(self) -> None:
        self.inbox.request_close()

    # -- the task -----------------------------------------------------------------------------
    async def run(self, nursery: trio.Nursery, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._nursery = nursery
        try:
            await self.links.start(nursery, exchange=self.exchange, dispatcher=self.dispatcher,
                                   membership=self.membership,
                                   commit_broadcast_delay=self.cfg.commit_broadcast_delay)
            await self._drain_ready()
            if self.membership.conf_state.voters == (self.node_id,) and not self.is_leader():
                self.node.campaign()
                await self._drain_ready()
            self.links.started.set()
            task_status.started()
            while not self.inbox.close_requested:
                await self.inbox.wait()
                self._take_inbox()
                await self._drain_ready()
                if self.applier.removed_self:
                    logger.info("this node was removed from the configuration; shutting down")
                    break
        except trio.Cancelled:
            self._shutdown(EngineClosedWhileWaitingError)
            raise
        except BaseException as exc:  # fatal: record, fail everyone, tear the engine down
            self.fail(exc)
            if not self.links.started.is_set():
                task_status.started()
            return
        self._shutdown(EngineClosedWhileWaitingError)

    # -- one turn -----------------------------------------------------------------------------
    def _take_inbox(self) -> None:
        node, inbox = self.node, self.inbox
        # Messages before ticks, and fewer ticks than an election timeout per turn: after a
        # stall (a busy process, a slow fsync) the answers that queued up meanwhile count
        # before the clock does, so a leader does not step down (check quorum) nor a follower
        # campaign over a pause of its own. Ticks left out are dropped, as a Go ticker drops
        # them; the lease does not count ticks (lease.py), so this only delays timeouts.
        while inbox.priority:
            self._step(*inbox.priority.popleft())
        while inbox.bulk:
            self._step(*inbox.bulk.popleft())
        ticks, inbox.ticks = inbox.ticks, 0
        for _ in range(min(ticks, max(1, self.cfg.election_tick - 1))):
            node.tick()
        while inbox.reports:
            node_id, report = inbox.reports.popleft()
            if report is SendReport.UNREACHABLE:
                node.report_unreachable(node_id)
            else:
                node.report_snapshot(node_id, report is SendReport.SNAPSHOT_SENT)
        if inbox.requests:
            if self.timer is not None:
                self.timer.queued(inbox.requests_since)
            self.admission.take(inbox.requests)
        self._start_read_rounds()

    def _step(self, m: Message, received: float | None = None) -> None:
        self.status_view.note_contact(m)
        committed = self.node.raft.log.committed
        try:
            self.node.step(m)
        except StepPeerNotFoundError:
            return
        except CoreRaftError as exc:
            logger.debug("ignored %s from %x: %s", m.type.name, m.from_, exc)
            return
        if self.timer is not None:
            self.timer.stepped(m, received, committed, self.node.raft.log.committed)
        if m.type is MessageType.READ_INDEX and m.entries and self.is_leader():
            self.reads.note_forwarded(m.entries[0].data)
        elif m.context:
            self.lease.on_heartbeat_response(m, self.membership.conf_state.voters,
                                             self.reads.started_at(m.context))

    def _start_read_rounds(self) -> None:
        self.reads.start_rounds(is_leader=self.is_leader(),
                                has_followers=self.membership.voter_count() > 1)

    # -- Readys -------------------------------------------------------------------------------
    async def _drain_ready(self) -> None:
        node = self.node
        while node.has_ready():
            rd = node.ready()
            leader = node.raft.state is StateType.LEADER and rd.snapshot is None
            early = leader and self.cfg.parallel_leader_write and bool(rd.entries)
            if early:
                self._send(rd)
            if rd.snapshot is not None:
                await self.applier.install_snapshot(rd.snapshot)
            await self.log_writer.persist(rd)
            if rd.entries:
                self.membership.note_appended(rd.entries)
                self.gate.note_appended(rd.entries)
            late = (
                leader
                and not rd.entries
                and not any(e.type is not EntryType.NORMAL for e in rd.committed_entries)
            )
            if not early and not late:
                self._send(rd)
            if rd.committed_entries:
                if self.timer is None:
                    await self.applier.apply(rd.committed_entries)
                else:
                    await self.timer.apply(self.applier.apply, rd.committed_entries)
            if late:
                self._send(rd, defer_commit_only=True)
            self.reads.on_ready(rd)
            self._start_read_rounds()  # the next round starts as soon as one completes
            committed = node.raft.log.committed
            node.advance(rd)
            if self.timer is not None and node.raft.log.committed > committed:
                self.timer.commit_moved()  # the leader's own write counted
            self._maybe_snapshot()
            self._refresh_status()
            self.reads.release_applied(self.applier.applied)
        self._refresh_status()

    def _send(self, rd: Ready, defer_commit_only: bool = False) -> None:
        send = self.dispatcher.defer if defer_commit_only else self.dispatcher.send
        for m in rd.messages:
            if m.to != NONE and m.to != self.node_id:
                send(m)

    def _maybe_snapshot(self) -> None:
        if self._nursery is not None and self.snapshots.due(self.applier.applied):
            self.snapshots.start(self._nursery, self.fail)

    def _refresh_status(self) -> None:
        if self.closed:
            return
        edge = self.status_view.refresh(self.applier.applied)
        self.lease.on_refresh(self.is_leader(), self.membership.voter_count())
        if edge is Edge.LOST:
            # Requests still queued never reached raft: they fail with NotLeaderError when
            # the loop takes them.
            self.pending.fail_seen(LeadershipLostError, self.inbox)
            self.lease.reset()
        if edge is not None:
            self.status_view.fire(edge)

    # -- stopping -----------------------------------------------------------------------------
    def _shutdown(self, waiting: Callable[[], BaseException]) -> None:
        """Stop: queued requests get EngineClosedError (not applied), callers raft saw get
        ``waiting()`` (outcome unknown), the status becomes shutdown, tasks are cancelled."""
        if self.closed:
            return
        self.closed = True
        self.dispatcher.close()  # inbound messages are refused from now (handle_inbound)
        error = self.error

        def not_applied() -> BaseException:
            exc = EngineClosedError()
            exc.__cause__ = error
            return exc

        self.pending.fail_queued(not_applied, self.inbox)
        self.pending.fail_seen(waiting, self.inbox)
        if self.status_view.shut_down():
            self.status_view.fire(Edge.LOST)
        self.done.set()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def fail(self, exc: BaseException) -> None:
        """A fatal error: record it, stop the engine. Every caller raft saw gets a fresh
        EngineFailedError whose ``__cause__`` is ``exc``; ``open_engine`` raises ``exc``."""
        if self.closed:
            return
        logger.error("raft engine failed: %r", exc)
        self.error = exc

        def failed() -> BaseException:
            err = EngineFailedError()
            err.__cause__ = exc
            return err

        self._shutdown(failed)
