"""Opening a data directory (spec d.3) and persisting each Ready afterwards.

Data directory layout::

    <data_dir>/wal/%016x-%016x.wal      WAL segments (seq-index), plus LOCK
    <data_dir>/snap/%016x-%016x.snap    snapshot metadata files (term-index)
    <data_dir>/fsm-snap/%016x.fsm       state-machine payload files (index)
    <data_dir>/trio-raft-peers.bin      the peers file

Recovery order (:func:`open_disk_state`):

1. Create the directories; delete stale incoming snapshot spools (``trio-raft-snapshot-*``) in
   the data dir and ``fsm-snap/``, ``*.fsm.tmp`` files, ``.fsm`` files with no ``.snap`` at their
   index, and unfinished ``.snap``/WAL temp files.
2. A WAL exists (**restart**): open it (repairing a torn tail), load the newest ``.snap`` that
   matches a WAL-valid snapshot marker, replay the WAL after it, restore the state machine from
   the ``.fsm`` file the token names (or from an inline payload), and rebuild the in-memory
   :class:`MemoryStorage` (snapshot, hard state, entries).
3. Nothing on disk, and one peer or ``bootstrap`` (**bootstrap**): write the state machine's
   snapshot to ``fsm-snap/0000000000000001.fsm`` and a boot state: snapshot index 1 term 1 whose
   conf state holds the peers (voters and learners, sorted by node id) and whose data is the
   token, hard state term 1 commit 1. The WAL is built under ``wal.tmp`` and renamed into place,
   so a crash leaves either nothing or a complete boot state.
4. Nothing on disk, several peers and no ``bootstrap`` (**join**): an empty WAL, no snapshot and
   no conf state; the leader will send a snapshot.
"""

from __future__ import annotations

import contextlib
import enum
import io
import logging
import os
import shutil
import threading
from collections.abc import Sequence
from typing import Any, BinaryIO, Protocol

import attrs

from trio_raft.core.messages import (
    EMPTY_SNAPSHOT,
    ConfState,
    Entry,
    HardState,
    Snapshot,
    SnapshotMetadata,
)
from trio_raft.core.storage import MemoryStorage
from trio_raft.errors import NoPeersConfiguredError, SnapshotFileError
from trio_raft.storage import fsm_snapshot as fsm
from trio_raft.storage import snapshots as snaps
from trio_raft.storage.fileutil import fsync_dir, make_dirs
from trio_raft.storage.peers import (
    LEARNER,
    PeersFile,
    PersistedPeer,
    load_persisted_peers,
    save_persisted_peers,
)
from trio_raft.storage.wal import MAX_WAL_FILES, SEGMENT_SIZE, WAL, wal_exists

log = logging.getLogger(__name__)

WAL_DIR = "wal"
SNAP_DIR = "snap"
FSM_DIR = "fsm-snap"
#: Name prefix of incoming snapshot spool files; stale ones are deleted at open.
SPOOL_PREFIX = "trio-raft-snapshot-"


class StateMachine(Protocol):
    def snapshot(self) -> fsm.FSMSnapshot: ...

    def restore(self, reader: BinaryIO) -> Any: ...


class RecoveryKind(enum.Enum):
    RESTART = "restart"
    BOOTSTRAP = "bootstrap"
    JOIN = "join"


