"""Storage errors: the WAL, snapshot files, the peers and cluster id files, backups.

Part of :mod:`trio_raft.errors` (which re-exports every name); the hierarchy and the
outcome families are described there and in ``docs/api.md``.
"""

from __future__ import annotations

from typing import Self

from trio_raft.core.errors import (
    RaftError,
)


class StorageError(RaftError):
    """Base of on-disk storage errors. Messages name the file involved."""


class StorageIOError(StorageError):
    """A file operation of the storage layer failed (a write, fsync, rename, create, read, ...).

    The message names the operation and the file; ``__cause__`` is the :class:`OSError`, whose
    ``errno`` is also copied to :attr:`errno`. Nothing the failed operation was writing may be
    assumed durable. Build one with :meth:`from_os_error`.
    """

    #: The operation that failed: "write", "fsync", "fdatasync", "create", "rename", "read", ...
    op: str = ""
    #: The file (or directory) the operation was on.
    path: str = ""
    #: The ``errno`` of the underlying :class:`OSError` (``None`` if it had none).
    errno: int | None = None

    @classmethod
    def from_os_error(cls, op: str, path: str, exc: OSError, context: str = "") -> Self:
        """An error for ``op`` on ``path`` caused by ``exc``; raise it ``from exc``.

        ``context`` (e.g. "wal: cutting a new segment") prefixes the message.
        """
        reason = exc.strerror or str(exc) or type(exc).__name__
        message = f"{op} {path} failed: {reason} (errno {exc.errno})"
        err = cls(f"{context}: {message}" if context else message)
        err.op, err.path, err.errno = op, path, exc.errno
        return err


class WALError(StorageError):
    """Base of the write-ahead log's errors."""


class WALIOError(WALError, StorageIOError):
    """A WAL file operation failed. When it happened while writing, the WAL is poisoned."""


class WALPoisonedError(WALError):
    """The WAL refuses every write after an earlier write, fsync or cut failed.

    ``__cause__`` is the first failure. The only way on is to close the WAL and reopen the
    directory, which repairs a torn tail and shows exactly what reached the disk.
    """


class WALCorruptError(WALError):
    """A WAL record in the middle of a segment fails its CRC or is impossible. Fatal."""


class WALUnrepairableError(WALError):
    """A torn WAL tail could not be repaired."""


class WALSnapshotNotFoundError(WALError):
    """The WAL holds no marker for the snapshot it was opened at, or was purged past it."""
    default_message = "wal: snapshot not found"


class WALLockedError(WALError):
    """Another process holds the WAL directory lock."""
    default_message = "wal: directory is locked by another process"


class SnapshotFileError(StorageError):
    """A snapshot metadata file is corrupt or unreadable."""


class PeersFileError(StorageError):
    """The peers file is corrupt, of an unknown version, or out of limits."""


class SnapshotRequiredError(StorageError):
    default_message = "raft snapshot data is required"


class MigrationDestinationExistsError(StorageError):
    default_message = "migration: destination already exists"


class SnapshotDescriptorError(StorageError):
    """A snapshot descriptor (the ``data`` of a raft snapshot: token, cluster id, members;
    ``docs/storage.md`` section 4a) is damaged, of an unknown version, or holds a critical
    record this version does not understand."""
    default_message = "snapshot descriptor is invalid"


class ClusterIdFileError(StorageError):
    """The cluster id file of a data dir is damaged (bad magic, version, length or CRC)."""
    default_message = "cluster id file is corrupt"


class BackupFileError(StorageError):
    """A backup file (``docs/formats.md``, backups) is damaged, truncated, of an unknown
    version, or not a backup at all. Nothing was restored from it."""
    default_message = "backup file is damaged"


class DataDirNotEmptyError(StorageError):
    """Restoring a backup needs an empty (or absent) data dir; this one holds files."""
    default_message = "data dir is not empty"


class RecoveryError(StorageError):
    """``recover_cluster`` cannot rewrite this data dir as asked (the peers are not members,
    this node is not among them, a joint configuration, nothing to recover). Nothing was
    changed."""
    default_message = "cluster recovery refused"


class FSMSnapshotError(StorageError):
    """Base of the ``.fsm`` payload file errors (``docs/storage.md``, payload files)."""


class FSMSnapshotFileCRCError(FSMSnapshotError):
    default_message = "fsm snapshot: file CRC32C mismatch (file corrupt)"


class FSMSnapshotTokenCRCError(FSMSnapshotError):
    default_message = "fsm snapshot: token CRC32C mismatch (metadata corrupt)"


class FSMSnapshotNotFoundError(FSMSnapshotError):
    default_message = "fsm snapshot: file not found"


class FSMSnapshotTooSmallError(FSMSnapshotError):
    default_message = "fsm snapshot: file too small to contain footer"


class FSMSnapshotTokenInvalidError(FSMSnapshotError):
    default_message = "fsm snapshot: token format invalid"


class FSMSnapshotTooLargeError(FSMSnapshotError):
    default_message = "fsm snapshot: payload exceeds maximum in-memory size limit"


class SealedSnapshotError(FSMSnapshotError):
    """A sealed snapshot payload (``docs/formats.md``, sealed payloads) cannot be opened; the
    message names the file. Never a silent restore: on restore it is fatal."""
    default_message = "sealed snapshot payload cannot be opened"


class SealedSnapshotIntegrityError(SealedSnapshotError):
    """A sealed payload is damaged, truncated, reordered, was sealed for another snapshot, or
    under other key material than the key id it names (a chunk's tag does not verify)."""
    default_message = "sealed snapshot payload: integrity check failed"


class SealedSnapshotKeyError(SealedSnapshotError):
    """A sealed payload names a key id this node does not have, or no raft cipher is wired."""
    default_message = "sealed snapshot payload: key unavailable"


class SealedSnapshotRequiredError(SealedSnapshotError):
    """A cleartext payload arrived for a snapshot above this node's envelope cutover, where
    every payload is sealed; it is refused before any of it is kept."""
    default_message = "snapshot payload above the envelope cutover is not sealed"
