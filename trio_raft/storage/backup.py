"""Backup files: one checksummed file holding a state machine snapshot and what it needs to
start a cluster from it (docs/formats.md, backups; docs/operations.md, backup and restore).

Layout (integers big-endian)::

    b"TRBK" | version u8 = 1 | flags u8 = 0 | reserved u16 = 0 | header length u32 | header
        | payload | payload length u64 | CRC32C u32
    header := index u64 | term u64 | record count u16 | record*     (records as in
              trio_raft/storage/descriptor.py: CLUSTER_ID, MEMBERS, and with the envelope on
              KEY_RING, CUTOVER_INDEX, SEALED_PAYLOAD; same critical-flag rule)

The CRC32C covers every byte before it. ``payload`` is exactly what the state machine's
``Snapshot.write_to`` wrote (the bytes its ``restore`` reads); its length trails it, so a backup
is written in one pass while the state machine streams.

* :func:`write_backup` writes one from a state machine snapshot handle (``Engine.export_snapshot``
  uses it): temporary file in the destination's directory, fsync, rename, directory fsync; on
  any failure the temporary file is removed and nothing is left under the final name.
* :func:`export_data_dir` writes one from the newest usable snapshot of a *stopped* node's data
  dir (it takes the WAL directory lock, so it refuses while the node runs: WALLockedError),
  checking the ``.fsm`` payload's CRC as it copies.
* :func:`read_backup_info` checks the framing and decodes the header; :func:`verify_backup`
  also checks the CRC over the whole file, and, for a sealed payload when given the cipher,
  every chunk's tag. Every framing defect is :class:`~trio_raft.errors.BackupFileError`; a
  sealed payload that does not open is a :class:`~trio_raft.errors.SealedSnapshotError`.

Sealed backups: with the envelope on, the payload is a sealed stream for the backup's index
and term (``trio_raft/storage/sealing.py``) and the header carries the KEK-sealed key ring and
the cutover, so the backup reveals nothing without the cluster's KEK and a restore with the KEK
has every key it needs.

Every file access goes through the :class:`~trio_raft.storage.fileio.FileIO` given as
``file_io`` (the real one by default).
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO, cast

import attrs
import crc32c as _crc32c

from trio_raft.core.messages import ConfState, Snapshot
from trio_raft.errors import (
    BackupFileError,
    FSMSnapshotFileCRCError,
    FSMSnapshotTokenCRCError,
    SnapshotDescriptorError,
    SnapshotFileError,
)
from trio_raft.storage import descriptor as desc
from trio_raft.storage import fsm_snapshot as fsm
from trio_raft.storage.cluster_id import load_cluster_id
from trio_raft.storage.fileio import OS_FILE_IO, FileIO
from trio_raft.storage.fileutil import (
    close_quietly,
    commit_temp_file,
    create_temp_file,
    discard_temp_file,
    io_errors,
    make_dirs,
    pread_exact,
)
from trio_raft.storage.peers import load_persisted_peers
from trio_raft.storage.recovery import FSM_DIR, SNAP_DIR, WAL_DIR
from trio_raft.storage.sealing import PayloadCipher, drain
from trio_raft.storage.snapshots import Snapshotter
from trio_raft.storage.streams import FDReader, FDWriter
from trio_raft.storage.wal import WAL

BACKUP_MAGIC = b"TRBK"
BACKUP_VERSION = 1
#: Largest header accepted (records: cluster id, members).
MAX_HEADER_BYTES = 4 << 20
_PREFIX = struct.Struct(">4sBBHI")
_INDEX_TERM = struct.Struct(">QQ")
_TRAILER = struct.Struct(">QI")  # payload length, CRC32C
_CRC = struct.Struct(">I")
_U64 = struct.Struct(">Q")


@attrs.frozen
class BackupInfo:
    """What a backup holds, besides the payload."""

    index: int
    term: int
    cluster_id: str = ""
    members: tuple[desc.SnapshotMember, ...] = ()
    payload_bytes: int = 0
    file_bytes: int = 0
    #: The envelope records (sealed payload, key ring, cutover); none for a cleartext backup.
    envelope: desc.EnvelopeState = desc.NO_ENVELOPE

    @property
    def sealed(self) -> bool:
        return bool(self.envelope.sealed_key_id)

    @property
    def conf_state(self) -> ConfState:
        return ConfState(
            voters=sorted(m.node_id for m in self.members if m.suffrage != desc.LEARNER),
            learners=sorted(m.node_id for m in self.members if m.suffrage == desc.LEARNER))


def encode_header(info: BackupInfo) -> bytes:
    if info.index <= 0 or info.term <= 0:
        raise ValueError("a backup needs a positive index and term")
    return _INDEX_TERM.pack(info.index, info.term) + desc.encode_records(
        desc.describe_records(info.cluster_id, info.members, envelope=info.envelope))


def _prefix(header: bytes) -> bytes:
    if len(header) > MAX_HEADER_BYTES:
        raise ValueError(f"backup header of {len(header)} bytes is too large")
    return _PREFIX.pack(BACKUP_MAGIC, BACKUP_VERSION, 0, 0, len(header))


def write_backup(path: str | os.PathLike[str], info: BackupInfo, snapshot: fsm.FSMSnapshot,
                 *, file_io: FileIO = OS_FILE_IO, seal: PayloadCipher | None = None
                 ) -> BackupInfo:
    """Write a backup of ``snapshot`` (a state machine snapshot handle, not closed here) at
    ``info``'s index and term to ``path``, atomically; returns ``info`` with the sizes.
    ``seal``: the payload is sealed through it (``info.envelope`` must then name the active
    key as the sealed key id)."""
    if seal is not None and info.envelope.sealed_key_id != seal.active_key_id:
        raise ValueError("a sealed backup's header must name the key its payload is sealed "
                         "under")
    path = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(path)
    head = encode_header(info)
    make_dirs(directory, file_io=file_io)
    fd, tmp = create_temp_file(directory, os.path.basename(path) + ".tmp-", file_io=file_io)
    try:
        writer = FDWriter(file_io, fd, tmp, fsm.BUFFER_SIZE, checksum=True)
        writer.write(_prefix(head) + head)
        start = writer.count
        if seal is None:
            snapshot.write_to(cast(BinaryIO, writer))
        else:
            sealer = seal.seal_payload(writer, info.index, info.term)
            snapshot.write_to(cast(BinaryIO, sealer))
            sealer.finish()
        payload = writer.count - start
        writer.write(_U64.pack(payload))
        writer.finish()
        total = writer.count + _CRC.size
    except BaseException:
        close_quietly(fd, tmp, file_io=file_io)
        discard_temp_file(tmp, file_io=file_io)
        raise
    # the CRC footer, fsync, rename over ``path``, directory fsync (or nothing left on error)
    commit_temp_file(fd, tmp, path, _CRC.pack(writer.crc), file_io=file_io)
    return attrs.evolve(info, payload_bytes=payload, file_bytes=total)


# -- reading ----------------------------------------------------------------------------------


@contextmanager
def _opened(path: str, file_io: FileIO) -> Iterator[tuple[int, int]]:
    with io_errors("open", path):
        fd = file_io.open(path, os.O_RDONLY)
    try:
        with io_errors("stat", path):
            size = file_io.fstat(fd).st_size
        yield fd, size
    finally:
        close_quietly(fd, path, file_io=file_io)


def _read_info(fd: int, size: int, path: str, file_io: FileIO) -> tuple[BackupInfo, int]:
    """The header of an open backup and the offset of its payload (checks the framing)."""
    try:
        with io_errors("read", path):
            raw = pread_exact(fd, _PREFIX.size, 0, file_io=file_io)
        magic, version, flags, reserved, hlen = _PREFIX.unpack(raw)
        if magic != BACKUP_MAGIC:
            raise BackupFileError(f"{path}: not a backup file (bad magic {magic!r})")
        if version != BACKUP_VERSION or flags or reserved:
            raise BackupFileError(f"{path}: unsupported backup version {version} "
                                  f"(flags {flags:#x})")
        if hlen < _INDEX_TERM.size or hlen > MAX_HEADER_BYTES:
            raise BackupFileError(f"{path}: impossible header length {hlen}")
        start = _PREFIX.size + hlen
        if size < start + _TRAILER.size:
            raise BackupFileError(f"{path}: truncated ({size} bytes)")
        with io_errors("read", path):
            header = pread_exact(fd, hlen, _PREFIX.size, file_io=file_io)
            trailer = pread_exact(fd, _TRAILER.size, size - _TRAILER.size, file_io=file_io)
    except EOFError:
        raise BackupFileError(f"{path}: truncated") from None
    payload, _crc = _TRAILER.unpack(trailer)
    if start + payload + _TRAILER.size != size:
        raise BackupFileError(f"{path}: the payload length {payload} does not match the file "
                              f"size {size} (truncated or damaged)")
    index, term = _INDEX_TERM.unpack_from(header)
    try:
        records, pos = desc.decode_records(header, _INDEX_TERM.size, len(header), "backup")
        if pos != len(header):
            raise SnapshotDescriptorError(f"backup: {len(header) - pos} trailing header bytes")
        known, cluster_id, members, _extra = desc.interpret_records(records, "backup")
        envelope = desc.EnvelopeState.from_records(known, "backup")
    except SnapshotDescriptorError as exc:
        raise BackupFileError(f"{path}: {exc}") from None
    if index <= 0 or term <= 0:
        raise BackupFileError(f"{path}: index {index} term {term}")
    return BackupInfo(index, term, cluster_id, members, payload, size, envelope), start


def read_backup_info(path: str | os.PathLike[str], *,
                     file_io: FileIO = OS_FILE_IO) -> BackupInfo:
    """The header of the backup at ``path`` (the framing is checked, the CRC is not)."""
    path = os.fspath(path)
    with _opened(path, file_io) as (fd, size):
        return _read_info(fd, size, path, file_io)[0]


def verify_backup(path: str | os.PathLike[str], *, file_io: FileIO = OS_FILE_IO,
                  cipher: PayloadCipher | None = None) -> BackupInfo:
    """:func:`read_backup_info`, then a CRC32C pass over the whole file; for a sealed backup
    and a ``cipher``, then every chunk of the payload opened (SealedSnapshotError naming the
    file when one does not verify or its key is missing)."""
    path = os.fspath(path)
    with _opened(path, file_io) as (fd, size):
        info, _start = _read_info(fd, size, path, file_io)
        raw = FDReader(file_io, fd, path, size - _CRC.size, checksum=True, owns=False)
        try:
            with io.BufferedReader(raw, fsm.BUFFER_SIZE) as reader:
                while reader.read(fsm.BUFFER_SIZE):
                    pass
            with io_errors("read", path):
                (crc,) = _CRC.unpack(pread_exact(fd, _CRC.size, size - _CRC.size,
                                                 file_io=file_io))
        except EOFError:
            raise BackupFileError(f"{path}: truncated while reading") from None
    if raw.crc != crc:
        raise BackupFileError(f"{path}: CRC32C mismatch (computed {raw.crc:#010x}, "
                              f"stored {crc:#010x}): the file is damaged")
    if info.sealed and cipher is not None:
        open_sealed_payload(path, info, cipher, drain, file_io=file_io)
    return info


def open_sealed_payload(path: str, info: BackupInfo, cipher: PayloadCipher,
                        use: Callable[[BinaryIO], object], *,
                        file_io: FileIO = OS_FILE_IO) -> None:
    """Call ``use`` with a plaintext reader over a sealed backup's payload."""
    with _opened(path, file_io) as (fd, size):
        _info, start = _read_info(fd, size, path, file_io)
        # The sealed reader reads whole chunks into its own buffer: no buffering under it.
        with _RangeReader(file_io, fd, path, start, info.payload_bytes) as raw, \
                cipher.open_payload(raw, info.payload_bytes, info.index, info.term,
                                    path) as plain:
            use(plain)