@attrs.define(eq=False)
class DiskPersistence:
    """The durable side of the engine's loop: one instance per open data directory.

    Thread-safe: every method takes an internal lock, so the Ready path and the snapshot worker
    may call it from different worker threads. It never touches the :class:`MemoryStorage`
    (the engine mirrors into that from its own loop).
    """

    data_dir: str
    wal: WAL
    snapshotter: snaps.Snapshotter
    max_wal_files: int = MAX_WAL_FILES
    max_snap_files: int = snaps.MAX_SNAP_FILES
    #: Snapshot markers known to be in the WAL (valid once the commit index reaches them).
    markers: list[SnapshotMetadata] = attrs.field(factory=list)
    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)

    @property
    def snap_dir(self) -> str:
        return os.path.join(self.data_dir, SNAP_DIR)

    @property
    def fsm_dir(self) -> str:
        return os.path.join(self.data_dir, FSM_DIR)

    def save_ready(self, hard_state: HardState | None, entries: Sequence[Entry],
                   snapshot: Snapshot | None, must_sync: bool) -> None:
        """Persist one Ready: the snapshot (``.snap`` file, then the WAL marker together with a
        hard state committing it, fsynced), then the entries and hard state (fsynced when
        ``must_sync`` or when the WAL's own rule asks for it)."""
        with self._lock:
            if snapshot is not None and not snapshot.is_empty():
                self._save_snapshot(snapshot, hard_state)
            self.wal.save(hard_state, entries, sync=must_sync)

    def try_save_state(self, hard_state: HardState) -> bool:
        """Write a hard state whose term and vote are unchanged (a commit-index update), without
        fsync, when no other writer holds the lock; returns False (nothing written) otherwise.

        Cheap enough for the caller's thread: a buffered ``write`` and no sync. A commit index
        need not be durable (it is recomputed from a quorum after a restart)."""
        if not self._lock.acquire(blocking=False):
            return False
        try:
            self.wal.save(hard_state, (), sync=False)
        finally:
            self._lock.release()
        return True

    def _save_snapshot(self, snapshot: Snapshot, hard_state: HardState | None) -> None:
        meta = snapshot.metadata
        self.snapshotter.save(snapshot)
        base = hard_state if hard_state is not None else self.wal.hard_state
        commit = max(meta.index, self.wal.hard_state.commit)
        marker_hs = HardState(base.term, base.vote, commit)
        self.wal.save_snapshot(meta, marker_hs)
        self.markers.append(meta)
        self.wal.release_to(meta.index)

    def save_snapshot(self, snapshot: Snapshot) -> None:
        """Persist a snapshot taken locally (``.snap`` file, then the WAL marker; fsynced) and
        release the WAL segments before it. ``snapshot.metadata.index`` must be applied."""
        with self._lock:
            self.snapshotter.save(snapshot)
            self.wal.save_snapshot(snapshot.metadata)
            self.markers.append(snapshot.metadata)
            self.wal.release_to(snapshot.metadata.index)

    def save_local_snapshot(self, index: int, term: int, conf_state: ConfState,
                            token: bytes) -> Snapshot:
        """Build and persist the raft snapshot of a local (periodic or config-change) snapshot."""
        snap = Snapshot(SnapshotMetadata(conf_state, index, term), token)
        self.save_snapshot(snap)
        return snap

    def valid_snapshot_markers(self) -> list[SnapshotMetadata]:
        commit = self.wal.hard_state.commit
        return [m for m in self.markers if m.index <= commit]

    def write_fsm_snapshot(self, fsm_snap: fsm.FSMSnapshot, index: int,
                           protected: Sequence[int] = ()) -> bytes:
        """Pre-write retention, then write ``fsm-snap/<index>.fsm``; returns the token.

        The handle is not closed here. Slow (it streams the whole state machine): call it from
        a worker thread; it does not hold the lock while writing.
        """
        with self._lock:
            valid = self.valid_snapshot_markers()
        snaps.prepare_fsm_snapshot_write(self.snap_dir, self.fsm_dir, index, valid, protected)
        crc = fsm.write_fsm_snapshot_file(fsm_snap, self.fsm_dir, index)
        return fsm.encode_snapshot_token(index, crc)

    def purge(self) -> None:
        """Keep the newest snapshot files and WAL segments; failures are only logged."""
        with self._lock:
            try:
                snaps.purge_old_snapshot_files(self.snap_dir, self.fsm_dir, self.max_snap_files)
            except OSError as exc:
                log.warning("purging snapshot files failed: %s", exc)
            try:
                self.wal.purge(self.max_wal_files)
            except OSError as exc:
                log.warning("purging WAL segments failed: %s", exc)
            first = self.wal.segments[0].index
            self.markers = [m for m in self.markers if m.index >= first]

    def close(self) -> None:
        with self._lock:
            self.wal.close()


