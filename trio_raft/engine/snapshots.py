"""Local snapshots of the state machine: when to take one, writing it, compacting behind it.

``Snapshots`` owns the engine's snapshot *writing*: the periodic snapshot (every
``snapshot_every`` applied entries) and the one a configuration change asks for (``want``,
from ``applier.py``), so the newest snapshot soon carries the newest membership. Both are
written by a background task of the engine's nursery (``start``), so applying, ticking and
heartbeats go on while a large state is written. The state machine's ``snapshot()`` is
called on the trio thread and must be quick (it captures a handle); the handle's ``write_to``
streams the state into ``fsm-snap/%016x.fsm`` in a worker thread. The raft snapshot's data is a
descriptor (``trio_raft/storage/descriptor.py``): the ``.fsm`` token, the cluster id and every
member of the snapshot's configuration with its address, so a node that installs it can reach
every member.

Invariants:

* The index a snapshot is labelled with and the state machine handle are taken with no
  checkpoint in between, so they describe the same state (``position()`` is read right before
  ``snapshot()``). A snapshot labelled below the state it holds would replay entries twice.
* Never below the state machine's own store: right after a cold-start skip the state machine
  holds entries up to ``floor()`` (the store's index) while the engine is still processing the
  entries below it; a snapshot labelled there would hold more than its label says, so none is
  taken until the applied index reached the floor (the membership a skipped
  configuration-change snapshot would carry is in the peers file and the log meanwhile).
* A configuration change at index ``i`` is followed by a snapshot at ``i`` or above: ``want``
  records ``i``, and a snapshot is due until the newest one reaches it (the one written may be
  above ``i``: it is labelled with the position when it starts). Until then the change is in
  the peers file and the log, which is all a restart needs.
* One snapshot write at a time (``_lock``): the periodic worker and configuration-change
  snapshots share the data dir's retention, which is not safe to run concurrently.
* A snapshot never goes backwards: one at or below the newest snapshot index is dropped.
* The log is compacted only behind a snapshot that is durable (``.fsm`` and ``.snap`` fsynced,
  marker in the WAL), keeping ``snapshot_catchup_entries`` entries for slow followers.
* With the envelope on (``envelope_gate.py``), the payload is sealed under the active key for
  the snapshot's index and term, and the descriptor carries the key ring and the cutover; the
  envelope state is read together with the position, so the snapshot's label, content and
  regime agree.
* ``compact_now`` (``Engine.compact_now``) writes a snapshot at the applied index and makes it
  where the data dir begins: the in-memory log and the WAL keep nothing at or below it, and
  older snapshot files are deleted (after the cutover: no cleartext entry or payload left).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable, Sequence

import attrs
import trio

from trio_raft.core.errors import CompactedError, SnapOutOfDateError, UnavailableError
from trio_raft.core.messages import ConfState
from trio_raft.core.storage import MemoryStorage
from trio_raft.engine.diskio import DiskRunner
from trio_raft.engine.membership import to_persisted
from trio_raft.engine.types import Peer, StateMachine
from trio_raft.errors import NothingToExportError
from trio_raft.storage.backup import BackupInfo, write_backup
from trio_raft.storage.descriptor import (
    NO_ENVELOPE,
    EnvelopeState,
    SnapshotDescriptor,
    encode_descriptor,
)
from trio_raft.storage.recovery import DiskPersistence, snapshot_members
from trio_raft.storage.sealing import PayloadCipher

logger = logging.getLogger(__name__)


class Snapshots:
    """See the module docstring."""

    def __init__(self, *, fsm: StateMachine, disk: DiskPersistence, storage: MemoryStorage,
                 io: DiskRunner, position: Callable[[], tuple[int, ConfState, Sequence[Peer]]],
                 every: int, catchup_entries: int,
                 protected: Callable[[], frozenset[int]] = frozenset,
                 cluster_id: Callable[[], str | None] = lambda: None,
                 floor: Callable[[], int] = lambda: 0,
                 envelope: Callable[[], tuple[PayloadCipher | None, EnvelopeState]] = (
                     lambda: (None, NO_ENVELOPE))) -> None:
        self._fsm = fsm
        #: (cipher to seal with, envelope records) for a snapshot written now.
        self._envelope = envelope
        self._disk = disk
        self._storage = storage
        self._io = io
        #: (applied index, conf state, its members) of the state machine right now.
        self._position = position
        #: The node's cluster id (recorded in every snapshot it writes).
        self._cluster_id = cluster_id
        #: The state machine holds every entry up to here (cold-start skip): no snapshot below.
        self._floor = floor
        #: Snapshots written by this engine (metrics).
        self.written = 0
        self._every = every
        self._catchup_entries = catchup_entries
        #: Received ``.fsm`` files not installed yet; retention keeps them.
        self._protected = protected
        self._lock = trio.Lock()
        self._in_flight = False
        #: A snapshot at or above this index was asked for (configuration changes).
        self._wanted = 0

    @property
    def lock(self) -> trio.Lock:
        """Held while a snapshot is written; the applier holds it while it restores one."""
        return self._lock

    def want(self, index: int) -> None:
        """Ask for a snapshot at ``index`` or above, written in the background (``due``)."""
        self._wanted = max(self._wanted, index)

    def due(self, applied: int) -> bool:
        """Whether a background snapshot should start now."""
        if self._in_flight or applied == 0 or applied < self._floor():
            return False
        newest = self._storage.snapshot().metadata.index
        return applied - newest >= self._every or newest < self._wanted <= applied

    def start(self, nursery: trio.Nursery, on_error: Callable[[BaseException], None]) -> None:
        """Write a snapshot of the current position in a task of ``nursery`` (when ``due``);
        it compacts the log only when the periodic threshold was reached."""
        newest = self._storage.snapshot().metadata.index
        compact = self._position()[0] - newest >= self._every
        self._in_flight = True
        nursery.start_soon(self._background, on_error, compact)

    async def _background(self, on_error: Callable[[BaseException], None],
                          compact: bool) -> None:
        try:
            await self.write(None, None, compact=compact)
            applied = self._position()[0]
            if self._storage.snapshot().metadata.index < self._wanted <= applied and (
                    applied >= self._floor()):
                # a change applied while this one was written: its snapshot, now
                await self.write(None, None, compact=False)
        except Exception as exc:
            on_error(exc)
        finally:
            self._in_flight = False

    async def write(self, index: int | None, cs: ConfState | None, *, compact: bool,
                    members: Sequence[Peer] = ()) -> None:
        """Snapshot the state machine at ``index`` (which must be its applied index now, with
        configuration ``cs`` of ``members``; None: the position as of when the write starts),
        persist it and optionally compact."""
        async with self._lock:
            await self._write_locked(index, cs, members, compact=compact)

    async def _write_locked(self, index: int | None, cs: ConfState | None,
                            members: Sequence[Peer], *, compact: bool) -> None:
        if index is None or cs is None:
            index, cs, members = self._position()
        if index <= self._storage.snapshot().metadata.index:
            return
        if index < self._floor():
            logger.info("no snapshot at index %d: the state machine already holds entries up "
                        "to %d", index, self._floor())
            return
        cluster_id = self._cluster_id() or ""
        term = self._storage.term(index)
        cipher, envelope = self._envelope()
        handle = self._fsm.snapshot()  # no checkpoint since the position was read
        try:
            token = await self._io.run(self._disk.write_fsm_snapshot, handle, index,
                                       self._protected(),
                                       None if cipher is None else (cipher, term))
        finally:
            handle.close()
        if index <= self._storage.snapshot().metadata.index:
            return
        data = encode_descriptor(SnapshotDescriptor(
            token, cluster_id, snapshot_members(to_persisted(members)), envelope=envelope))
        try:
            snap = self._storage.create_snapshot(index, cs, data)
        except (SnapOutOfDateError, CompactedError, UnavailableError):
            return
        await self._io.run(self._disk.save_snapshot, snap)
        self.written += 1
        if compact:
            target = index - self._catchup_entries
            if target > self._storage.first_index():
                with contextlib.suppress(CompactedError, UnavailableError):
                    self._storage.compact(target)
        await self._io.run(self._disk.purge)
        logger.info("snapshot written at index %d", index)

    async def compact_now(self) -> int:
        """Snapshot at the applied index (unless the newest snapshot is there already), then
        drop everything at or below it: the in-memory log, the WAL segments (the WAL restarts
        after the snapshot) and older snapshot files. Returns the snapshot's index."""
        async with self._lock:
            await self._write_locked(None, None, (), compact=False)
            snap = self._storage.snapshot()
            index = snap.metadata.index
            if index > self._storage.first_index() - 1:
                with contextlib.suppress(CompactedError, UnavailableError):
                    self._storage.compact(index)
            removed = await self._io.run(self._disk.compact_to_snapshot, snap)
        logger.info("compacted to the snapshot at index %d (%d file(s) removed)", index,
                    len(removed))
        return index

    async def export(self, path: str | os.PathLike[str],
                     check_open: Callable[[], None]) -> BackupInfo:
        """A backup of the state machine at the applied index, written to ``path``
        (``Engine.export_snapshot``): under the lock, so no snapshot write or restore runs
        meanwhile; the position and the handle taken with no checkpoint in between, as for
        a snapshot; sealed, with the envelope's records, once the envelope is on."""
        async with self._lock:
            check_open()
            index, _cs, members = self._position()
            if index == 0 or index < self._floor():
                raise NothingToExportError(f"applied index {index}")
            cipher, envelope = self._envelope()
            info = attrs.evolve(
                BackupInfo(index, self._storage.term(index), self._cluster_id() or "",
                           snapshot_members(to_persisted(members))),
                envelope=envelope)
            handle = self._fsm.snapshot()  # no checkpoint since the position was read
            try:
                written = await self._io.run(functools.partial(
                    write_backup, path, info, handle, file_io=self._disk.file_io,
                    seal=cipher))
            finally:
                handle.close()
        logger.info("exported a snapshot at index %d term %d to %s (%d bytes)", written.index,
                    written.term, path, written.file_bytes)
        return written
