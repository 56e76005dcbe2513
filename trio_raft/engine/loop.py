"""The run loop: the one task that owns the RawNode.

Theory of operation
-------------------
Callers and the transport never touch raft. They append to the loop's inbox (requests, inbound
messages, dispatch reports, ticks) and wake it. Each turn the loop drains *everything* waiting,
feeds it to raft, then handles Readys until raft has nothing more:

1. install the Ready's snapshot (state machine restore, log storage, peers file);
2. persist entries + hard state (+ snapshot marker) in one WAL write, fsynced when required
   (so every proposal drained this turn shares one fsync: group commit);
3. only then hand messages to the per-peer dispatch lanes;
4. apply committed entries in order (normal entries to the state machine, configuration changes
   to raft, the transport and the peers file), resolving the callers waiting on them;
5. record read states, ``advance``, maybe start a periodic snapshot, refresh the cached status.

Blocking file I/O runs in worker threads (``trio.to_thread``) unless ``blocking_io`` is set,
which keeps tests under ``MockClock`` deterministic.
"""

from __future__ import annotations

import logging
import random
import secrets
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import trio

from trio_raft.core.errors import RaftError as CoreRaftError
from trio_raft.core.errors import StepPeerNotFoundError
from trio_raft.core.messages import (
    NONE,
    PRIORITY_MESSAGE_TYPES,
    ConfState,
    EntryType,
    Message,
    MessageType,
    Ready,
    StateType,
)
from trio_raft.core.raft import Config as CoreConfig
from trio_raft.core.rawnode import RawNode
from trio_raft.engine.admin import AdminMixin
from trio_raft.engine.applier import ApplyMixin
from trio_raft.engine.callbacks import CallbackRegistry
from trio_raft.engine.config import OpenConfig, with_defaults
from trio_raft.engine.contexts import (
    decode_lease_probe,
    decode_read_context,
    encode_lease_probe,
    encode_proposal,
    encode_read_context,
)
from trio_raft.engine.dispatch import Dispatcher
from trio_raft.engine.lease import QuorumAckTracker
from trio_raft.engine.opening import open_state
from trio_raft.engine.requests import AdminRequest, ProposeRequest, ReadRequest
from trio_raft.engine.status import StatusMixin
from trio_raft.engine.types import (
    Peer,
    State,
    Status,
)
from trio_raft.engine.waiters import Waiter, WaiterTable
from trio_raft.errors import (
    EngineClosedError,
    LeadershipTransferInProgressError,
    NotLeaderError,
    StepQueueFullError,
)

logger = logging.getLogger(__name__)
MT = MessageType

_CONTACT_TYPES = frozenset({MT.APP, MT.HEARTBEAT, MT.SNAP, MT.READ_INDEX_RESP})
PRIORITY_QUEUE_CAPACITY = 1024


def inbound_queue_capacity(num_peers: int, max_inflight: int) -> int:
    """Spec b.2: ``max(128, max(inflight, scaled))``."""
    scaled = 1024
    if max_inflight <= 1024 and num_peers > 0 and num_peers <= 1024 // max_inflight:
        scaled = num_peers * max_inflight
    return max(128, max(max_inflight, scaled))


