"""Seed a raft data directory from an existing state-machine store (docs/storage.md section 7).

The *source store* is anything that can produce a state-machine snapshot: an object with
``snapshot() -> FSMSnapshot`` (``write_to(writer) -> int``, ``close()``) and ``close()``, opened
from ``store_path`` by the ``open_store`` callable. The default opener,
:func:`open_payload_store`, treats ``store_path`` as a directory holding the raw payload in
``fsm-snapshot.bin`` (or as that payload file itself), which is what a state machine's
``Snapshot.write_to`` produces.

:func:`migrate_fsm_store` reads the whole snapshot through a spool file in the store directory,
builds ``<dest>.migrating/`` (WAL with the boot state: hard state term 1 commit 1, snapshot index
1 term 1 whose conf state lists the peers' node ids *in the given order* and whose data is the
payload *inline*; the ``.snap`` file; a peers file at index 1) and renames it to ``dest`` without
replacing anything. On the first open the inline payload is restored as usual; the first local
snapshot later turns it into a ``.fsm`` token.

Every file access (the source payload, the spool, the new data dir) goes through the
:class:`~trio_raft.storage.fileio.FileIO` passed as ``file_io`` (the real one by default); a
disk failure is a :class:`~trio_raft.errors.StorageIOError` and leaves no ``<dest>``.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable, Sequence
from typing import BinaryIO, Protocol, cast

import attrs

from trio_raft.core.messages import ConfState, HardState, Snapshot, SnapshotMetadata
from trio_raft.errors import MigrationDestinationExistsError, StorageError, StorageIOError
from trio_raft.storage import descriptor
from trio_raft.storage import fsm_snapshot as fsm
from trio_raft.storage.fileio import DIR_MODE, OS_FILE_IO, FileIO
from trio_raft.storage.fileutil import (
    close_quietly,
    create_temp_file,
    fsync_dir,
    io_errors,
    is_dir,
    lexists,
    make_dirs,
    pread_exact,
    remove_tree,
)
from trio_raft.storage.peers import LEARNER, PersistedPeer, save_persisted_peers
from trio_raft.storage.recovery import FSM_DIR, SNAP_DIR, WAL_DIR
from trio_raft.storage.snapshots import Snapshotter
from trio_raft.storage.streams import FDWriter
from trio_raft.storage.wal import WAL

log = logging.getLogger(__name__)

PAYLOAD_FILE_NAME = "fsm-snapshot.bin"
MIGRATING_SUFFIX = ".migrating"
#: Largest payload migrated (it is stored inline in the ``.snap`` file and the boot snapshot).
MAX_MIGRATION_PAYLOAD = 1 << 30
_SPOOL_PREFIX = "trio-raft-migrate-"


@attrs.frozen(slots=True)
class MigrationStats:
    snapshot_bytes: int
    peers: int


class FSMStore(Protocol):
    def snapshot(self) -> fsm.FSMSnapshot: ...

    def close(self) -> None: ...


@attrs.frozen
class _FileSnapshot:
    path: str
    file_io: FileIO

    def write_to(self, writer: BinaryIO) -> int:
        with io_errors("open", self.path):
            fd = self.file_io.open(self.path, os.O_RDONLY)
        try:
            view = memoryview(bytearray(fsm.BUFFER_SIZE))
            n = 0
            while True:
                with io_errors("read", self.path):
                    got = self.file_io.readinto(fd, view)
                if not got:
                    return n
                writer.write(view[:got])
                n += got
        finally:
            close_quietly(fd, self.path, file_io=self.file_io)

    def close(self) -> None:
        pass


@attrs.define
class PayloadStore:
    """A source store that is a raw payload file, read through ``file_io``."""

    path: str
    file_io: FileIO = attrs.field(default=OS_FILE_IO, kw_only=True)

    def snapshot(self) -> fsm.FSMSnapshot:
        return _FileSnapshot(self.path, self.file_io)

    def close(self) -> None:
        pass


def open_payload_store(store_path: str, *, file_io: FileIO = OS_FILE_IO) -> FSMStore:
    """Default opener: ``store_path`` is a directory with ``fsm-snapshot.bin`` or that file."""
    path = store_path
    if is_dir(path, file_io=file_io):
        path = os.path.join(path, PAYLOAD_FILE_NAME)
    try:
        regular = stat.S_ISREG(file_io.stat(path).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        regular = False
    except OSError as exc:
        raise StorageIOError.from_os_error("stat", path, exc) from exc
    if not regular:
        raise StorageError(f"migration: no state machine payload at {path}")
    return PayloadStore(path, file_io=file_io)


def rename_noreplace(src: str | os.PathLike[str], dst: str | os.PathLike[str], *,
                     file_io: FileIO = OS_FILE_IO) -> None:
    """Rename ``src`` to ``dst``, failing with MigrationDestinationExistsError if ``dst``
    exists. Atomic where the kernel offers it (Linux ``renameat2(RENAME_NOREPLACE)``, Darwin
    ``renamex_np(RENAME_EXCL)``); elsewhere an ``lstat`` check then ``rename``."""
    src, dst = os.fspath(src), os.fspath(dst)
    try:
        file_io.rename_noreplace(src, dst)
    except FileExistsError:
        raise MigrationDestinationExistsError(dst) from None
    except OSError as exc:
        raise StorageIOError.from_os_error("rename", f"{src} -> {dst}", exc) from exc


# -- migration --------------------------------------------------------------------------------


def _read_store_snapshot(store: FSMStore, spool_dir: str, file_io: FileIO) -> bytes:
    """Spool the store's snapshot to an unlinked temporary file, check its size, read it."""
    handle = store.snapshot()
    try:
        fd, spool = create_temp_file(spool_dir, _SPOOL_PREFIX, readable=True, file_io=file_io)
        try:
            with io_errors("unlink", spool):
                file_io.unlink(spool)  # anonymous from here on: nothing to clean up
            writer = FDWriter(file_io, fd, spool, fsm.BUFFER_SIZE)
            handle.write_to(cast(BinaryIO, writer))
            writer.finish()
            if writer.count > MAX_MIGRATION_PAYLOAD:
                raise StorageError(f"migration: snapshot of {writer.count} bytes exceeds "
                                   f"{MAX_MIGRATION_PAYLOAD}")
            with io_errors("read", spool):
                return pread_exact(fd, writer.count, 0, file_io=file_io)
        finally:
            close_quietly(fd, spool, file_io=file_io)
    finally:
        handle.close()