class _RangeReader(io.RawIOBase):
    """A raw reader over ``length`` bytes of ``fd`` from ``offset`` (pread: no seeking)."""

    def __init__(self, file_io: FileIO, fd: int, path: str, offset: int, length: int) -> None:
        super().__init__()
        self._io, self._fd, self._path = file_io, fd, path
        self._pos, self._end = offset, offset + length

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = min(len(view), self._end - self._pos)
        if n <= 0:
            return 0
        try:
            with io_errors("read", self._path):
                data = pread_exact(self._fd, n, self._pos, file_io=self._io)
        except EOFError:
            raise BackupFileError(f"{self._path}: truncated while reading") from None
        view[:n] = data
        self._pos += n
        return n


class BackupPayload:
    """The payload of a verified backup as a state machine snapshot handle (``write_to``
    streams it), for writing it into a data dir (:mod:`trio_raft.storage.restore`)."""

    def __init__(self, path: str, file_io: FileIO = OS_FILE_IO) -> None:
        self.path = path
        self._io = file_io

    def write_to(self, writer: BinaryIO) -> int:
        with _opened(self.path, self._io) as (fd, size):
            info, start = _read_info(fd, size, self.path, self._io)
            return _copy_range(self._io, fd, self.path, start, info.payload_bytes, writer)

    def close(self) -> None:
        pass