@attrs.frozen(eq=False)
class DiskState:
    """Everything :func:`open_disk_state` recovered."""

    kind: RecoveryKind
    data_dir: str
    persistence: DiskPersistence
    #: The in-memory log storage for the core, rebuilt from disk.
    storage: MemoryStorage
    hard_state: HardState
    #: The snapshot recovery started from (EMPTY_SNAPSHOT when there is none).
    snapshot: Snapshot
    #: WAL entries after the snapshot.
    entries: tuple[Entry, ...]
    #: Index the state machine reflects after recovery (the snapshot index, or 0).
    applied_index: int
    #: The peers file as found at open (written for a bootstrap), or None.
    persisted_peers: PeersFile | None
    wal_metadata: bytes = b""

    @property
    def wal(self) -> WAL:
        return self.persistence.wal

    @property
    def conf_state(self) -> ConfState:
        return self.snapshot.metadata.conf_state


def _remove_spools(directory: str) -> None:
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return
    stale = [n for n in names if n.startswith(SPOOL_PREFIX)]
    for name in stale:
        path = os.path.join(directory, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    if stale:
        log.info("removed stale snapshot spools in %s: %s", directory, stale)
        fsync_dir(directory)


def restore_snapshot_state(state_machine: StateMachine | None, snapshot: Snapshot,
                           fsm_dir: str) -> int:
    """Restore ``state_machine`` from ``snapshot`` (token or inline payload); returns the
    effective applied index (the snapshot index)."""
    meta = snapshot.metadata
    if snapshot.is_empty() or state_machine is None:
        return meta.index
    if not snapshot.data:
        log.warning("snapshot at index %d carries no state machine data", meta.index)
        return meta.index
    if fsm.is_snapshot_token(snapshot.data):
        index, crc = fsm.decode_snapshot_token(snapshot.data)
        fsm.open_and_restore_fsm_snapshot(state_machine, fsm.fsm_snapshot_path(fsm_dir, index),
                                          crc)
    else:
        state_machine.restore(io.BytesIO(snapshot.data))
    return meta.index


def boot_conf_state(peers: Sequence[PersistedPeer]) -> ConfState:
    voters = sorted(p.node_id for p in peers if p.suffrage != LEARNER)
    learners = sorted(p.node_id for p in peers if p.suffrage == LEARNER)
    return ConfState(voters=voters, learners=learners)


def _create_wal_atomically(data_dir: str, metadata: bytes, segment_size: int,
                           snapshot: Snapshot | None, hs: HardState | None) -> WAL:
    final = os.path.join(data_dir, WAL_DIR)
    tmp = final + ".tmp"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    if os.path.isdir(final):  # an empty or segment-less leftover directory
        shutil.rmtree(final)
    with WAL.create(tmp, metadata, segment_size=segment_size) as wal:
        if snapshot is not None:
            wal.save_snapshot(snapshot.metadata, hs)
    os.rename(tmp, final)
    fsync_dir(data_dir)
    return WAL.open(final, segment_size=segment_size)


def open_disk_state(data_dir: str | os.PathLike[str], peers: Sequence[PersistedPeer],
                    bootstrap: bool, state_machine: StateMachine | None, *, join: bool = False,
                    wal_metadata: bytes = b"", segment_size: int = SEGMENT_SIZE,
                    max_wal_files: int = MAX_WAL_FILES,
                    max_snap_files: int = snaps.MAX_SNAP_FILES) -> DiskState:
    """Open (or initialise) ``data_dir`` following the recovery order of the module docstring.

    ``peers`` are the configured peers (used only for a fresh data dir; ``join`` forces the join
    layout even for a single peer); ``state_machine`` is
    restored from the recovered snapshot (restart) or snapshotted into the boot state
    (bootstrap). Raises the storage errors of the layers below (WALCorruptError,
    WALUnrepairableError, WALSnapshotNotFoundError, FSMSnapshot*Error, SnapshotFileError
    (also when no .snap file matches any WAL-valid snapshot marker), PeersFileError) and
    NoPeersConfiguredError for a fresh dir without peers.
    """
    data_dir = os.fspath(data_dir)
    snap_dir = os.path.join(data_dir, SNAP_DIR)
    fsm_dir = os.path.join(data_dir, FSM_DIR)
    wal_dir = os.path.join(data_dir, WAL_DIR)
    for d in (data_dir, snap_dir, fsm_dir):
        make_dirs(d)
    _remove_spools(data_dir)
    _remove_spools(fsm_dir)
    snapshotter = snaps.Snapshotter(snap_dir)
    snapshotter.remove_tmp_files()
    snaps.cleanup_stale_fsm_files(snap_dir, fsm_dir)
    persisted = load_persisted_peers(data_dir)

    def persistence(wal: WAL, markers: list[SnapshotMetadata]) -> DiskPersistence:
        return DiskPersistence(data_dir, wal, snapshotter, max_wal_files, max_snap_files,
                               markers)

    if wal_exists(wal_dir):
        wal = WAL.open(wal_dir, segment_size=segment_size)
        try:
            valid = wal.valid_snapshot_entries()
            loaded = snapshotter.load_newest_available(valid)
            if loaded is None and valid:
                wanted = ", ".join(f"term {m.term} index {m.index}" for m in valid)
                raise SnapshotFileError(
                    f"no usable .snap file in {snap_dir} for the WAL's snapshots ({wanted})")
            snap = loaded or EMPTY_SNAPSHOT
            contents = wal.read_all(snap.metadata.index, snap.metadata.term)
            applied = restore_snapshot_state(state_machine, snap, fsm_dir)
        except BaseException:
            wal.close()
            raise
        storage = MemoryStorage()
        if not snap.is_empty():
            storage.apply_snapshot(snap)
        storage.set_hard_state(contents.hard_state)
        storage.append(list(contents.entries))
        log.info("recovered %s: snapshot index %d term %d, %d entries after it, %s",
                 data_dir, snap.metadata.index, snap.metadata.term, len(contents.entries),
                 contents.hard_state)
        return DiskState(RecoveryKind.RESTART, data_dir, persistence(wal, list(valid)), storage,
                         contents.hard_state, snap, contents.entries, applied, persisted,
                         contents.metadata)

    if not peers:
        raise NoPeersConfiguredError()
    storage = MemoryStorage()
    if (len(peers) == 1 or bootstrap) and not join:
        if state_machine is None:
            raise ValueError("bootstrapping a data dir needs a state machine")
        handle = state_machine.snapshot()
        try:
            crc = fsm.write_fsm_snapshot_file(handle, fsm_dir, 1)
        finally:
            handle.close()
        snap = Snapshot(SnapshotMetadata(boot_conf_state(peers), 1, 1),
                        fsm.encode_snapshot_token(1, crc))
        hs = HardState(term=1, commit=1)
        snapshotter.save(snap)
        wal = _create_wal_atomically(data_dir, wal_metadata, segment_size, snap, hs)
        save_persisted_peers(data_dir, 1, peers, seed=peers)
        storage.apply_snapshot(snap)
        storage.set_hard_state(hs)
        log.info("bootstrapped %s with %d peer(s)", data_dir, len(peers))
        return DiskState(RecoveryKind.BOOTSTRAP, data_dir,
                         persistence(wal, [snap.metadata]), storage, hs, snap, (), 1,
                         load_persisted_peers(data_dir), wal_metadata)

    wal = _create_wal_atomically(data_dir, wal_metadata, segment_size, None, None)
    log.info("initialised %s to join an existing cluster", data_dir)
    return DiskState(RecoveryKind.JOIN, data_dir, persistence(wal, []), storage,
                     HardState(), EMPTY_SNAPSHOT, (), 0, persisted, wal_metadata)