def migrate_fsm_store(store_path: str | os.PathLike[str], dest_data_dir: str | os.PathLike[str],
                      peers: Sequence[PersistedPeer], *,
                      open_store: Callable[[str], FSMStore] | None = None,
                      file_io: FileIO = OS_FILE_IO) -> MigrationStats:
    """Build a fresh raft data dir at ``dest_data_dir`` whose boot state holds the store's
    whole snapshot inline. ``dest_data_dir`` and ``<dest>.migrating`` must not exist.

    ``open_store`` defaults to :func:`open_payload_store` (through ``file_io``). On any error
    ``<dest>.migrating`` is removed and ``dest_data_dir`` is not created.
    """
    store_path, dest = os.fspath(store_path), os.fspath(dest_data_dir)
    if not store_path:
        raise ValueError("migration: store path is required")
    if not dest:
        raise ValueError("migration: destination data dir is required")
    if not peers:
        raise ValueError("migration: at least one peer is required")
    dest = os.path.abspath(dest)
    tmp = dest + MIGRATING_SUFFIX
    if lexists(dest, file_io=file_io):
        raise MigrationDestinationExistsError(dest)
    if lexists(tmp, file_io=file_io):
        raise StorageError(f"migration: {tmp} already exists: remove it to retry")
    store = (open_store(store_path) if open_store is not None
             else open_payload_store(store_path, file_io=file_io))
    try:
        spool_dir = store_path if is_dir(store_path, file_io=file_io) else os.path.dirname(
            os.path.abspath(store_path))
        payload = _read_store_snapshot(store, spool_dir, file_io)
    finally:
        store.close()
    if descriptor.is_descriptor(payload):
        raise StorageError("migration: the payload starts with the snapshot descriptor magic "
                           f"{descriptor.DESCRIPTOR_MAGIC!r} and cannot be stored inline")
    parent = os.path.dirname(dest)
    make_dirs(parent, file_io=file_io)
    try:
        with io_errors("mkdir", tmp):
            file_io.mkdir(tmp, DIR_MODE)
        cs = ConfState(voters=[p.node_id for p in peers if p.suffrage != LEARNER],
                       learners=sorted(p.node_id for p in peers if p.suffrage == LEARNER))
        snap = Snapshot(SnapshotMetadata(cs, 1, 1), payload)
        Snapshotter(os.path.join(tmp, SNAP_DIR), file_io=file_io).save(snap)
        make_dirs(os.path.join(tmp, FSM_DIR), file_io=file_io)
        with WAL.create(os.path.join(tmp, WAL_DIR), file_io=file_io) as wal:
            wal.save_snapshot(snap.metadata, HardState(term=1, commit=1))
        save_persisted_peers(tmp, 1, peers, file_io=file_io)
        fsync_dir(tmp, file_io=file_io)
        rename_noreplace(tmp, dest, file_io=file_io)
    except BaseException:
        _remove_quietly(tmp, file_io)
        raise
    try:
        fsync_dir(parent, file_io=file_io)
    except StorageError:
        _remove_quietly(dest, file_io)
        raise
    log.info("migrated %s into %s: %d payload bytes, %d peer(s)", store_path, dest,
             len(payload), len(peers))
    return MigrationStats(snapshot_bytes=len(payload), peers=len(peers))


def _remove_quietly(path: str, file_io: FileIO) -> None:
    try:
        remove_tree(path, file_io=file_io)
    except StorageError as exc:
        log.warning("migration: removing %s after a failure failed too: %s", path, exc)