def _copy_range(file_io: FileIO, fd: int, path: str, offset: int, length: int,
                writer: BinaryIO) -> int:
    done = 0
    while done < length:
        n = min(fsm.BUFFER_SIZE, length - done)
        try:
            with io_errors("read", path):
                chunk = pread_exact(fd, n, offset + done, file_io=file_io)
        except EOFError:
            raise BackupFileError(f"{path}: truncated while reading") from None
        writer.write(chunk)
        done += n
    return done


# -- from a stopped node's data dir -------------------------------------------------------------


class _FSMPayload:
    """The ``.fsm`` payload a token names, streamed and checked against its footer and the
    token's CRC (FSMSnapshotFileCRCError before the last bytes count as written)."""

    def __init__(self, path: str, crc: int, file_io: FileIO) -> None:
        self._path, self._crc, self._io = path, crc, file_io

    def write_to(self, writer: BinaryIO) -> int:
        reader, size, footer = fsm.open_fsm_snapshot_payload(self._path, file_io=self._io)
        try:
            if footer != self._crc:
                raise FSMSnapshotTokenCRCError(
                    f"{self._path}: footer {footer:#010x}, token {self._crc:#010x}")
            crc = done = 0
            while chunk := reader.read(fsm.BUFFER_SIZE):
                crc = _crc32c.crc32c(chunk, crc)
                writer.write(chunk)
                done += len(chunk)
            if done != size or crc != footer:
                raise FSMSnapshotFileCRCError(
                    f"{self._path}: computed {crc:#010x}, footer {footer:#010x}")
            return done
        finally:
            reader.close()

    def close(self) -> None:
        pass


