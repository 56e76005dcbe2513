"""Opening a data directory (docs/storage.md section 6) and persisting each Ready afterwards.

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
   matches a WAL-valid snapshot marker, replay the WAL after it, read the cluster id (the
   cluster id file, else the snapshot descriptor's, which is then recorded), ask the
   ``restore_policy`` whether the state machine's own store already holds the snapshot (the
   cold-start skip: then the payload is not read at all), otherwise restore the state machine
   from the ``.fsm`` file the descriptor or token names (or from an inline payload), and
   rebuild the in-memory :class:`MemoryStorage` (snapshot, hard state, entries).
3. Nothing on disk, and one peer or ``bootstrap`` (**bootstrap**): write the state machine's
   snapshot to ``fsm-snap/0000000000000001.fsm`` and a boot state: snapshot index 1 term 1 whose
   conf state holds the peers (voters and learners, sorted by node id) and whose data is a
   descriptor (token, members and, with a single voter, a new cluster id, also written to the
   cluster id file), hard state term 1 commit 1. The WAL is built under ``wal.tmp`` and renamed
   into place, so a crash leaves either nothing or a complete boot state.
4. Nothing on disk, several peers and no ``bootstrap`` (**join**): an empty WAL, no snapshot and
   no conf state; the leader will send a snapshot.

Every file access of :func:`open_disk_state` and of the :class:`DiskPersistence` it returns goes
through the one :class:`~trio_raft.storage.fileio.FileIO` passed as ``file_io`` (the real one by
default); the persistence keeps it (it is its WAL's) for everything later. A disk failure is a
typed :class:`~trio_raft.errors.StorageError` (:class:`~trio_raft.errors.StorageIOError`, or
:class:`~trio_raft.errors.WALIOError` from the WAL), never a bare :class:`OSError`.
"""

from __future__ import annotations

import enum
import io
import logging
import os
import threading
from collections.abc import Callable, Sequence
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
from trio_raft.errors import NoPeersConfiguredError, SnapshotFileError, StorageError
from trio_raft.storage import descriptor
from trio_raft.storage import fsm_snapshot as fsm
from trio_raft.storage import snapshots as snaps
from trio_raft.storage.cluster_id import (
    cluster_id_path,
    load_cluster_id,
    new_cluster_id,
    save_cluster_id,
)
from trio_raft.storage.fileio import OS_FILE_IO, FileIO
from trio_raft.storage.fileutil import (
    fsync_dir,
    lexists,
    listdir_if_exists,
    make_dirs,
    remove_tree,
    rename,
)
from trio_raft.storage.peers import (
    LEARNER,
    PeersFile,
    PersistedPeer,
    load_persisted_peers,
    save_persisted_peers,
    write_current_persisted_peers,
)
from trio_raft.storage.sealing import PayloadCipher, require_cipher
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


