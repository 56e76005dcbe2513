"""WAL segment files: naming, listing, locking, writing a new one, repairing a torn tail.

Helpers of :mod:`trio_raft.storage.wal` (which owns the rules; see its docstring) that deal with
whole segment files rather than with the open log. Every file access goes through the
:class:`~trio_raft.storage.fileio.FileIO` passed in. Invariants kept here:

* a segment appears under its final name only complete (preamble written and fsynced under
  ``<name>.wal.tmp``, renamed, directory fsynced), so only the newest one can end torn;
* segment sequence numbers are contiguous (a gap is :class:`~trio_raft.errors.WALCorruptError`);
* a torn tail is repaired only after its preamble (SEGMENT, METADATA) is intact.

File-helper failures (:class:`~trio_raft.errors.StorageIOError`) are re-raised as
:class:`~trio_raft.errors.WALIOError` by :func:`wal_errors`, keeping the :class:`OSError` as
``__cause__``.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
from collections.abc import Iterator

import attrs

from trio_raft.core.encoding import (
    Reader,
    hard_state_from_bytes,
    hard_state_to_bytes,
    read_snapshot_metadata,
)
from trio_raft.core.errors import DecodeError
from trio_raft.core.messages import EMPTY_HARD_STATE, HardState, SnapshotMetadata
from trio_raft.errors import (
    StorageIOError,
    WALError,
    WALIOError,
    WALLockedError,
    WALUnrepairableError,
)
from trio_raft.storage import wal_records as rec
from trio_raft.storage.fileio import FILE_MODE, FileIO
from trio_raft.storage.fileutil import (
    close_quietly,
    commit_temp_file,
    fsync_dir,
    io_errors,
    listdir_if_exists,
    unlink_if_exists,
)

# The WAL's own logger: repairs and cleanups are the WAL's story to operators.
log = logging.getLogger("trio_raft.storage.wal")

_NAME = re.compile(r"^([0-9a-f]{16})-([0-9a-f]{16})\.wal$")
LOCK_NAME = "LOCK"
TMP_SUFFIX = ".wal.tmp"


def segment_name(seq: int, index: int) -> str:
    return f"{seq:016x}-{index:016x}.wal"


def parse_segment_name(name: str) -> tuple[int, int] | None:
    m = _NAME.match(name)
    return (int(m.group(1), 16), int(m.group(2), 16)) if m else None


@attrs.frozen(slots=True)
class Segment:
    seq: int
    index: int
    path: str


def to_wal_error(exc: StorageIOError, context: str) -> WALIOError:
    err = WALIOError(f"{context}: {exc}")
    err.op, err.path, err.errno = exc.op, exc.path, exc.errno
    return err


@contextlib.contextmanager
def wal_errors(context: str) -> Iterator[None]:
    """Re-raise a :class:`StorageIOError` of the helpers below as a :class:`WALIOError` (with
    the same :class:`OSError` as ``__cause__``)."""
    try:
        yield
    except WALError:
        raise
    except StorageIOError as exc:
        raise to_wal_error(exc, context) from exc.__cause__


def list_segments(dirpath: str, file_io: FileIO) -> list[Segment]:
    segs: list[Segment] = []
    with io_errors("listdir", dirpath):
        names = file_io.listdir(dirpath)
    for name in sorted(names):
        parsed = parse_segment_name(name)
        if parsed is None:
            if name != LOCK_NAME and not name.endswith(TMP_SUFFIX):
                log.warning("ignoring unexpected file %s in WAL directory", name)
            continue
        segs.append(Segment(parsed[0], parsed[1], os.path.join(dirpath, name)))
    for prev, cur in itertools.pairwise(segs):
        if cur.seq != prev.seq + 1:
            raise rec.corrupt(cur.path, 0, f"segment sequence gap after {prev.path}")
    return segs


def lock_dir(dirpath: str, file_io: FileIO) -> int:
    path = os.path.join(dirpath, LOCK_NAME)
    with io_errors("open", path):
        fd = file_io.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
    try:
        file_io.flock(fd)
    except BlockingIOError:
        close_quietly(fd, path, file_io=file_io)
        raise WALLockedError(dirpath) from None
    except OSError as exc:
        close_quietly(fd, path, file_io=file_io)
        raise StorageIOError.from_os_error("flock", path, exc) from exc
    return fd


def open_for_append(path: str, file_io: FileIO) -> int:
    with io_errors("open", path):
        return file_io.open(path, os.O_WRONLY | os.O_APPEND)


def decode_marker(payload: memoryview) -> SnapshotMetadata:
    r = Reader(payload)
    meta = read_snapshot_metadata(r)
    r.done("snapshot marker")
    return meta


def write_new_segment(seg: Segment, metadata: bytes, hs: HardState, file_io: FileIO) -> int:
    """Write a complete segment preamble under a temporary name and rename it into place."""
    buf = bytearray()
    rec.frame(rec.RecordType.SEGMENT, rec.segment_header_payload(seg.seq, seg.index), buf)
    rec.frame(rec.RecordType.METADATA, metadata, buf)
    if not hs.is_empty():
        rec.frame(rec.RecordType.STATE, hard_state_to_bytes(hs), buf)
    tmp = seg.path + TMP_SUFFIX
    with io_errors("create", tmp):
        fd = file_io.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    commit_temp_file(fd, tmp, seg.path, buf, file_io=file_io)
    return len(buf)


def remove_unfinished_segments(dirpath: str, file_io: FileIO) -> None:
    """Delete ``*.wal.tmp`` files (a cut or a create that did not finish)."""
    stale = [n for n in listdir_if_exists(dirpath, file_io=file_io) if n.endswith(TMP_SUFFIX)]
    for name in stale:
        log.info("removing unfinished WAL segment %s", name)
        unlink_if_exists(os.path.join(dirpath, name), file_io=file_io)
    if stale:
        fsync_dir(dirpath, file_io=file_io)


def check_preamble(seg: Segment, records: list[rec.RawRecord]) -> None:
    if not records or records[0].type != rec.RecordType.SEGMENT:
        raise rec.corrupt(seg.path, 0, "segment does not start with a segment header")
    try:
        seq, index = rec.parse_segment_header(records[0].payload)
    except ValueError as exc:
        raise rec.corrupt(seg.path, 0, str(exc)) from None
    if (seq, index) != (seg.seq, seg.index):
        raise rec.corrupt(seg.path, 0, f"segment header says seq {seq} index {index}, "
                                       "which does not match the file name")
    for r in records[1:]:
        if r.type == rec.RecordType.SEGMENT:
            raise rec.corrupt(seg.path, r.offset, "segment header in mid-segment")


def repair(path: str, result: rec.ScanResult, size: int, file_io: FileIO) -> None:
    """Truncate a torn tail at ``result.torn_at`` and fsync; log what was dropped."""
    assert result.torn_at is not None
    kinds = [r.type for r in result.records[:2]]
    if kinds != [rec.RecordType.SEGMENT, rec.RecordType.METADATA]:
        raise WALUnrepairableError(
            f"wal unrepairable: {path}: torn at offset {result.torn_at} inside the segment "
            f"preamble ({result.torn_reason})")
    op = "open"
    try:
        fd = file_io.open(path, os.O_WRONLY)
        try:
            op = "ftruncate"
            file_io.ftruncate(fd, result.torn_at)
            op = "fsync"
            file_io.fsync(fd)
        except BaseException:
            close_quietly(fd, path, file_io=file_io)
            raise
        op = "close"
        file_io.close(fd)
    except OSError as exc:
        raise WALUnrepairableError(
            f"wal unrepairable: {op} {path} failed while truncating a torn tail: {exc}"
        ) from exc
    log.warning("wal: repaired torn tail of %s: %s at offset %d; dropped %d byte(s)",
                path, result.torn_reason, result.torn_at, size - result.torn_at)


def summarise_last(seg: Segment, records: list[rec.RawRecord]) -> tuple[bytes, HardState, int]:
    """Metadata, last hard state and last index written, from the newest segment's records."""
    check_preamble(seg, records)
    metadata = b""
    hs = EMPTY_HARD_STATE
    last_index = max(seg.index - 1, 0)
    for r in records[1:]:
        try:
            if r.type == rec.RecordType.ENTRY:
                last_index = rec.entry_index(r.payload)
            elif r.type == rec.RecordType.STATE:
                hs = hard_state_from_bytes(r.payload)
            elif r.type == rec.RecordType.METADATA:
                metadata = bytes(r.payload)
            elif r.type == rec.RecordType.SNAPSHOT:
                last_index = max(last_index, decode_marker(r.payload).index)
        except (DecodeError, ValueError) as exc:
            raise rec.corrupt(seg.path, r.offset,
                              f"impossible {r.type.name} record: {exc}") from None
    return metadata, hs, last_index