@attrs.frozen
class _InlinePayload:
    data: bytes

    def write_to(self, writer: BinaryIO) -> int:
        writer.write(self.data)
        return len(self.data)

    def close(self) -> None:
        pass


def export_data_dir(data_dir: str | os.PathLike[str], path: str | os.PathLike[str], *,
                    file_io: FileIO = OS_FILE_IO) -> BackupInfo:
    """Write a backup of the newest usable snapshot of a stopped node's ``data_dir``.

    Opens the WAL (which takes its directory lock: WALLockedError while the node runs; a torn
    tail is repaired as the node's next start would) to find the snapshots it vouches for.
    Raises SnapshotFileError when there is none, the ``FSMSnapshot*Error`` of a damaged payload.
    """
    data_dir = os.fspath(data_dir)
    with WAL.open(os.path.join(data_dir, WAL_DIR), file_io=file_io) as wal:
        valid = wal.valid_snapshot_entries()
        snap = Snapshotter(os.path.join(data_dir, SNAP_DIR),
                           file_io=file_io).load_newest_available(valid)
        if snap is None:
            raise SnapshotFileError(f"{data_dir}: no usable snapshot to export")
        info = _info_for(data_dir, snap, file_io)
        ref = desc.payload_ref(snap.data)
        payload: fsm.FSMSnapshot
        if ref is None:
            payload = _InlinePayload(snap.data)
        else:
            index, crc = ref
            payload = _FSMPayload(fsm.fsm_snapshot_path(os.path.join(data_dir, FSM_DIR), index),
                                  crc, file_io)
        return write_backup(path, info, payload, file_io=file_io)


def _info_for(data_dir: str, snap: Snapshot, file_io: FileIO) -> BackupInfo:
    meta = snap.metadata
    d = desc.descriptor_of(snap.data)
    cluster_id = load_cluster_id(data_dir, file_io=file_io) or (d.cluster_id if d else "")
    members: tuple[desc.SnapshotMember, ...] = d.members if d is not None else ()
    if not members:  # an older snapshot: the addresses from the peers file
        pf = load_persisted_peers(data_dir, file_io=file_io)
        known = {p.node_id: p for p in pf.peers} if pf is not None else {}
        cs = meta.conf_state
        members = tuple(
            desc.SnapshotMember(nid, known[nid].id if nid in known else str(nid),
                                known[nid].address if nid in known else "", suffrage)
            for suffrage, ids in ((desc.VOTER, cs.voters), (desc.LEARNER, cs.learners))
            for nid in ids)
    return BackupInfo(meta.index, meta.term, cluster_id, members,
                      envelope=d.envelope if d is not None else desc.NO_ENVELOPE)