class RestorePolicy(Protocol):
    """Decides, at a restart, whether the state machine needs the recovered snapshot."""

    def skip_restore(self, snapshot: Snapshot, last_index: int, cluster_id: str | None
                     ) -> bool:
        """True when the state machine's own durable store already holds ``snapshot``'s state
        (it is then not restored, and its payload not read). ``last_index`` is the last index
        of the recovered log, ``cluster_id`` the data dir's. Called once, before any restore;
        may raise to refuse the open."""
        ...


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

    All its file access goes through :attr:`file_io`, the seam its WAL was opened with (the
    snapshotter must share it). Disk failures are typed :class:`StorageError`; once the WAL has
    failed it refuses every later write (see :mod:`trio_raft.storage.wal`).
    """

    data_dir: str
    wal: WAL
    snapshotter: snaps.Snapshotter
    max_wal_files: int = MAX_WAL_FILES
    max_snap_files: int = snaps.MAX_SNAP_FILES
    #: Snapshot markers known to be in the WAL (valid once the commit index reaches them).
    markers: list[SnapshotMetadata] = attrs.field(factory=list)
    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)

    def __attrs_post_init__(self) -> None:
        if self.snapshotter.file_io is not self.wal.file_io:
            raise ValueError("the snapshotter and the WAL must share one file_io")

    @property
    def file_io(self) -> FileIO:
        """The seam every file access of this persistence goes through."""
        return self.wal.file_io

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

    def try_save_ready(self, hard_state: HardState | None, entries: Sequence[Entry],
                       must_sync: bool) -> bool:
        """:meth:`save_ready` without a snapshot, when no other writer holds the lock; returns
        False (nothing written) otherwise. For a caller that must not wait behind another
        writer (the engine's run loop writing a small Ready on its own thread)."""
        if not self._lock.acquire(blocking=False):
            return False
        try:
            self.wal.save(hard_state, entries, sync=must_sync)
        finally:
            self._lock.release()
        return True

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
                           protected: Sequence[int] = (),
                           seal: tuple[PayloadCipher, int] | None = None) -> bytes:
        """Pre-write retention, then write ``fsm-snap/<index>.fsm`` (sealed for term
        ``seal[1]`` through ``seal[0]`` when given); returns the token.

        The handle is not closed here. Slow (it streams the whole state machine): call it from
        a worker thread; it does not hold the lock while writing.
        """
        with self._lock:
            valid = self.valid_snapshot_markers()
        snaps.prepare_fsm_snapshot_write(self.snap_dir, self.fsm_dir, index, valid, protected,
                                         file_io=self.file_io)
        crc = fsm.write_fsm_snapshot_file(fsm_snap, self.fsm_dir, index, file_io=self.file_io,
                                          seal=seal)
        return fsm.encode_snapshot_token(index, crc)

    def restore_snapshot_state(self, state_machine: StateMachine | None,
                               snapshot: Snapshot, cipher: PayloadCipher | None = None) -> int:
        """:func:`restore_snapshot_state` from this data dir's ``fsm-snap/``, through
        :attr:`file_io`."""
        return restore_snapshot_state(state_machine, snapshot, self.fsm_dir,
                                      file_io=self.file_io, cipher=cipher)

    def compact_to_snapshot(self, snapshot: Snapshot) -> list[str]:
        """Make ``snapshot`` (durable, saved by :meth:`save_snapshot`) where this data dir
        begins: the WAL restarts in a new segment holding its marker, the entries after it
        and the hard state, and every older segment is deleted
        (:meth:`~trio_raft.storage.wal.WAL.restart_after`); then every snapshot file older
        than it is deleted. Afterwards no file of the data dir holds an entry at or below the
        snapshot's index, nor an older state machine payload. Returns the removed files."""
        meta = snapshot.metadata
        with self._lock:
            removed = self.wal.restart_after(meta)
            self.markers = [m for m in self.markers if m.index >= meta.index]
            removed += snaps.purge_snapshot_files_below(self.snap_dir, self.fsm_dir, meta.index,
                                                        file_io=self.file_io)
        return removed

    def open_fsm_payload(self, index: int) -> tuple[BinaryIO, int, int]:
        """:func:`~trio_raft.storage.fsm_snapshot.open_fsm_snapshot_payload` of the ``.fsm``
        at ``index``, through :attr:`file_io`."""
        return fsm.open_fsm_snapshot_payload(fsm.fsm_snapshot_path(self.fsm_dir, index),
                                             file_io=self.file_io)

    def read_fsm_payload(self, index: int) -> bytes:
        """:func:`~trio_raft.storage.fsm_snapshot.read_fsm_snapshot_payload` of the ``.fsm``
        at ``index``, through :attr:`file_io`."""
        return fsm.read_fsm_snapshot_payload(fsm.fsm_snapshot_path(self.fsm_dir, index),
                                             file_io=self.file_io)

    def write_current_peers(self, index: int, peers: Sequence[PersistedPeer]) -> None:
        """:func:`~trio_raft.storage.peers.write_current_persisted_peers` in this data dir,
        through :attr:`file_io`."""
        write_current_persisted_peers(self.data_dir, index, peers, file_io=self.file_io)

    def purge(self) -> None:
        """Keep the newest snapshot files and WAL segments.

        A failure to delete snapshot files or a WAL segment is only logged (retention can wait);
        a failed fsync of the WAL directory poisons the WAL and raises :class:`WALIOError`.
        """
        with self._lock:
            try:
                snaps.purge_old_snapshot_files(self.snap_dir, self.fsm_dir, self.max_snap_files,
                                               file_io=self.file_io)
            except StorageError as exc:
                log.warning("purging snapshot files failed: %s", exc)
            self.wal.purge(self.max_wal_files)
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
    #: The data dir's cluster id (None: none chosen yet, or an older data dir).
    cluster_id: str | None = None
    #: Whether the state machine was restored from the snapshot at open (False: no snapshot,
    #: a bootstrap, or the restore policy skipped it).
    restored: bool = False

    @property
    def wal(self) -> WAL:
        return self.persistence.wal

    @property
    def conf_state(self) -> ConfState:
        return self.snapshot.metadata.conf_state


