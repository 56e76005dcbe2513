"""Applying what raft committed, in log order, and installing snapshots raft hands over.

``Applier`` owns the applied index: the index of the newest entry whose effect the state
machine (or the engine, for its own records) reflects. The run loop hands it each Ready's
committed entries (``apply``) and any snapshot to install (``install_snapshot``).

* Normal entries: the engine's proposal envelope (``contexts.py``) is opened; envelope control
  records go to the gate (``envelope_gate.py``), everything else is unwrapped (above the
  cutover) and given to ``StateMachine.apply``; the proposer waiting on that request id gets the
  result. Leader no-ops and foreign data only move the applied index.
* Configuration changes: raft applies them to its tracker; above the known configuration index
  the new membership is persisted (the peers file, then a snapshot at the change's index so the
  newest snapshot always carries the newest membership), the transport and lanes follow it, and
  the admin caller gets the change's index (its new ``prev_index``).

Invariants: entries are applied in index order, each at most once (an entry at or below the
applied index, replayed after a restart from a snapshot, is skipped); the applied index never
moves past an entry that did not apply: any failure here is fatal for the engine (the run loop
ends it), so the state machine never sees a gap.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import trio

from trio_raft.core.messages import (
    ConfChange,
    ConfChangeType,
    Entry,
    EntryType,
    Snapshot,
)
from trio_raft.core.rawnode import RawNode
from trio_raft.core.storage import MemoryStorage
from trio_raft.engine.contexts import decode_proposal
from trio_raft.engine.diskio import DiskRunner
from trio_raft.engine.dispatch import Dispatcher
from trio_raft.engine.envelope_gate import EnvelopeGate
from trio_raft.engine.lease import Lease
from trio_raft.engine.membership import Change, Membership, peers_for_conf_state, to_persisted
from trio_raft.engine.snapshots import Snapshots
from trio_raft.engine.types import ProposalResult, StateMachine
from trio_raft.engine.waiters import WaiterTable
from trio_raft.errors import FSMApplyHaltError, SnapshotRequiredError
from trio_raft.storage.recovery import DiskPersistence

logger = logging.getLogger(__name__)


class Applier:
    """See the module docstring."""

    def __init__(self, *, applied: int, fsm: StateMachine, node: RawNode,
                 membership: Membership, gate: EnvelopeGate, snapshots: Snapshots,
                 disk: DiskPersistence, storage: MemoryStorage, io: DiskRunner,
                 dispatcher: Dispatcher, lease: Lease, proposals: WaiterTable,
                 admin: WaiterTable) -> None:
        self.applied = applied
        self._fsm = fsm
        self._node = node
        self._membership = membership
        self._gate = gate
        self._snapshots = snapshots
        self._disk = disk
        self._storage = storage
        self._io = io
        self._dispatcher = dispatcher
        self._lease = lease
        self._proposals = proposals
        self._admin = admin
        self._set_apply_index = getattr(fsm, "set_apply_index", None)
        #: Set once a configuration change removed this node: the engine then stops.
        self.removed_self = False
        #: True while ``StateMachine.restore`` runs (``install_snapshot``).
        self.restoring = False

    # -- committed entries ---------------------------------------------------------------------
    async def apply(self, entries: Sequence[Entry]) -> None:
        for ent in entries:
            if ent.type is EntryType.NORMAL:
                self.apply_normal(ent)
            else:
                await self._apply_conf_entry(ent)

    def apply_normal(self, ent: Entry) -> None:
        if ent.index <= self.applied:
            return  # replayed: the restored state machine already reflects it
        env = decode_proposal(ent.data)
        if env is None:
            self._gate.check_non_proposal(ent)
            self.applied = ent.index
            return
        rid, payload = env
        key_id = self._gate.apply_control(ent.index, payload)
        if key_id is not None:
            self.applied = ent.index
            self._resolve(rid, ProposalResult(ent.index, key_id))
            return
        payload = self._gate.unwrap(ent.index, payload)
        if self._set_apply_index is not None:
            self._set_apply_index(ent.index)
        response = self._fsm.apply(payload)
        halt = getattr(response, "halt_apply", None)
        if callable(halt):
            err = halt()
            if err is not None:
                raise FSMApplyHaltError(f"entry {ent.index}: {err}") from (
                    err if isinstance(err, BaseException) else None
                )
        self.applied = ent.index
        self._resolve(rid, ProposalResult(ent.index, response))

    def _resolve(self, request_id: int, result: ProposalResult) -> None:
        w = self._proposals.pop(request_id)
        if w is not None:
            w.resolve(result)

    async def _apply_conf_entry(self, ent: Entry) -> None:
        if ent.type is EntryType.CONF_CHANGE_V2:
            raise SnapshotRequiredError("joint configuration changes are not supported")
        cc = ConfChange.decode(ent.data)
        cs = self._node.apply_conf_change(cc)
        m = self._membership
        m.check_join_role(cs)
        if ent.index > m.config_index:
            change = m.plan_change(ent.index, cc, cs)
            await self._persist_membership(change)
            self._follow(change)
        else:
            m.conf_state = cs
        self.applied = max(self.applied, ent.index)
        m.note_applied(self.applied)

    async def _persist_membership(self, change: Change) -> None:
        """The peers file, then a state machine snapshot at the change's index (unless the
        newest snapshot already carries this configuration)."""
        await self._io.run(self._disk.write_current_peers, change.index,
                           to_persisted(change.members))
        meta = self._storage.snapshot().metadata
        if meta.index > change.index or (
            meta.index == change.index and meta.conf_state.equivalent(change.conf_state)
        ):
            return
        await self._snapshots.write(change.index, change.conf_state, compact=False)

    def _follow(self, change: Change) -> None:
        """Membership, transport, lanes and lease follow an applied change."""
        m = self._membership
        m.commit(change.index, change.conf_state, change.members)
        nid = change.node_id
        if change.kind is ConfChangeType.REMOVE_NODE:
            if nid != m.node_id:
                self._dispatcher.remove_peer(nid)
            self._lease.remove_peer(nid, len(change.conf_state.voters))
            if nid == m.node_id:
                self.removed_self = True
        else:
            added = change.member(nid)
            if added is not None and nid != m.node_id:
                self._dispatcher.add_peer(added)
        if change.context is not None:
            w = self._admin.pop(change.context.request_id)
            if w is not None:
                w.resolve(change.index)

    # -- snapshots from the leader -------------------------------------------------------------
    async def install_snapshot(self, snap: Snapshot) -> None:
        """Restore the state machine from ``snap`` and adopt its membership.

        The thread rules of ``docs/api.md``: no snapshot is written meanwhile (the snapshot
        lock is held); before ``restore`` starts the loop yields twice, so every task released
        earlier by a read (its waiter set before the first yield) has run; while it runs no
        read is released and the applied index does not move (the run loop is here).
        """
        if not snap.data:
            raise SnapshotRequiredError(f"snapshot at index {snap.metadata.index} has no data")
        m = self._membership
        cs = snap.metadata.conf_state
        m.check_join_role(cs)
        members = peers_for_conf_state(m.peers, cs)
        m.require_addresses(members)
        idx = snap.metadata.index
        async with self._snapshots.lock:
            self.restoring = True
            try:
                await trio.lowlevel.checkpoint()
                await trio.lowlevel.checkpoint()
                await self._io.run(self._disk.restore_snapshot_state, self._fsm, snap)
                self._storage.apply_snapshot(snap)
                self.applied = max(self.applied, idx)
            finally:
                self.restoring = False
        m.note_applied(idx)
        m.commit(idx, cs, members)
        await self._io.run(self._disk.write_current_peers, idx, to_persisted(members))
