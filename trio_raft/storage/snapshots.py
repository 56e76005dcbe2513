"""Raft snapshot metadata files (``snap/%016x-%016x.snap``, term-index) and their retention.

A ``.snap`` file holds one :class:`~trio_raft.core.messages.Snapshot` (index, term, conf state
and ``data``)::

    b"TRSN" | version u8 | body length u32 BE | CRC32C(body) u32 BE | body
    body := core.encoding snapshot encoding (metadata, u32 data length, data)

Version 2 (written whenever ``data`` is a snapshot descriptor: token, cluster id, members;
:mod:`trio_raft.storage.descriptor`) requires ``data`` to decode as a descriptor. Version 1
(still read; written only for the bare token or inline payload of older data) holds the 17-byte
``.fsm`` token or an inline payload. A version-1 reader refuses a version-2 file instead of
taking its descriptor for an inline payload.

Files are written to a temporary name, fsynced, renamed and the directory fsynced
(:func:`~trio_raft.storage.fileutil.replace_file`: a failed write leaves the previous file as
it was and raises :class:`~trio_raft.errors.StorageIOError`). A ``.snap`` is always written
*before* the WAL marker that refers to it, so a WAL-valid marker normally has its file;
:meth:`Snapshotter.load_newest_available` picks the newest file that matches a valid marker and
loads cleanly, logging (never hiding) every file it passes over.

All file access goes through the :class:`~trio_raft.storage.fileio.FileIO` given to the
:class:`Snapshotter` or to the functions below (the real one by default). Retention
(:func:`purge_old_snapshot_files`, :func:`prepare_fsm_snapshot_write`) only deletes; its
failures are logged by the callers, never hidden from a write.
"""

from __future__ import annotations

import logging
import os
import re
import struct
from collections.abc import Iterable

import attrs
import crc32c as _crc32c

from trio_raft.core.encoding import snapshot_from_bytes, snapshot_to_bytes
from trio_raft.core.errors import DecodeError
from trio_raft.core.messages import Snapshot, SnapshotMetadata
from trio_raft.errors import (
    FSMSnapshotError,
    SnapshotDescriptorError,
    SnapshotFileError,
    StorageIOError,
)
from trio_raft.storage import descriptor
from trio_raft.storage import fsm_snapshot as fsm
from trio_raft.storage.fileio import OS_FILE_IO, FileIO
from trio_raft.storage.fileutil import (
    fsync_dir,
    is_dir,
    listdir_if_exists,
    make_dirs,
    read_file,
    replace_file,
    unlink_if_exists,
)

log = logging.getLogger(__name__)

SNAP_MAGIC = b"TRSN"
#: The version written for a snapshot whose data is a descriptor.
SNAP_VERSION = 2
#: The version written (and read) for a bare token or an inline payload.
SNAP_VERSION_LEGACY = 1
#: Default number of ``.snap`` files kept by :func:`purge_old_snapshot_files`.
MAX_SNAP_FILES = 3
_HEADER = struct.Struct(">4sBII")
_NAME = re.compile(r"^([0-9a-f]{16})-([0-9a-f]{16})\.snap$")
_MAX_BODY = (1 << 30) + (4 << 20)


def snap_name(term: int, index: int) -> str:
    return f"{term:016x}-{index:016x}.snap"


def parse_snap_name(name: str) -> tuple[int, int] | None:
    """(term, index) of a ``.snap`` file name, or None."""
    m = _NAME.match(name)
    return (int(m.group(1), 16), int(m.group(2), 16)) if m else None


def encode_snap_file(snap: Snapshot) -> bytes:
    body = snapshot_to_bytes(snap)
    version = SNAP_VERSION if descriptor.is_descriptor(snap.data) else SNAP_VERSION_LEGACY
    return _HEADER.pack(SNAP_MAGIC, version, len(body), _crc32c.crc32c(body)) + body