def _remove_spools(directory: str, file_io: FileIO) -> None:
    stale = [n for n in listdir_if_exists(directory, file_io=file_io)
             if n.startswith(SPOOL_PREFIX)]
    for name in stale:
        remove_tree(os.path.join(directory, name), file_io=file_io)
    if stale:
        log.info("removed stale snapshot spools in %s: %s", directory, stale)
        fsync_dir(directory, file_io=file_io)


def restore_snapshot_state(state_machine: StateMachine | None, snapshot: Snapshot,
                           fsm_dir: str, *, file_io: FileIO = OS_FILE_IO,
                           cipher: PayloadCipher | None = None) -> int:
    """Restore ``state_machine`` from ``snapshot`` (the ``.fsm`` file its descriptor or token
    names, or its inline payload); returns the effective applied index (the snapshot index).
    A payload the descriptor says is sealed is opened through ``cipher``
    (:class:`~trio_raft.errors.SealedSnapshotKeyError` without one)."""
    meta = snapshot.metadata
    if snapshot.is_empty() or state_machine is None:
        return meta.index
    if not snapshot.data:
        log.warning("snapshot at index %d carries no state machine data", meta.index)
        return meta.index
    ref = descriptor.payload_ref(snapshot.data)
    if ref is not None:
        index, crc = ref
        path = fsm.fsm_snapshot_path(fsm_dir, index)
        sealed_key = descriptor.envelope_of(snapshot.data).sealed_key_id
        sealed = None
        if sealed_key:
            sealed = (require_cipher(cipher, sealed_key, path), meta.index, meta.term)
        fsm.open_and_restore_fsm_snapshot(state_machine, path, crc, file_io=file_io,
                                          sealed=sealed)
    else:
        state_machine.restore(io.BytesIO(snapshot.data))
    return meta.index


def snapshot_members(peers: Sequence[PersistedPeer]) -> tuple[descriptor.SnapshotMember, ...]:
    """The peers as a snapshot descriptor records them."""
    return tuple(descriptor.SnapshotMember(p.node_id, p.id, p.address, p.suffrage)
                 for p in peers)


def _recovered_cluster_id(data_dir: str, snap: Snapshot, file_io: FileIO) -> str | None:
    """The data dir's cluster id; when it has none, the snapshot's (recorded from now on)."""
    cid = load_cluster_id(data_dir, file_io=file_io)
    if cid is not None:
        return cid
    desc = descriptor.descriptor_of(snap.data) if not snap.is_empty() else None
    if desc is not None and desc.cluster_id:
        save_cluster_id(data_dir, desc.cluster_id, file_io=file_io)
        log.info("%s: cluster id %s taken from the snapshot at index %d", data_dir,
                 desc.cluster_id, snap.metadata.index)
        return desc.cluster_id
    return None


