"""The Engine: trio_raft's public API, a thin facade over the run loop.

Everything that touches raft happens in one task, the run loop (``loop.py``), and its
collaborators. Public methods either read state the loop publishes after every Ready (plain
methods), or put a request in the loop's inbox and await its outcome (async methods).
Cancelling a waiting caller only stops the wait: an entry already handed to raft may still
commit. Open an engine with :func:`trio_raft.engine.lifecycle.open_engine`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import outcome
import trio

from trio_raft.engine.admin import wait_for_transfer
from trio_raft.engine.coldstart import OpenReport
from trio_raft.engine.config import lease_duration
from trio_raft.engine.envelope_gate import EnvelopeStatus
from trio_raft.engine.envelope_scan import EncryptionScanner
from trio_raft.engine.loop import RunLoop
from trio_raft.engine.observer import CounterValues
from trio_raft.engine.requests import AdminAction, AdminRequest, ProposeRequest, ReadRequest
from trio_raft.engine.types import (
    Configuration,
    LeaderInfo,
    PeerProgress,
    ProposalResult,
    State,
    Status,
    TransferTarget,
)
from trio_raft.engine.waiters import CallbackWaiter, Waiter
from trio_raft.envelope.cipher import Cipher, CipherCounts
from trio_raft.errors import (
    LeadershipTransferNotReadyError,
    LeadershipTransferTargetError,
    NotLeaderError,
    PeerIDRequiredError,
    PromoteLearnerMinAppliedZeroError,
)
from trio_raft.storage.backup import BackupInfo

logger = logging.getLogger(__name__)


class Engine:
    """A running Raft node. Create it with :func:`open_engine`."""

    def __init__(self, loop: RunLoop) -> None:
        self._loop = loop
        self._report = OpenReport(kind="unknown")

    # -- proposals -----------------------------------------------------------------------------
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
        loop = self._loop
        loop.check_open()
        data = bytes(data)
        seal = loop.gate.must_seal(data, False)  # wrapped when admitted, above the cutover
        started = time.perf_counter()
        observer = loop.observer

        def done(result: outcome.Outcome[ProposalResult]) -> None:
            if isinstance(result, outcome.Value):
                observer.proposal(time.perf_counter() - started)
            on_done(result)

        loop.submit(ProposeRequest(loop.new_request_id(), data, CallbackWaiter(done),
                                   seal=seal))

    async def _propose(self, data: bytes, *, admin: bool) -> ProposalResult:
        await trio.lowlevel.checkpoint_if_cancelled()
        loop = self._loop
        loop.check_open()
        data = bytes(data)
        seal = loop.gate.must_seal(data, admin)  # wrapped when admitted, above the cutover
        started = time.perf_counter()
        result = await loop.run_request(
            ProposeRequest(loop.new_request_id(), data, Waiter(), admin, seal))
        assert isinstance(result, ProposalResult)
        loop.observer.proposal(time.perf_counter() - started)
        return result

    # -- reads ---------------------------------------------------------------------------------
    async def linearizable_read(self) -> int:
        """ReadIndex round: returns the read index once the local applied index reaches it."""
        return await self._read(wait_applied=True)

    async def verify_leader(self) -> None:
        """Confirm leadership with a quorum round (no apply wait)."""
        await self._read(wait_applied=False)

    async def _read(self, *, wait_applied: bool) -> int:
        await trio.lowlevel.checkpoint_if_cancelled()
        loop = self._loop
        loop.check_open()
        index = await loop.run_request(ReadRequest(loop.new_request_id(), Waiter(), wait_applied))
        return int(index)

    async def lease_read(self) -> int:
        """A read under this leader's lease: while ``lease_valid()``, no network round; the
        leader's commit index is the read index, returned once it is applied here (a write
        another node already shows may be committed but not yet applied on the leader).
        Without a valid lease (or on a follower) it is :meth:`linearizable_read`."""
        await trio.lowlevel.checkpoint_if_cancelled()
        loop = self._loop
        loop.check_open()
        if not self.lease_valid():
            return await self.linearizable_read()
        index = loop.node.raft.log.committed
        if loop.applied >= index:
            return index
        req = ReadRequest(loop.new_request_id(), Waiter(), True)
        loop.reads.add_known(req, index)
        try:
            return int(await req.waiter.wait())
        finally:
            loop.pending.forget(req)

    async def check_serving(self) -> None:
        """Raise NotLeaderError unless the cached state is leader (no network round)."""
        await trio.lowlevel.checkpoint()
        self._loop.check_open()
        if self._loop.status.state is not State.LEADER:
            raise NotLeaderError()

    # -- cached state --------------------------------------------------------------------------
    def applied_index(self) -> int:
        return self._loop.applied

    def restoring(self) -> bool:
        """True while the state machine is being restored from a snapshot (in a worker thread):
        a read of the state machine that does not go through :meth:`linearizable_read` or
        :meth:`verify_leader` must not trust what it sees meanwhile (``docs/api.md``)."""
        return self._loop.applier.restoring

    def state(self) -> State:
        return self._loop.status.state

    def leader(self) -> LeaderInfo:
        return self._loop.status.leader

    def status(self) -> Status:
        return self._loop.status

    def open_report(self) -> OpenReport:
        """What opening did with the state machine: restored from the snapshot or skipped (its
        store held it), entries replayed, seconds (``docs/api.md``, the cold-start skip)."""
        return self._report

    def cluster_id(self) -> str | None:
        """This node's cluster id (None until one is known, ``docs/storage.md``)."""
        return self._loop.applier.identity.cluster_id

    def replication(self) -> dict[str, PeerProgress]:
        """The leader's view of every other member's log, keyed by server id.

        Empty unless this engine is the leader. ``match`` moves when a peer's acknowledgement
        arrives, which can be after the peer applied the entry; wait on it (not on the peer's
        ``applied_index()``) before ``promote_learner`` with a ``min_applied_index``.
        """
        loop = self._loop
        if loop.closed or not loop.is_leader():
            return {}
        peers = loop.membership.peers
        out: dict[str, PeerProgress] = {}
        for nid, pr in loop.node.raft.prs.progress.items():
            if nid == loop.node_id:
                continue
            p = peers.get(nid)
            sid = p.id if p is not None else str(nid)
            out[sid] = PeerProgress(id=sid, match=pr.match, next=pr.next, state=pr.state.value,
                                    learner=pr.is_learner, recent_active=pr.recent_active)
        return out

    def lease_duration(self) -> float:
        return lease_duration(self._loop.cfg)

    def last_quorum_ack(self) -> float | None:
        """trio clock instant by which a quorum last answered this leader; None when unknown."""
        if self._loop.status.state is not State.LEADER:
            return None
        return self._loop.lease.last_quorum_ack()

    def lease_valid(self) -> bool:
        """Whether a lease read may be served locally now (``docs/api.md``, leases)."""
        ack = self.last_quorum_ack()
        if ack is None:
            return False
        now = trio.current_time()
        return ack <= now and now - ack < self.lease_duration()

    async def configuration(self) -> Configuration:
        await trio.lowlevel.checkpoint()
        return self._loop.membership.configuration()

    # -- membership and transfers --------------------------------------------------------------
    async def add_voter(self, id: str, address: str, prev_index: int = 0) -> int:
        return await self._admin(AdminAction.ADD_VOTER, id=id, address=address,
                                 prev_index=prev_index)

    async def add_learner(self, id: str, address: str, prev_index: int = 0) -> int:
        return await self._admin(AdminAction.ADD_LEARNER, id=id, address=address,
                                 prev_index=prev_index)

    async def promote_learner(self, id: str, prev_index: int = 0, min_applied_index: int = 0,
                              skip_min_applied_check: bool = False) -> int:
        """Make learner ``id`` a voter once the leader has seen it hold the log up to
        ``min_applied_index`` (``replication()`` shows the leader's view)."""
        if not id:
            raise PeerIDRequiredError()
        if min_applied_index == 0 and not skip_min_applied_check:
            raise PromoteLearnerMinAppliedZeroError()
        return await self._admin(AdminAction.PROMOTE_LEARNER, id=id, prev_index=prev_index,
                                 min_applied_index=min_applied_index,
                                 skip_min_applied_check=skip_min_applied_check)

    async def remove_server(self, id: str, prev_index: int = 0) -> int:
        return await self._admin(AdminAction.REMOVE_SERVER, id=id, prev_index=prev_index)

    async def transfer_leadership(self) -> None:
        """Hand leadership to the first other server of the configuration."""
        m = self._loop.membership
        servers = m.configuration().servers
        if not servers:
            raise LeadershipTransferNotReadyError("empty configuration")
        target = next((s for s in servers if s.id != m.local_id), None)
        if target is None:
            raise LeadershipTransferNotReadyError("no other server")
        await self._transfer([m.transfer_target(target.id, target.address)], None)

    async def transfer_leadership_to_server(self, id: str, address: str = "") -> None:
        await self._transfer([self._loop.membership.transfer_target(id, address)], None)

    async def transfer_leadership_to_server_if_eligible(
        self, candidates: Sequence[TransferTarget], max_lag: int
    ) -> None:
        """Transfer to the first candidate that is a recently active voter whose match index
        lags the leader's last index by at most ``max_lag``."""
        m = self._loop.membership
        targets = [m.transfer_target(c.id, c.address) for c in candidates]
        await self._transfer(targets, max(0, max_lag))

    async def _admin(self, action: AdminAction, **kw: Any) -> int:
        await trio.lowlevel.checkpoint_if_cancelled()
        loop = self._loop
        loop.check_open()
        result = await loop.run_request(AdminRequest(loop.new_request_id(), action, Waiter(),
                                                     **kw))
        return int(result)

    async def _transfer(self, targets: list[int], max_lag: int | None) -> None:
        target = await self._admin(AdminAction.TRANSFER, targets=tuple(targets), max_lag=max_lag)
        if target == 0:
            raise LeadershipTransferTargetError()
        loop = self._loop
        await wait_for_transfer(target, lambda: loop.status, lambda: int(loop.node.raft.lead),
                                loop.check_open)

    # -- the raft envelope (docs/envelope.md) --------------------------------------------------
    async def enable_raft_envelope(self, cipher: Cipher | None) -> int:
        """Move the cluster to wrapped entries; returns the cutover index (the marker's index).

        Raises the barrier, waits for the log to drain into the state machine, proposes the
        cleartext marker (it carries the active key, sealed by the KEK, so every node installs
        it) and returns once the marker has applied here; wrapping is on from then. Idempotent
        once a cutover exists. NotLeaderError / LeadershipLostError as for proposals; after
        LeadershipLostError the marker may still commit (nodes switch when they apply it).
        """
        return await self._loop.gate.enable(cipher, self._loop)

    async def rotate_raft_key(self) -> int:
        """Replicate a new data key and make it the active one on every node; returns its id.
        Older keys stay installed to read older entries."""
        return await self._loop.gate.rotate(self._loop)

    def raft_cutover_index(self) -> int | None:
        """The cutover index in force (None: inert, nothing is unwrapped)."""
        return self._loop.gate.cutover_index()

    def raft_cipher(self) -> Cipher | None:
        return self._loop.gate.cipher

    def envelope_status(self) -> EnvelopeStatus:
        """Whether the envelope is on here, the active key id, the cutover index, and what the
        cipher counted (``docs/envelope.md``)."""
        gate = self._loop.gate
        cipher = gate.cipher
        cutover = gate.cutover_index()
        active = 0
        if cipher is not None and cipher.keystore is not None:
            active = cipher.active_key_id
        return EnvelopeStatus(on=cutover is not None, active_key_id=active,
                              cutover_index=cutover,
                              counts=cipher.counters() if cipher is not None else CipherCounts(),
                              kek_fingerprint=cipher.kek_fingerprint if cipher is not None
                              else "")

    async def compact_now(self) -> int:
        """Take a snapshot at the applied index and make it where this node's data dir begins:
        no entry at or below it stays in the log or the WAL, no older snapshot file stays.
        Returns the snapshot's index. After the envelope cutover this removes every cleartext
        entry and payload written before it (the snapshot is sealed). Local to this node."""
        await trio.lowlevel.checkpoint_if_cancelled()
        loop = self._loop
        loop.check_open()
        return await loop.snapshots.compact_now()

    def encryption_scanner(self) -> EncryptionScanner:
        return EncryptionScanner(lambda: self._loop.storage)

    # -- backups -------------------------------------------------------------------------------
    async def export_snapshot(self, path: str | os.PathLike[str]) -> BackupInfo:
        """Write a consistent point-in-time backup of the state machine to ``path``: its
        payload at the applied index, with that index, its term, the members with their
        addresses and the cluster id, in one checksummed file written atomically (layout in
        ``docs/formats.md``). Returns what it wrote. Raises NothingToExportError before
        anything was applied here; for a backup that holds every write acknowledged before
        the call, call it on the leader after a :meth:`linearizable_read`.

        Runs under the snapshot lock (no snapshot write or restore meanwhile); the state
        machine's ``snapshot()`` is taken on the trio thread and written in a worker thread,
        as for any snapshot. With the envelope on, the payload is sealed and the file carries
        the KEK-sealed keys and the cutover (a sealed backup: restoring it needs the KEK)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        loop = self._loop
        loop.check_open()
        return await loop.snapshots.export(path, loop.check_open)

    # -- callbacks -----------------------------------------------------------------------------
    def register_leader_acquired_callback(
        self, fn: Callable[[], object] | None
    ) -> Callable[[], None]:
        return self._loop.status_view.on_acquired.register(fn)

    def register_leader_loss_callback(self, fn: Callable[[], object] | None) -> Callable[[], None]:
        return self._loop.status_view.on_lost.register(fn)

    # -- counters ------------------------------------------------------------------------------
    def dispatch_drop_count(self) -> int:
        return self._loop.dispatcher.stats.drop_count

    def dispatch_error_count(self) -> int:
        return self._loop.dispatcher.stats.error_count

    def dispatch_error_counts_by_code(self) -> dict[str, int]:
        return dict(self._loop.dispatcher.stats.errors_by_code)

    def step_queue_full_count(self) -> int:
        return self._loop.inbox.full_count

    def transport_stats(self) -> dict[str, Any]:
        """The transport's own counters (``GRPCTransport.stats()``: lanes opened and their
        messages, native connections served, ...; docs/transport.md), empty for a transport
        that keeps none."""
        stats = getattr(self._loop.links.transport, "stats", None)
        return dict(stats()) if callable(stats) else {}

    def counters(self) -> CounterValues:
        """Counts since the engine opened: leader changes seen, snapshots written, installed
        (from a leader), sent (to followers) and received (``observer.py``)."""
        loop = self._loop
        return CounterValues(
            leader_changes=loop.status_view.leader_changes,
            snapshots_written=loop.snapshots.written,
            snapshots_installed=loop.applier.installed,
            snapshots_sent=loop.counters.snapshots_sent,
            snapshots_received=loop.counters.snapshots_received)

    # -- lifecycle -----------------------------------------------------------------------------
    def err(self) -> BaseException | None:
        """The fatal error that stopped the engine, if one did."""
        return self._loop.error

    async def wait_closed(self) -> None:
        await self._loop.done.wait()

    async def aclose(self) -> None:
        """Close the engine: pending callers get EngineClosedError; tasks stop."""
        self._loop.request_close()
        with trio.CancelScope(shield=True):
            await self._loop.done.wait()
