"""Seed a raft data directory from an existing state-machine store (spec i).

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
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import BinaryIO, Protocol

import attrs

from trio_raft.core.messages import ConfState, HardState, Snapshot, SnapshotMetadata
from trio_raft.errors import MigrationDestinationExistsError, StorageError
from trio_raft.storage import fsm_snapshot as fsm
from trio_raft.storage.fileutil import fsync_dir
from trio_raft.storage.peers import LEARNER, PersistedPeer, save_persisted_peers
from trio_raft.storage.recovery import SNAP_DIR, WAL_DIR
from trio_raft.storage.snapshots import Snapshotter
from trio_raft.storage.wal import WAL

log = logging.getLogger(__name__)

PAYLOAD_FILE_NAME = "fsm-snapshot.bin"
MIGRATING_SUFFIX = ".migrating"
#: Largest payload migrated (it is stored inline in the ``.snap`` file and the boot snapshot).
MAX_MIGRATION_PAYLOAD = 1 << 30


@attrs.frozen(slots=True)
class MigrationStats:
    snapshot_bytes: int
    peers: int


class FSMStore(Protocol):
    def snapshot(self) -> fsm.FSMSnapshot: ...

    def close(self) -> None: ...


class _FileSnapshot:
    def __init__(self, path: str) -> None:
        self._path = path

    def write_to(self, writer: BinaryIO) -> int:
        with open(self._path, "rb") as f:
            n = 0
            while chunk := f.read(fsm.BUFFER_SIZE):
                writer.write(chunk)
                n += len(chunk)
        return n

    def close(self) -> None:
        pass


@attrs.define
class PayloadStore:
    """A source store that is a raw payload file."""

    path: str

    def snapshot(self) -> fsm.FSMSnapshot:
        return _FileSnapshot(self.path)

    def close(self) -> None:
        pass


def open_payload_store(store_path: str) -> FSMStore:
    """Default opener: ``store_path`` is a directory with ``fsm-snapshot.bin`` or that file."""
    path = store_path
    if os.path.isdir(path):
        path = os.path.join(path, PAYLOAD_FILE_NAME)
    if not os.path.isfile(path):
        raise StorageError(f"migration: no state machine payload at {path}")
    return PayloadStore(path)


# -- rename without replace -------------------------------------------------------------------

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1  # Linux renameat2 flag
_RENAME_EXCL = 0x4  # Darwin renamex_np flag
_libc: ctypes.CDLL | None = None


def _get_libc() -> ctypes.CDLL | None:
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        try:
            _libc = ctypes.CDLL(name, use_errno=True)
        except OSError:
            return None
    return _libc


def _native_rename_noreplace(src: str, dst: str) -> bool:
    """Try the kernel's no-replace rename; False when the platform cannot do it."""
    libc = _get_libc()
    if libc is None:
        return False
    bsrc, bdst = os.fsencode(src), os.fsencode(dst)
    if sys.platform.startswith("linux"):
        func = getattr(libc, "renameat2", None)
        if func is None:
            return False
        func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                         ctypes.c_uint]
        rc = func(_AT_FDCWD, bsrc, _AT_FDCWD, bdst, _RENAME_NOREPLACE)
    elif sys.platform == "darwin":
        func = getattr(libc, "renamex_np", None)
        if func is None:
            return False
        func.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
        rc = func(bsrc, bdst, _RENAME_EXCL)
    else:
        return False
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False  # kernel or file system without support: use the checked fallback
    if err == errno.EEXIST:
        raise MigrationDestinationExistsError(dst)
    raise OSError(err, os.strerror(err), src, None, dst)


def rename_noreplace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Rename ``src`` to ``dst``, failing with MigrationDestinationExistsError if ``dst``
    exists. Atomic where the kernel offers it (Linux ``renameat2(RENAME_NOREPLACE)``, Darwin
    ``renamex_np(RENAME_EXCL)``); elsewhere an ``lstat`` check then ``rename``."""
    src, dst = os.fspath(src), os.fspath(dst)
    if _native_rename_noreplace(src, dst):
        return
    _fallback_rename_noreplace(src, dst)


def _fallback_rename_noreplace(src: str, dst: str) -> None:
    try:
        os.lstat(dst)
    except FileNotFoundError:
        os.rename(src, dst)
        return
    raise MigrationDestinationExistsError(dst)


# -- migration --------------------------------------------------------------------------------


def _read_store_snapshot(store: FSMStore, spool_dir: str) -> bytes:
    handle = store.snapshot()
    try:
        with tempfile.TemporaryFile(prefix="trio-raft-migrate-", dir=spool_dir) as spool:
            handle.write_to(spool)
            size = spool.tell()
            if size > MAX_MIGRATION_PAYLOAD:
                raise StorageError(f"migration: snapshot of {size} bytes exceeds "
                                   f"{MAX_MIGRATION_PAYLOAD}")
            spool.seek(0)
            return spool.read()
    finally:
        handle.close()


def migrate_fsm_store(store_path: str | os.PathLike[str], dest_data_dir: str | os.PathLike[str],
                      peers: Sequence[PersistedPeer], *,
                      open_store: Callable[[str], FSMStore] = open_payload_store
                      ) -> MigrationStats:
    """Build a fresh raft data dir at ``dest_data_dir`` whose boot state holds the store's
    whole snapshot inline. ``dest_data_dir`` and ``<dest>.migrating`` must not exist."""
    store_path, dest = os.fspath(store_path), os.fspath(dest_data_dir)
    if not store_path:
        raise ValueError("migration: store path is required")
    if not dest:
        raise ValueError("migration: destination data dir is required")
    if not peers:
        raise ValueError("migration: at least one peer is required")
    dest = os.path.abspath(dest)
    tmp = dest + MIGRATING_SUFFIX
    if os.path.lexists(dest):
        raise MigrationDestinationExistsError(dest)
    if os.path.lexists(tmp):
        raise StorageError(f"migration: {tmp} already exists: remove it to retry")
    store = open_store(store_path)
    try:
        spool_dir = store_path if os.path.isdir(store_path) else os.path.dirname(
            os.path.abspath(store_path))
        payload = _read_store_snapshot(store, spool_dir)
    finally:
        store.close()
    parent = os.path.dirname(dest)
    os.makedirs(parent, exist_ok=True)
    try:
        os.mkdir(tmp, 0o755)
        cs = ConfState(voters=[p.node_id for p in peers if p.suffrage != LEARNER],
                       learners=sorted(p.node_id for p in peers if p.suffrage == LEARNER))
        snap = Snapshot(SnapshotMetadata(cs, 1, 1), payload)
        Snapshotter(os.path.join(tmp, SNAP_DIR)).save(snap)
        os.mkdir(os.path.join(tmp, "fsm-snap"), 0o755)
        with WAL.create(os.path.join(tmp, WAL_DIR)) as wal:
            wal.save_snapshot(snap.metadata, HardState(term=1, commit=1))
        save_persisted_peers(tmp, 1, peers)
        fsync_dir(tmp)
        rename_noreplace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        fsync_dir(parent)
    except OSError:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    log.info("migrated %s into %s: %d payload bytes, %d peer(s)", store_path, dest,
             len(payload), len(peers))
    return MigrationStats(snapshot_bytes=len(payload), peers=len(peers))