def boot_conf_state(peers: Sequence[PersistedPeer]) -> ConfState:
    voters = sorted(p.node_id for p in peers if p.suffrage != LEARNER)
    learners = sorted(p.node_id for p in peers if p.suffrage == LEARNER)
    return ConfState(voters=voters, learners=learners)


def _create_wal_atomically(data_dir: str, metadata: bytes, segment_size: int,
                           snapshot: Snapshot | None, hs: HardState | None,
                           file_io: FileIO) -> WAL:
    """Build the WAL in ``wal.tmp`` and rename it to ``wal``: a crash or a disk error at any
    step leaves no ``wal`` (the next open starts over) or a complete one."""
    final = os.path.join(data_dir, WAL_DIR)
    tmp = final + ".tmp"
    remove_tree(tmp, file_io=file_io)
    if lexists(final, file_io=file_io):  # an empty or segment-less leftover directory
        remove_tree(final, file_io=file_io)
    with WAL.create(tmp, metadata, segment_size=segment_size, file_io=file_io) as wal:
        if snapshot is not None:
            wal.save_snapshot(snapshot.metadata, hs)
    rename(tmp, final, file_io=file_io)
    fsync_dir(data_dir, file_io=file_io)
    return WAL.open(final, segment_size=segment_size, file_io=file_io)


