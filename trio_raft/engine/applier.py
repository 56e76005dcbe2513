"""Applying what raft committed, in log order, and installing snapshots raft hands over.

``Applier`` owns the applied index: the index of the newest entry whose effect the state
machine (or the engine, for its own records) reflects. The run loop hands it each Ready's
committed entries (``apply``) and any snapshot to install (``install_snapshot``).

* Normal entries: the engine's proposal envelope (``contexts.py``) is opened; envelope control
  records go to the gate (``envelope_gate.py``), everything else is unwrapped (above the
  cutover) and given to ``StateMachine.apply``; the proposer waiting on that request id gets the
  result. Leader no-ops and foreign data only move the applied index.
* Configuration changes: raft applies them to its tracker; above the known configuration index
  the new membership is persisted (the peers file; and a snapshot at or above the change's
  index is asked for, written in the background, ``snapshots.py``), the transport and lanes
  follow it, and
  the admin caller gets the change's index (its new ``prev_index``).
* Cluster records (``identity.py``): the first one sets the cluster id of a node that has none.
  After applying, a leader that knows no cluster id proposes one.
* The cold-start skip: entries at or below ``fsm_index`` (the index the state machine's own
  durable store reported at open, ``coldstart.py``) are already in the state machine. They are
  not given to ``apply`` again, but everything the engine itself does with them still happens:
  configuration changes, envelope control records, cluster records.
* Snapshots from the leader: the envelope's keys and cutover the descriptor carries are taken
  first (``EnvelopeGate.adopt_snapshot``: a cleartext payload above this node's cutover is
  refused), then the state machine is restored (``set_apply_index`` with the snapshot's index
  first; a sealed payload is opened with the node's cipher), and the members, with the
  addresses the snapshot's descriptor carries, and the cluster id are adopted.

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
from trio_raft.engine.identity import ClusterIdentity, decode_cluster_record, is_cluster_record
from trio_raft.engine.lease import Lease
from trio_raft.engine.membership import Change, Membership, peers_for_conf_state, to_persisted
from trio_raft.engine.snapshots import Snapshots
from trio_raft.engine.types import ProposalResult, StateMachine
from trio_raft.engine.waiters import WaiterTable
from trio_raft.errors import FSMApplyHaltError, SnapshotRequiredError
from trio_raft.storage.descriptor import NO_ENVELOPE, descriptor_of
from trio_raft.storage.recovery import DiskPersistence

logger = logging.getLogger(__name__)


class Applier:
    """See the module docstring."""

    def __init__(self, *, applied: int, fsm: StateMachine, node: RawNode,
                 membership: Membership, gate: EnvelopeGate, snapshots: Snapshots,
                 disk: DiskPersistence, storage: MemoryStorage, io: DiskRunner,
                 dispatcher: Dispatcher, lease: Lease, proposals: WaiterTable,
                 admin: WaiterTable, identity: ClusterIdentity | None = None,
                 fsm_index: int = 0) -> None:
        self.applied = applied
        #: Entries at or below this index are in the state machine's durable store already
        #: (the cold-start skip); 0 when it reported nothing.
        self.fsm_index = fsm_index
        self.identity = identity if identity is not None else ClusterIdentity(
            data_dir=disk.data_dir, file_io=disk.file_io, cluster_id=None, state_machine=fsm)
        #: Snapshots from the leader installed by this engine (metrics).
        self.installed = 0
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
        # Above the cutover the gate opens the batch's proposal envelopes once, for its own
        # decryption ahead and for the applies below (None: each apply opens its own).
        envs = self._gate.prepare(entries, max(self.applied, self.fsm_index))
        try:
            for i, ent in enumerate(entries):
                if ent.type is not EntryType.NORMAL:
                    await self._apply_conf_entry(ent)
                elif is_cluster_record(ent.data):
                    await self._apply_cluster_record(ent)
                else:
                    self.apply_normal(ent, envs[i] if envs is not None else
                                      decode_proposal(ent.data))
        finally:
            self._gate.discard_prepared()
        if entries:
            self.identity.maybe_propose(self._node, entries[-1])

    async def _apply_cluster_record(self, ent: Entry) -> None:
        if ent.index <= self.applied:
            return
        cluster_id = decode_cluster_record(ent.data)
        if cluster_id is None:
            logger.warning("entry %d: unreadable cluster record ignored", ent.index)
        else:
            await self.identity.adopt(cluster_id, self._io, f"entry {ent.index}")
        self.applied = ent.index

    def apply_normal(self, ent: Entry, env: tuple[int, bytes] | None) -> None:
        """Apply a normal entry; ``env`` is its proposal envelope opened
        (``contexts.decode_proposal``), None when it is not one."""
        if ent.index <= self.applied:
            return  # replayed: the restored state machine already reflects it
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
        if ent.index <= self.fsm_index:
            self.applied = ent.index  # the state machine's store holds it (cold-start skip)
            return
        payload = self._gate.unwrap(ent.index, payload, rid)
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
        """The peers file, then ask for a snapshot carrying this configuration (unless the
        newest snapshot already does); the loop starts it in the background."""
        await self._io.run(self._disk.write_current_peers, change.index,
                           to_persisted(change.members))
        meta = self._storage.snapshot().metadata
        if meta.index > change.index or (
            meta.index == change.index and meta.conf_state.equivalent(change.conf_state)
        ):
            return
        self._snapshots.want(change.index)

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
        idx = snap.metadata.index
        m.check_join_role(cs)
        desc = descriptor_of(snap.data)
        if desc is not None:
            self.identity.check_snapshot(desc.cluster_id, idx)
        self._gate.adopt_snapshot(desc.envelope if desc is not None else NO_ENVELOPE, idx)
        members = peers_for_conf_state(m.peers, cs, desc.members if desc is not None else ())
        m.require_addresses(members)
        if desc is not None and desc.cluster_id:
            await self.identity.adopt(desc.cluster_id, self._io, f"the snapshot at index {idx}")
        async with self._snapshots.lock:
            self.restoring = True
            try:
                await trio.lowlevel.checkpoint()
                await trio.lowlevel.checkpoint()
                if self._set_apply_index is not None:
                    self._set_apply_index(idx)  # the restored state covers ``idx``
                await self._io.run(self._disk.restore_snapshot_state, self._fsm, snap,
                                   self._gate.cipher)
                self._storage.apply_snapshot(snap)
                self.applied = max(self.applied, idx)
                self.fsm_index = 0  # the store was replaced: nothing above ``idx`` is in it
            finally:
                self.restoring = False
        self.installed += 1
        m.note_applied(idx)
        m.commit(idx, cs, members)
        await self._io.run(self._disk.write_current_peers, idx, to_persisted(members))
