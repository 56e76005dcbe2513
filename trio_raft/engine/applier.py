"""Applying what raft committed, installing snapshots, and taking periodic snapshots.

Runs on the run loop (entries are applied in order, inline, between Readys). Any failure here
is fatal for the engine: the applied index never moves past an entry that did not apply.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Sequence
from typing import Any

import trio

from trio_raft.core.errors import CompactedError, SnapOutOfDateError, UnavailableError
from trio_raft.core.messages import (
    NONE,
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    EntryType,
    Snapshot,
)
from trio_raft.engine.contexts import decode_conf_context, decode_proposal
from trio_raft.engine.state import EngineState
from trio_raft.engine.types import SUFFRAGE_LEARNER, SUFFRAGE_VOTER, Peer, ProposalResult
from trio_raft.errors import FSMApplyHaltError, PeerAddressRequiredError, SnapshotRequiredError
from trio_raft.storage import fsm_snapshot as fsm_files
from trio_raft.storage.peers import PersistedPeer, write_current_persisted_peers
from trio_raft.storage.recovery import restore_snapshot_state

logger = logging.getLogger(__name__)


def to_persisted(peers: Sequence[Peer]) -> list[PersistedPeer]:
    return [
        PersistedPeer(p.node_id, p.id, p.address, p.suffrage or SUFFRAGE_VOTER) for p in peers
    ]


def peers_for_conf_state(peers: dict[int, Peer], cs: ConfState) -> list[Peer]:
    out: list[Peer] = []
    for nid in cs.voters:
        p = peers.get(nid, Peer(str(nid), "", nid))
        out.append(Peer(p.id, p.address, nid, SUFFRAGE_VOTER))
    for nid in cs.learners:
        p = peers.get(nid, Peer(str(nid), "", nid))
        out.append(Peer(p.id, p.address, nid, SUFFRAGE_LEARNER))
    return out


class ApplyMixin(EngineState):
    # -- committed entries -------------------------------------------------------------
    async def _apply_entries(self, entries: Sequence[Entry]) -> None:
        for ent in entries:
            if ent.type is EntryType.NORMAL:
                self._apply_normal(ent)
            else:
                await self._apply_conf_entry(ent)

    def _apply_normal(self, ent: Entry) -> None:
        if ent.index <= self._applied:
            return  # replayed duplicate (already reflected by the restored state machine)
        env = decode_proposal(ent.data)
        if env is None:
            self._apply_non_proposal(ent)
            return
        rid, payload = env
        if self._apply_engine_record(ent, rid, payload):
            return
        payload = self._unwrap_payload(ent.index, payload)
        set_index = getattr(self._fsm, "set_apply_index", None)
        if set_index is not None:
            set_index(ent.index)
        response = self._fsm.apply(payload)
        halt = getattr(response, "halt_apply", None)
        if callable(halt):
            err = halt()
            if err is not None:
                raise FSMApplyHaltError(f"entry {ent.index}: {err}") from (
                    err if isinstance(err, BaseException) else None
                )
        self._applied = ent.index
        w = self._pending_proposals.pop(rid)
        if w is not None:
            w.resolve(ProposalResult(ent.index, response))

    def _apply_non_proposal(self, ent: Entry) -> None:
        """Leader no-op entries and anything not enveloped: nothing to apply."""
        self._applied = ent.index

    def _apply_engine_record(self, ent: Entry, request_id: int, payload: bytes) -> bool:
        """Hook: apply a record meant for the engine itself (never shown to the state
        machine); True when ``payload`` was one."""
        return False

    def _unwrap_payload(self, index: int, payload: bytes) -> bytes:
        """Hook for the raft envelope (entries above the cutover are unwrapped)."""
        return payload

    async def _apply_conf_entry(self, ent: Entry) -> None:
        assert self._node is not None
        if ent.type is EntryType.CONF_CHANGE_V2:
            raise SnapshotRequiredError("joint configuration changes are not supported")
        cc = ConfChange.decode(ent.data)
        cs = self._node.apply_conf_change(cc)
        if ent.index > self._config_index:
            await self._apply_conf_change(ent.index, cc, cs)
        else:
            self._conf_state = cs
        self._applied = max(self._applied, ent.index)
        if self._fence and self._applied >= self._fence:
            self._fence = 0

    async def _apply_conf_change(
        self, index: int, cc: ConfChange, cs: ConfState
    ) -> None:
        peers = dict(self._peers)
        ctx = decode_conf_context(cc.context) if cc.context else None
        if ctx is not None and ctx.node_id not in (NONE, cc.node_id) and cc.node_id != NONE:
            ctx = None
        nid = cc.node_id
        if cc.type in (ConfChangeType.ADD_NODE, ConfChangeType.ADD_LEARNER_NODE,
                       ConfChangeType.UPDATE_NODE):
            if ctx is not None and (ctx.id or ctx.address):
                old = peers.get(nid)
                peers[nid] = Peer(ctx.id or (old.id if old else str(nid)),
                                  ctx.address or (old.address if old else ""), nid)
            elif nid not in peers:
                peers[nid] = Peer(str(nid), "", nid)
        elif cc.type is ConfChangeType.REMOVE_NODE:
            peers.pop(nid, None)
        members = peers_for_conf_state(peers, cs)
        for p in members:
            if not p.address and p.node_id != self._node_id:
                raise PeerAddressRequiredError(f"conf state node id={p.node_id}")
        await self._persist_config_state(index, cs, members)
        # Transport and dispatch follow the new membership.
        self._peers = {p.node_id: p for p in members}
        if cc.type is ConfChangeType.REMOVE_NODE:
            if self._transport is not None and nid != self._node_id:
                self._transport.remove_peer(nid)
            self._dispatcher.remove_peer(nid)
            self._acks.remove_peer(nid, len(cs.voters))
            if nid == self._node_id:
                self._remove_self = True
        else:
            added = self._peers.get(nid)
            if added is not None and nid != self._node_id:
                self._upsert_transport_peer(added)
        self._conf_state = cs
        self._config_index = index
        if ctx is not None:
            w = self._pending_admin.pop(ctx.request_id)
            if w is not None:
                w.resolve(index)
        if self._cfg.join_as_learner:
            self._check_join_alarm(cs)

    async def _persist_config_state(
        self, index: int, cs: ConfState, members: list[Peer]
    ) -> None:
        """Spec d.5: peers file, then a full state machine snapshot at the change's index so the
        newest snapshot always carries the newest membership."""
        await self._io(write_current_persisted_peers, self._disk.data_dir, index,
                       to_persisted(members))
        snap_meta = self._storage.snapshot().metadata
        if snap_meta.index > index or (
            snap_meta.index == index and snap_meta.conf_state.equivalent(cs)
        ):
            return
        await self._write_local_snapshot(index, cs, compact=False)

    def _upsert_transport_peer(self, p: Peer) -> None:
        if self._transport is None or not p.address:
            return
        from trio_raft.transport.base import TransportPeer

        self._transport.upsert_peer(TransportPeer(p.node_id, p.id, p.address))
        self._dispatcher.ensure_peer(p.node_id)

    def _mark_fence(self, entries: Sequence[Entry]) -> None:
        for e in entries:
            if e.type is not EntryType.NORMAL:
                self._fence = max(self._fence, e.index)

    def _check_join_alarm(self, cs: ConfState) -> None:
        if self._join_alarm_fired or self._node_id not in cs.voters:
            return
        from trio_raft.engine import engine as engine_mod

        self._join_alarm_fired = True
        engine_mod._bump_join_role_violation()
        logger.error(
            "join-as-learner node %s is listed as a voter: an operator added it as a voter",
            self._local_id,
        )

    # -- snapshots -----------------------------------------------------------------------
    async def _install_snapshot(self, snap: Snapshot) -> None:
        if not snap.data:
            raise SnapshotRequiredError(f"snapshot at index {snap.metadata.index} has no data")
        cs = snap.metadata.conf_state
        for nid in (*cs.voters, *cs.learners):
            p = self._peers.get(nid)
            if nid != self._node_id and (p is None or not p.address):
                raise PeerAddressRequiredError(f"conf state node id={nid}")
        await self._io(restore_snapshot_state, self._fsm, snap, self._disk.fsm_dir)
        self._storage.apply_snapshot(snap)
        idx = snap.metadata.index
        self._applied = max(self._applied, idx)
        if self._fence and self._fence <= idx:
            self._fence = 0
        self._conf_state = cs
        self._config_index = max(self._config_index, idx)
        members = peers_for_conf_state(self._peers, cs)
        self._peers = {p.node_id: p for p in members}
        await self._io(write_current_persisted_peers, self._disk.data_dir, idx,
                       to_persisted(members))
        if self._cfg.join_as_learner:
            self._check_join_alarm(cs)

    def _maybe_start_snapshot(self) -> None:
        if self._snapshot_in_flight or self._applied == 0 or self._nursery is None:
            return
        snap_index = self._storage.snapshot().metadata.index
        if self._applied - snap_index < self._cfg.snapshot_every:
            return
        self._snapshot_in_flight = True
        self._nursery.start_soon(self._snapshot_worker)

    async def _snapshot_worker(self) -> None:
        try:
            await self._write_local_snapshot(None, None, compact=True)
        except Exception as exc:
            self._fail(exc)
        finally:
            self._snapshot_in_flight = False

    async def _write_local_snapshot(
        self, index: int | None, cs: ConfState | None, *, compact: bool
    ) -> None:
        """Snapshot the state machine at ``index`` (== the applied index now), persist it and
        optionally compact the log behind it. One snapshot write at a time: the periodic worker
        and configuration-change snapshots share a lock (file retention is not concurrent-safe).
        """
        async with self._snapshot_lock:
            await self._write_local_snapshot_locked(index, cs, compact=compact)

    async def _write_local_snapshot_locked(
        self, index: int | None, cs: ConfState | None, *, compact: bool
    ) -> None:
        # ``None``: the state as of now. Reading the index and taking the state machine's handle
        # happen with no checkpoint in between, so they describe the same state.
        if index is None or cs is None:
            index, cs = self._applied, self._conf_state
        if index <= self._storage.snapshot().metadata.index:
            return
        handle = self._fsm.snapshot()
        try:
            token = await self._io(self._disk.write_fsm_snapshot, handle, index)
        finally:
            handle.close()
        if index <= self._storage.snapshot().metadata.index:
            return
        try:
            snap = self._storage.create_snapshot(index, cs, token)
        except (SnapOutOfDateError, CompactedError, UnavailableError):
            return
        set_durable = getattr(self._fsm, "set_durable_applied_index", None)
        if set_durable is not None:
            set_durable(index)
        await self._io(self._disk.save_snapshot, snap)
        if compact:
            keep = self._cfg.snapshot_catchup_entries
            target = index - keep
            if target > self._storage.first_index():
                with contextlib.suppress(CompactedError, UnavailableError):
                    self._storage.compact(target)
        await self._io(self._disk.purge)
        logger.info("snapshot written at index %d", index)

    def _configure_snapshot_transport(self, t: Any) -> None:
        fsm_dir = self._disk.fsm_dir

        def opener(index: int) -> Any:
            f, _size, _crc = fsm_files.open_fsm_snapshot_payload(
                fsm_files.fsm_snapshot_path(fsm_dir, index)
            )
            return f

        def reader(index: int) -> bytes:
            return fsm_files.read_fsm_snapshot_payload(fsm_files.fsm_snapshot_path(fsm_dir, index))

        def token_index(data: bytes) -> int | None:
            if not fsm_files.is_snapshot_token(data):
                return None
            return fsm_files.decode_snapshot_token(data)[0]

        for name, value in (
            ("set_fsm_payload_opener", opener),
            ("set_fsm_payload_reader", reader),
            ("set_snapshot_token_encoder", fsm_files.encode_snapshot_token),
            ("set_snapshot_token_decoder", token_index),
            ("set_applied_index_getter", lambda: self._applied),
        ):
            setter = getattr(t, name, None)
            if setter is not None:
                setter(value)


def inline_restore(fsm: Any, data: bytes) -> None:
    fsm.restore(io.BytesIO(data))


async def checkpoint() -> None:
    await trio.lowlevel.checkpoint()
