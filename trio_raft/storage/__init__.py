"""Durable storage: WAL, snapshot metadata files, ``.fsm`` payload files, the peers file and
crash recovery. Everything here is synchronous, blocking file I/O; the engine calls it through
``trio.to_thread``. The on-disk layout is documented in ``docs/storage.md``.

Modules: :mod:`.wal` (+ :mod:`.wal_records`), :mod:`.snapshots`, :mod:`.fsm_snapshot`,
:mod:`.peers`, :mod:`.recovery`, :mod:`.migrate`, :mod:`.memory`, :mod:`.fileutil`.
"""

from trio_raft.storage.memory import MemoryStorage, Storage
from trio_raft.storage.peers import PeersFile, PersistedPeer
from trio_raft.storage.recovery import DiskPersistence, DiskState, RecoveryKind, open_disk_state
from trio_raft.storage.wal import WAL, WALContents

__all__ = [
    "WAL",
    "DiskPersistence",
    "DiskState",
    "MemoryStorage",
    "PeersFile",
    "PersistedPeer",
    "RecoveryKind",
    "Storage",
    "WALContents",
    "open_disk_state",
]