class RunLoop(StatusMixin, AdminMixin, ApplyMixin):
    def __init__(self, config: OpenConfig) -> None:
        cfg = with_defaults(config)
        self._cfg = cfg
        self._node_id = cfg.node_id
        self._local_id = cfg.local_id
        self._fsm: Any = cfg.state_machine
        self._transport: Any = cfg.transport
        self._owns_transport = False
        self._nursery: trio.Nursery | None = None
        self._node: RawNode | None = None
        self._disk: Any = None
        self._storage: Any = None
        self._peers: dict[int, Peer] = {}
        self._config_index = 0
        self._applied = 0
        self._conf_state = ConfState()
        self._fence = 0
        # Request ids travel inside log entries and are matched on apply by whichever node is
        # leader then; a random 62-bit start keeps ids from different nodes and from earlier
        # runs of this node from colliding with the ones this run waits on.
        self._request_ids = secrets.randbits(62)
        # inbox
        self._requests: deque[Any] = deque()
        self._priority_in: deque[Message] = deque()
        self._bulk_in: deque[Message] = deque()
        self._reports: deque[tuple[int, bool]] = deque()
        self._loop_calls: deque[Callable[[], None]] = deque()
        self._ticks = 0
        self._wake_event = trio.Event()
        self._bulk_capacity = 128
        self._step_queue_full = 0
        # waiters
        self._pending_proposals = WaiterTable()
        self._pending_reads = WaiterTable()
        self._pending_admin = WaiterTable()
        # cached, published state
        self._status = Status(state=State.FOLLOWER)
        self._lead_transferee = NONE
        self._last_contact_at: float | None = None
        self._last_contact_from = NONE
        self._acks = QuorumAckTracker()
        self._lease_probe_at = float("-inf")
        self._single_node_ack: float | None = None
        self._on_acquired = CallbackRegistry("leader-acquired")
        self._on_lost = CallbackRegistry("leader-loss")
        self._dispatcher = Dispatcher(None, cfg.max_inflight_msg, self._post_report)
        # lifecycle
        self._started = trio.Event()
        self._done = trio.Event()
        self._close_requested = False
        self._closed = False
        self._run_error: BaseException | None = None
        self._remove_self = False
        self._snapshot_in_flight = False
        self._join_alarm_fired = False
        self._snapshot_lock = trio.Lock()

    # ---------------------------------------------------------------------------------
    # opening
    # ---------------------------------------------------------------------------------
    async def _open_disk(self) -> None:
        st = await self._io_raw(open_state, self._cfg)
        self._disk = st.disk
        self._storage = st.storage
        self._peers = {p.node_id: p for p in st.peers}
        self._conf_state = st.conf_state
        self._config_index = st.config_index
        self._applied = st.applied
        self._fence = st.fence
        rng = random.Random(self._cfg.rng_seed)
        cfg = self._cfg
        self._node = RawNode(
            CoreConfig(
                id=self._node_id,
                storage=self._storage,
                rng=rng,
                election_tick=cfg.election_tick,
                heartbeat_tick=cfg.heartbeat_tick,
                applied=st.applied,
                max_size_per_msg=cfg.max_size_per_msg,
                max_inflight_msgs=cfg.max_inflight_msg,
                check_quorum=True,
                pre_vote=cfg.pre_vote,
                self_ack_on_persist=cfg.parallel_leader_write,
            )
        )
        self._bulk_capacity = inbound_queue_capacity(len(self._peers), cfg.max_inflight_msg)
        if cfg.join_as_learner:
            self._check_join_alarm(self._conf_state)
        if self._transport is None and len(self._peers) > 1:
            from trio_raft.transport.grpc import GRPCTransport

            self._transport = GRPCTransport(local_address=cfg.local_address)
            self._owns_transport = True
        self._dispatcher.transport = self._transport

    async def _close_disk(self) -> None:
        if self._disk is not None:
            disk, self._disk = self._disk, None
            with trio.CancelScope(shield=True):
                await self._io_raw(disk.close)

    # ---------------------------------------------------------------------------------
    # I/O helpers
    # ---------------------------------------------------------------------------------
    async def _io_raw(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._cfg.blocking_io:
            await trio.lowlevel.checkpoint()
            return fn(*args)
        return await trio.to_thread.run_sync(fn, *args)

    async def _io(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a disk operation (DiskPersistence serialises its own writers)."""
        return await self._io_raw(fn, *args)

    # ---------------------------------------------------------------------------------
    # inbox
    # ---------------------------------------------------------------------------------
    def _wake(self) -> None:
        self._wake_event.set()

    def _next_request_id(self) -> int:
        self._request_ids += 1
        return self._request_ids

    def _submit(self, req: Any) -> None:
        if isinstance(req, ProposeRequest):
            self._pending_proposals.add(req.request_id, req.waiter)
        elif isinstance(req, ReadRequest):
            req.waiter.wait_applied = req.wait_applied
            self._pending_reads.add(req.request_id, req.waiter)
        elif isinstance(req, AdminRequest):
            self._pending_admin.add(req.request_id, req.waiter)
        self._requests.append(req)
        self._wake()

    def _post_report(self, node_id: int, is_snapshot: bool) -> None:
        if self._closed:
            return
        if len(self._reports) >= self._bulk_capacity:
            logger.warning("dispatch report queue full; dropping report for %x", node_id)
            return
        self._reports.append((node_id, is_snapshot))
        self._wake()

    def _call_on_loop(self, fn: Callable[[], None]) -> None:
        self._loop_calls.append(fn)
        self._wake()

    async def _handle_transport_message(self, m: Message) -> None:
        """Inbound handler given to the transport: queue ``m`` for the run loop or raise."""
        if not self._started.is_set():
            with trio.move_on_after(5):
                await self._started.wait()
        if self._closed or not self._started.is_set():
            raise EngineClosedError()
        if m.type in PRIORITY_MESSAGE_TYPES:
            queue, cap = self._priority_in, PRIORITY_QUEUE_CAPACITY
        else:
            queue, cap = self._bulk_in, self._bulk_capacity
        if len(queue) >= cap:
            self._step_queue_full += 1
            raise StepQueueFullError()
        queue.append(m)
        self._wake()

    async def _tick_loop(self) -> None:
        interval = self._cfg.tick_interval
        deadline = trio.current_time()
        while True:
            deadline += interval
            await trio.sleep_until(deadline)
            self._ticks += 1
            self._wake()

    def _has_work(self) -> bool:
        return bool(
            self._ticks
            or self._requests
            or self._priority_in
            or self._bulk_in
            or self._reports
            or self._loop_calls
            or self._close_requested
        )

    # ---------------------------------------------------------------------------------
    # the loop
    # ---------------------------------------------------------------------------------
    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        assert self._nursery is not None and self._node is not None
        try:
            await self._start_transport()
            self._nursery.start_soon(self._tick_loop)
            await self._drain_ready()
            if self._conf_state.voters == (self._node_id,) and self._status.state is not (
                State.LEADER
            ):
                self._node.campaign()
                await self._drain_ready()
            self._started.set()
            task_status.started()
            while not self._close_requested:
                if not self._has_work():
                    self._wake_event = trio.Event()
                    await self._wake_event.wait()
                self._handle_inbox()
                await self._drain_ready()
                if self._remove_self:
                    logger.info("this node was removed from the configuration; shutting down")
                    break
        except trio.Cancelled:
            self._shutdown(EngineClosedError)
            raise
        except BaseException as exc:  # fatal: record, fail everyone, tear the engine down
            self._fail(exc)
            if not self._started.is_set():
                task_status.started()
            return
        self._shutdown(EngineClosedError)

    async def _start_transport(self) -> None:
        t = self._transport
        if t is None:
            return
        assert self._nursery is not None
        t.set_handler(self._handle_transport_message)
        if hasattr(t, "set_fsm_snap_dir"):
            t.set_fsm_snap_dir(self._disk.fsm_dir)
        self._configure_snapshot_transport(t)
        if self._owns_transport:
            await self._nursery.start(t.serve)
        self._dispatcher.start(self._nursery, self._cfg.commit_broadcast_delay)
        for p in self._peers.values():
            if p.node_id != self._node_id:
                self._upsert_transport_peer(p)

    def _handle_inbox(self) -> None:
        node = self._node
        assert node is not None
        ticks, self._ticks = self._ticks, 0
        for _ in range(min(ticks, 2 * self._cfg.election_tick)):
            node.tick()
        if ticks:
            self._maybe_probe_lease()
        while self._loop_calls:
            self._loop_calls.popleft()()
        while self._priority_in:
            self._step(self._priority_in.popleft())
        while self._bulk_in:
            self._step(self._bulk_in.popleft())
        while self._reports:
            node_id, is_snap = self._reports.popleft()
            if is_snap:
                node.report_snapshot(node_id, False)
            else:
                node.report_unreachable(node_id)
        if self._requests:
            self._handle_requests()

    def _step(self, m: Message) -> None:
        assert self._node is not None
        now = trio.current_time()
        if m.type in _CONTACT_TYPES:
            self._last_contact_at, self._last_contact_from = now, m.from_
        try:
            self._node.step(m)
        except StepPeerNotFoundError:
            return
        except CoreRaftError as exc:
            logger.debug("ignored %s from %x: %s", m.type.name, m.from_, exc)
            return
        if m.type is MT.HEARTBEAT_RESP and m.context:
            issued_at = decode_lease_probe(m.context)
            if issued_at is not None and m.term == self._node.raft.term:
                self._record_ack(m.from_, issued_at)

    def _record_ack(self, from_id: int, heard_by: float) -> None:
        if from_id in (NONE, self._node_id) or self._node is None:
            return
        if self._node.raft.state is not StateType.LEADER:
            return
        peer = self._peers.get(from_id)
        voters = len(self._conf_state.voters)
        if peer is None or from_id not in self._conf_state.voters or voters <= 1:
            return
        self._acks.record(from_id, heard_by, voters)

    def _maybe_probe_lease(self) -> None:
        """A leader with followers starts a ReadIndex round stamped with the time, about once a
        heartbeat interval; followers echo the stamp in their heartbeat answers and are credited
        with it (lease.py). Raft holds the round until the leader committed in its term."""
        node = self._node
        assert node is not None
        if node.raft.state is not StateType.LEADER or len(self._conf_state.voters) <= 1:
            return
        now = trio.current_time()
        if now - self._lease_probe_at < self._cfg.heartbeat_tick * self._cfg.tick_interval:
            return
        self._lease_probe_at = now
        try:
            node.read_index(encode_lease_probe(now))
        except CoreRaftError as exc:
            logger.debug("lease probe not started: %s", exc)

    def _handle_requests(self) -> None:
        node = self._node
        assert node is not None
        batch: list[ProposeRequest] = []
        while self._requests:
            req = self._requests.popleft()
            if isinstance(req, ProposeRequest):
                if self._admit_proposal(req):
                    batch.append(req)
            elif isinstance(req, ReadRequest):
                self._handle_read(req)
            else:
                self._handle_admin(req)
        if not batch:
            return
        from trio_raft.core.messages import Entry

        try:
            node.propose_entries(
                [Entry(0, 0, data=encode_proposal(r.request_id, r.data)) for r in batch]
            )
        except CoreRaftError as exc:
            for r in batch:
                self._pending_proposals.discard(r.request_id, r.waiter)
                r.waiter.fail(NotLeaderError(str(exc)))

    def _admit_proposal(self, req: ProposeRequest) -> bool:
        w = req.waiter
        if w.done:
            return False
        err = self._reject_reason(req.admin)
        if err is not None:
            self._pending_proposals.discard(req.request_id, w)
            w.fail(err)
            return False
        return True

    def _reject_reason(self, admin: bool) -> BaseException | None:
        node = self._node
        assert node is not None
        if node.raft.state is not StateType.LEADER:
            return NotLeaderError()
        if node.raft.lead_transferee != NONE:
            return LeadershipTransferInProgressError()
        return self._barrier_reason(admin)

    def _barrier_reason(self, admin: bool) -> BaseException | None:
        """Hook for the envelope cutover barrier (admin proposals are exempt)."""
        return None

    def _handle_read(self, req: ReadRequest) -> None:
        w = req.waiter
        if w.done:
            return
        err = self._reject_reason(True)
        if err is not None:
            self._pending_reads.discard(req.request_id, w)
            w.fail(err)
            return
        assert self._node is not None
        self._node.read_index(encode_read_context(req.request_id))

    # ---------------------------------------------------------------------------------
    # Ready handling
    # ---------------------------------------------------------------------------------
    async def _drain_ready(self) -> None:
        node = self._node
        assert node is not None
        while node.has_ready():
            rd = node.ready()
            leader = node.raft.state is StateType.LEADER and rd.snapshot is None
            # A leader's messages (appends, heartbeats) do not depend on its own write: with
            # parallel_leader_write, appends carrying new entries leave first, so followers
            # fsync while we do. With no new entries, a leader applies first (answering the
            # proposers sooner) and then tells followers the new commit index, except when a
            # configuration change is applied (it may remove the very peer that must learn
            # of its commit). A follower acknowledges as soon as its write is done.
            early = leader and self._cfg.parallel_leader_write and bool(rd.entries)
            if early:
                self._send_messages(rd)
            await self._persist_ready(rd)
            late = (
                leader
                and not rd.entries
                and not any(e.type is not EntryType.NORMAL for e in rd.committed_entries)
            )
            if not early and not late:
                self._send_messages(rd)
            if rd.committed_entries:
                await self._apply_entries(rd.committed_entries)
            if late:
                self._send_messages(rd, defer_commit_only=True)
            self._handle_read_states(rd)
            node.advance(rd)
            self._maybe_start_snapshot()
            self._refresh_status()
            self._resolve_ready_reads()
        self._refresh_status()

    def _send_messages(self, rd: Ready, defer_commit_only: bool = False) -> None:
        send = self._dispatcher.defer if defer_commit_only else self._dispatcher.send
        for m in rd.messages:
            if m.to != NONE and m.to != self._node_id:
                send(m)

    async def _persist_ready(self, rd: Ready) -> None:
        if rd.snapshot is not None:
            await self._install_snapshot(rd.snapshot)
        if (
            rd.hard_state is not None
            and not rd.entries
            and rd.snapshot is None
            and not rd.must_sync
            and self._disk.try_save_state(rd.hard_state)
        ):
            # A commit-index update: a buffered write, no fsync; a thread round trip would cost
            # more than the write and delay applying what was just committed.
            self._storage.set_hard_state(rd.hard_state)
            return
        if rd.entries or rd.hard_state is not None or rd.snapshot is not None:
            cfg = self._cfg
            if cfg.test_persist_delay is not None:
                delay = cfg.test_persist_delay()
                if delay > 0:
                    await trio.sleep(delay)
            started = time.perf_counter()
            await self._io(
                self._disk.save_ready, rd.hard_state, rd.entries, rd.snapshot, rd.must_sync
            )
            if cfg.persist_observer is not None:
                cfg.persist_observer(time.perf_counter() - started)
            if rd.entries:
                self._storage.append(rd.entries)
                self._mark_fence(rd.entries)
            if rd.hard_state is not None:
                self._storage.set_hard_state(rd.hard_state)

    def _handle_read_states(self, rd: Ready) -> None:
        for rs in rd.read_states:
            rid = decode_read_context(rs.request_ctx)
            if rid is None:
                continue
            w = self._pending_reads.get(rid)
            if w is None:
                continue
            if not w.wait_applied:
                self._pending_reads.pop(rid)
                w.resolve(rs.index)
            else:
                w.target = rs.index

    def _resolve_ready_reads(self) -> None:
        if not len(self._pending_reads):
            return
        applied = self._applied
        for rid, w in self._pending_reads.items():
            if 0 < w.target <= applied:
                self._pending_reads.pop(rid)
                w.resolve(w.target)

    # ---------------------------------------------------------------------------------
    # shutdown
    # ---------------------------------------------------------------------------------
    def _shutdown(self, factory: Callable[[], BaseException]) -> None:
        if self._closed:
            return
        was_leader = self._status.state is State.LEADER
        self._closed = True
        self._dispatcher.close()
        if self._transport is not None:
            self._transport.set_handler(None)
        self._on_leadership_lost(factory)
        self._status = attrs_evolve_state(self._status, State.SHUTDOWN)
        if was_leader:
            self._on_lost.fire()
        self._done.set()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def _fail(self, exc: BaseException) -> None:
        if self._closed:
            return
        logger.error("raft engine failed: %r", exc)
        self._run_error = exc
        self._shutdown(lambda: exc)


def attrs_evolve_state(status: Status, state: State) -> Status:
    import attrs

    return attrs.evolve(status, state=state)


def waiter_done(w: Waiter) -> bool:
    return w.done