def decode_snap_file(data: bytes, path: str = "<snap>") -> Snapshot:
    if len(data) < _HEADER.size:
        raise SnapshotFileError(f"snap file {path}: too short ({len(data)} bytes)")
    magic, version, n, crc = _HEADER.unpack_from(data)
    if magic != SNAP_MAGIC:
        raise SnapshotFileError(f"snap file {path}: bad magic {magic!r}")
    if version not in (SNAP_VERSION_LEGACY, SNAP_VERSION):
        raise SnapshotFileError(f"snap file {path}: unsupported version {version}")
    if n > _MAX_BODY or len(data) != _HEADER.size + n:
        raise SnapshotFileError(
            f"snap file {path}: body length {n} does not match file size {len(data)}")
    body = memoryview(data)[_HEADER.size :]
    if _crc32c.crc32c(body) != crc:
        raise SnapshotFileError(f"snap file {path}: CRC32C mismatch (file corrupt)")
    try:
        snap = snapshot_from_bytes(body)
    except DecodeError as exc:
        raise SnapshotFileError(f"snap file {path}: {exc}") from None
    if version == SNAP_VERSION:
        try:
            descriptor.decode_descriptor(snap.data)
        except SnapshotDescriptorError as exc:
            raise SnapshotFileError(f"snap file {path}: {exc}") from None
    return snap


@attrs.frozen(slots=True)
class SnapFile:
    term: int
    index: int
    path: str


class Snapshotter:
    """The ``snap/`` directory; every file access goes through ``file_io``."""

    def __init__(self, snap_dir: str | os.PathLike[str], *,
                 file_io: FileIO = OS_FILE_IO) -> None:
        self.dir = os.fspath(snap_dir)
        self.file_io = file_io

    def files(self) -> list[SnapFile]:
        """``.snap`` files sorted by (term, index), oldest first; other names are ignored."""
        out: list[SnapFile] = []
        for name in sorted(listdir_if_exists(self.dir, file_io=self.file_io)):
            parsed = parse_snap_name(name)
            if parsed is not None:
                out.append(SnapFile(parsed[0], parsed[1], os.path.join(self.dir, name)))
        return out

    def save(self, snap: Snapshot) -> str:
        """Write ``snap`` durably (temp file, fsync, rename, directory fsync).

        Raises :class:`StorageIOError` when that fails; a previous file of the same name is then
        left as it was.
        """
        if snap.is_empty():
            raise SnapshotFileError("refusing to save an empty snapshot")
        make_dirs(self.dir, file_io=self.file_io)
        path = os.path.join(self.dir, snap_name(snap.metadata.term, snap.metadata.index))
        replace_file(path, encode_snap_file(snap), file_io=self.file_io)
        return path

    def load(self, path: str) -> Snapshot:
        """Load and check one file: CRC, decoding, and that its name matches its contents."""
        try:
            data = read_file(path, file_io=self.file_io)
        except StorageIOError as exc:
            raise SnapshotFileError(f"snap file {path}: {exc}") from exc.__cause__
        snap = decode_snap_file(data, path)
        parsed = parse_snap_name(os.path.basename(path))
        meta = snap.metadata
        if parsed is not None and parsed != (meta.term, meta.index):
            raise SnapshotFileError(
                f"snap file {path}: holds term {meta.term} index {meta.index}, "
                "which does not match its name")
        return snap

    def load_newest_available(self, valid: Iterable[SnapshotMetadata]) -> Snapshot | None:
        """The newest ``.snap`` whose (term, index) is in ``valid`` and that loads cleanly."""
        wanted = {(m.term, m.index) for m in valid}
        for sf in reversed(self.files()):
            if (sf.term, sf.index) not in wanted:
                continue
            try:
                return self.load(sf.path)
            except SnapshotFileError as exc:
                log.error("skipping unusable snapshot file: %s", exc)
        return None

    def remove_tmp_files(self) -> None:
        """Delete ``*.snap.tmp-*`` leftovers of an interrupted :meth:`save`."""
        removed = False
        for name in listdir_if_exists(self.dir, file_io=self.file_io):
            if ".snap.tmp-" in name:
                unlink_if_exists(os.path.join(self.dir, name), file_io=self.file_io)
                removed = True
        if removed:
            fsync_dir(self.dir, file_io=self.file_io)


