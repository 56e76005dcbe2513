"""Durable storage: WAL, snapshot metadata files, ``.fsm`` payload files, the peers file and
crash recovery. Everything here is synchronous, blocking file I/O; the engine calls it through
``trio.to_thread``. The on-disk layout and the failure rules are documented in
``docs/storage.md``.

Every disk access goes through one :class:`~trio_raft.storage.fileio.FileIO` (the seam), passed
as ``file_io=`` and defaulting to the real one, :data:`~trio_raft.storage.fileio.OS_FILE_IO`.

Modules: :mod:`.fileio` (the seam), :mod:`.fileutil` and :mod:`.streams` (helpers over it),
:mod:`.wal` (+ :mod:`.wal_records`, :mod:`.wal_segments`), :mod:`.snapshots`,
:mod:`.fsm_snapshot`, :mod:`.descriptor` (what a snapshot's data holds), :mod:`.cluster_id`,
:mod:`.peers`, :mod:`.recovery`, :mod:`.migrate`, :mod:`.backup` (backup files, export from a
stopped data dir), :mod:`.restore` (restore from a backup, recovery from a lost quorum),
:mod:`.memory`.
"""

from trio_raft.storage.backup import (
    BackupInfo,
    export_data_dir,
    read_backup_info,
    verify_backup,
)
from trio_raft.storage.fileio import OS_FILE_IO, FileIO, OSFileIO
from trio_raft.storage.memory import MemoryStorage, Storage
from trio_raft.storage.peers import PeersFile, PersistedPeer
from trio_raft.storage.recovery import DiskPersistence, DiskState, RecoveryKind, open_disk_state
from trio_raft.storage.restore import RecoveryInfo, recover_cluster, restore_backup
from trio_raft.storage.wal import WAL, WALContents

__all__ = [
    "OS_FILE_IO",
    "WAL",
    "BackupInfo",
    "DiskPersistence",
    "DiskState",
    "FileIO",
    "MemoryStorage",
    "OSFileIO",
    "PeersFile",
    "PersistedPeer",
    "RecoveryInfo",
    "RecoveryKind",
    "Storage",
    "WALContents",
    "export_data_dir",
    "open_disk_state",
    "read_backup_info",
    "recover_cluster",
    "restore_backup",
    "verify_backup",
]