def open_disk_state(data_dir: str | os.PathLike[str], peers: Sequence[PersistedPeer],
                    bootstrap: bool, state_machine: StateMachine | None, *, join: bool = False,
                    wal_metadata: bytes = b"", segment_size: int = SEGMENT_SIZE,
                    max_wal_files: int = MAX_WAL_FILES,
                    max_snap_files: int = snaps.MAX_SNAP_FILES,
                    file_io: FileIO = OS_FILE_IO,
                    restore_policy: RestorePolicy | None = None,
                    cipher: PayloadCipher | None = None,
                    before_restore: Callable[[Snapshot], None] | None = None) -> DiskState:
    """Open (or initialise) ``data_dir`` following the recovery order of the module docstring.

    ``peers`` are the configured peers (used only for a fresh data dir; ``join`` forces the join
    layout even for a single peer); ``state_machine`` is
    restored from the recovered snapshot (restart) or snapshotted into the boot state
    (bootstrap) unless ``restore_policy`` says its store holds the snapshot already. Raises the
    storage errors of the layers below (WALCorruptError,
    WALUnrepairableError, WALSnapshotNotFoundError, FSMSnapshot*Error, SnapshotFileError
    (also when no .snap file matches any WAL-valid snapshot marker), PeersFileError),
    StorageIOError / WALIOError for a disk failure (nothing half-made is accepted by the next
    open) and NoPeersConfiguredError for a fresh dir without peers.

    At a restart, ``before_restore`` is called with the recovered snapshot before the restore
    decision (the engine installs the keys its descriptor carries); a sealed payload is opened
    through ``cipher``.
    """
    data_dir = os.fspath(data_dir)
    snap_dir = os.path.join(data_dir, SNAP_DIR)
    fsm_dir = os.path.join(data_dir, FSM_DIR)
    wal_dir = os.path.join(data_dir, WAL_DIR)
    for d in (data_dir, snap_dir, fsm_dir):
        make_dirs(d, file_io=file_io)
    _remove_spools(data_dir, file_io)
    _remove_spools(fsm_dir, file_io)
    snapshotter = snaps.Snapshotter(snap_dir, file_io=file_io)
    snapshotter.remove_tmp_files()
    snaps.cleanup_stale_fsm_files(snap_dir, fsm_dir, file_io=file_io)
    persisted = load_persisted_peers(data_dir, file_io=file_io)

    def persistence(wal: WAL, markers: list[SnapshotMetadata]) -> DiskPersistence:
        return DiskPersistence(data_dir, wal, snapshotter, max_wal_files, max_snap_files,
                               markers)

    if wal_exists(wal_dir, file_io=file_io):
        wal = WAL.open(wal_dir, segment_size=segment_size, file_io=file_io)
        try:
            valid = wal.valid_snapshot_entries()
            loaded = snapshotter.load_newest_available(valid)
            if loaded is None and valid:
                wanted = ", ".join(f"term {m.term} index {m.index}" for m in valid)
                raise SnapshotFileError(
                    f"no usable .snap file in {snap_dir} for the WAL's snapshots ({wanted})")
            snap = loaded or EMPTY_SNAPSHOT
            contents = wal.read_all(snap.metadata.index, snap.metadata.term)
            cluster_id = _recovered_cluster_id(data_dir, snap, file_io)
            if before_restore is not None and not snap.is_empty():
                before_restore(snap)
            last_index = (contents.entries[-1].index if contents.entries
                          else snap.metadata.index)
            skip = restore_policy is not None and restore_policy.skip_restore(
                snap, last_index, cluster_id)
            applied = snap.metadata.index
            restored = False
            if not skip:
                applied = restore_snapshot_state(state_machine, snap, fsm_dir, file_io=file_io,
                                                 cipher=cipher)
                restored = state_machine is not None and not snap.is_empty()
        except BaseException:
            wal.close()
            raise
        storage = MemoryStorage()
        if not snap.is_empty():
            storage.apply_snapshot(snap)
        storage.set_hard_state(contents.hard_state)
        storage.append(list(contents.entries))
        log.info("recovered %s: snapshot index %d term %d (%s), %d entries after it, %s",
                 data_dir, snap.metadata.index, snap.metadata.term,
                 "restored" if restored else "not restored", len(contents.entries),
                 contents.hard_state)
        return DiskState(RecoveryKind.RESTART, data_dir, persistence(wal, list(valid)), storage,
                         contents.hard_state, snap, contents.entries, applied, persisted,
                         contents.metadata, cluster_id, restored)

    if not peers:
        raise NoPeersConfiguredError()
    remove_tree(cluster_id_path(data_dir), file_io=file_io)  # left by a failed bootstrap
    storage = MemoryStorage()
    if (len(peers) == 1 or bootstrap) and not join:
        if state_machine is None:
            raise ValueError("bootstrapping a data dir needs a state machine")
        handle = state_machine.snapshot()
        try:
            crc = fsm.write_fsm_snapshot_file(handle, fsm_dir, 1, file_io=file_io)
        finally:
            handle.close()
        voters = [p for p in peers if p.suffrage != LEARNER]
        cluster_id = new_cluster_id() if len(voters) == 1 else None
        data = descriptor.encode_descriptor(descriptor.SnapshotDescriptor(
            fsm.encode_snapshot_token(1, crc), cluster_id or "", snapshot_members(peers)))
        snap = Snapshot(SnapshotMetadata(boot_conf_state(peers), 1, 1), data)
        hs = HardState(term=1, commit=1)
        snapshotter.save(snap)
        if cluster_id is not None:
            save_cluster_id(data_dir, cluster_id, file_io=file_io)
        wal = _create_wal_atomically(data_dir, wal_metadata, segment_size, snap, hs, file_io)
        try:
            save_persisted_peers(data_dir, 1, peers, seed=peers, file_io=file_io)
            written = load_persisted_peers(data_dir, file_io=file_io)
        except BaseException:
            wal.close()
            raise
        storage.apply_snapshot(snap)
        storage.set_hard_state(hs)
        log.info("bootstrapped %s with %d peer(s)%s", data_dir, len(peers),
                 f", cluster id {cluster_id}" if cluster_id else "")
        return DiskState(RecoveryKind.BOOTSTRAP, data_dir,
                         persistence(wal, [snap.metadata]), storage, hs, snap, (), 1,
                         written, wal_metadata, cluster_id)

    wal = _create_wal_atomically(data_dir, wal_metadata, segment_size, None, None, file_io)
    log.info("initialised %s to join an existing cluster", data_dir)
    return DiskState(RecoveryKind.JOIN, data_dir, persistence(wal, []), storage,
                     HardState(), EMPTY_SNAPSHOT, (), 0, persisted, wal_metadata)