def _fsm_files(fsm_dir: str, file_io: FileIO) -> dict[int, str]:
    out: dict[int, str] = {}
    for name in listdir_if_exists(fsm_dir, file_io=file_io):
        index = fsm.parse_fsm_snapshot_name(name)
        if index is not None:
            out[index] = os.path.join(fsm_dir, name)
    return out


def purge_old_snapshot_files(snap_dir: str, fsm_dir: str, keep: int = MAX_SNAP_FILES, *,
                             file_io: FileIO = OS_FILE_IO) -> list[str]:
    """Keep the newest ``keep`` ``.snap`` files (by name); delete older ones and their ``.fsm``.

    An ``.fsm`` is kept while a kept ``.snap`` shares its index. Both directories are fsynced.
    Raises :class:`StorageIOError` on the first failure.
    """
    keep = max(1, keep)
    files = Snapshotter(snap_dir, file_io=file_io).files()
    victims, kept = files[:-keep], files[-keep:]
    kept_indexes = {sf.index for sf in kept}
    fsms = _fsm_files(fsm_dir, file_io)
    removed: list[str] = []
    for sf in victims:
        unlink_if_exists(sf.path, file_io=file_io)
        removed.append(sf.path)
        if sf.index not in kept_indexes and sf.index in fsms:
            unlink_if_exists(fsms[sf.index], file_io=file_io)
            removed.append(fsms[sf.index])
    if removed:
        for d in (snap_dir, fsm_dir):
            if is_dir(d, file_io=file_io):
                fsync_dir(d, file_io=file_io)
        log.info("purged old snapshot files: %s", removed)
    return removed


def purge_snapshot_files_below(snap_dir: str, fsm_dir: str, index: int, *,
                               file_io: FileIO = OS_FILE_IO) -> list[str]:
    """Delete every ``.snap`` and ``.fsm`` file below ``index`` (the caller keeps a durable
    snapshot at ``index``); both directories are fsynced. Raises :class:`StorageIOError` on
    the first failure."""
    removed: list[str] = []
    for sf in Snapshotter(snap_dir, file_io=file_io).files():
        if sf.index < index:
            unlink_if_exists(sf.path, file_io=file_io)
            removed.append(sf.path)
    for fsm_index, path in sorted(_fsm_files(fsm_dir, file_io).items()):
        if fsm_index < index:
            unlink_if_exists(path, file_io=file_io)
            removed.append(path)
    if removed:
        for d in (snap_dir, fsm_dir):
            if is_dir(d, file_io=file_io):
                fsync_dir(d, file_io=file_io)
        log.info("purged snapshot files below index %d: %s", index, removed)
    return removed


def cleanup_stale_fsm_files(snap_dir: str, fsm_dir: str, *,
                            file_io: FileIO = OS_FILE_IO) -> list[str]:
    """Delete ``*.fsm.tmp`` files, and ``.fsm`` files with no ``.snap`` at the same index."""
    removed: list[str] = []
    for name in listdir_if_exists(fsm_dir, file_io=file_io):
        if name.endswith(fsm.TMP_SUFFIX):
            unlink_if_exists(os.path.join(fsm_dir, name), file_io=file_io)
            removed.append(name)
    if is_dir(snap_dir, file_io=file_io):
        snap_indexes = {sf.index for sf in Snapshotter(snap_dir, file_io=file_io).files()}
        for index, path in _fsm_files(fsm_dir, file_io).items():
            if index not in snap_indexes:
                unlink_if_exists(path, file_io=file_io)
                removed.append(os.path.basename(path))
    if removed:
        fsync_dir(fsm_dir, file_io=file_io)
        log.info("removed stale fsm snapshot files in %s: %s", fsm_dir, sorted(removed))
    return removed


@attrs.frozen(slots=True)
class _Candidate:
    sf: SnapFile
    restorable: bool
    wal_valid: bool


def _restorable(snapshotter: Snapshotter, sf: SnapFile, fsm_dir: str) -> bool:
    try:
        snap = snapshotter.load(sf.path)
        ref = descriptor.payload_ref(snap.data)
        if ref is None or ref[0] != sf.index:
            return False
        index, crc = ref
        fsm.verify_fsm_snapshot_file(fsm.fsm_snapshot_path(fsm_dir, index), crc,
                                     check_token=True, file_io=snapshotter.file_io)
    except (SnapshotFileError, SnapshotDescriptorError, FSMSnapshotError, StorageIOError,
            EOFError) as exc:
        log.info("snapshot %s is not restorable: %s", sf.path, exc)
        return False
    return True


def prepare_fsm_snapshot_write(snap_dir: str, fsm_dir: str, next_index: int,
                               wal_valid: Iterable[SnapshotMetadata] | None,
                               protected: Iterable[int] = (), *,
                               file_io: FileIO = OS_FILE_IO) -> list[str]:
    """Pre-write retention (docs/storage.md section 3): bound disk use before writing a
    snapshot at ``next_index``.

    ``wal_valid`` are the WAL's valid snapshot markers (None: no WAL, everything counts as
    valid); ``protected`` are ``.fsm`` indexes that must survive (received, not yet installed).
    At least one restorable, WAL-valid snapshot is always kept when one exists. Errors are
    logged as warnings and swallowed; returns the paths removed.
    """
    removed: list[str] = []
    try:
        removed = _prepare(snap_dir, fsm_dir, next_index, wal_valid, set(protected), file_io)
    except StorageIOError as exc:
        log.warning("pre-write snapshot retention in %s failed: %s", snap_dir, exc)
    return removed


def _prepare(snap_dir: str, fsm_dir: str, next_index: int,
             wal_valid: Iterable[SnapshotMetadata] | None, protected: set[int],
             file_io: FileIO) -> list[str]:
    snapshotter = Snapshotter(snap_dir, file_io=file_io)
    valid = None if wal_valid is None else {(m.term, m.index) for m in wal_valid}
    cands = [
        _Candidate(sf, _restorable(snapshotter, sf, fsm_dir),
                   valid is None or (sf.term, sf.index) in valid)
        for sf in snapshotter.files() if 0 < sf.index < next_index
    ]
    cands.sort(key=lambda c: (c.sf.index, c.sf.term))
    keep: list[_Candidate] = []
    if any(c.wal_valid for c in cands):
        both = [c for c in cands if c.wal_valid and c.restorable]
        if both:
            keep = [both[-1]]
        else:
            keep = [next(c for c in reversed(cands) if c.wal_valid)]
            keep += [c for c in cands if c.restorable][-2:]
    else:
        keep = [c for c in cands if c.restorable][-1:]
    if not keep and cands:
        keep = [cands[-1]]
    removed: list[str] = []
    kept_paths = {c.sf.path for c in keep}
    kept_indexes = {c.sf.index for c in keep}
    fsms = _fsm_files(fsm_dir, file_io)
    if len(cands) > 1:
        for c in cands:
            if c.sf.path in kept_paths:
                continue
            unlink_if_exists(c.sf.path, file_io=file_io)
            removed.append(c.sf.path)
            idx = c.sf.index
            if idx not in kept_indexes and idx not in protected and idx in fsms:
                unlink_if_exists(fsms.pop(idx), file_io=file_io)
                removed.append(fsm.fsm_snapshot_path(fsm_dir, idx))
    snap_indexes = {sf.index for sf in snapshotter.files()}
    for idx, path in sorted(fsms.items()):
        if idx < next_index and idx not in snap_indexes and idx not in protected:
            unlink_if_exists(path, file_io=file_io)
            removed.append(path)
    for d in (snap_dir, fsm_dir):
        if is_dir(d, file_io=file_io):
            fsync_dir(d, file_io=file_io)
    if removed:
        log.info("pre-write retention before index %d removed %s", next_index, removed)
    return removed
