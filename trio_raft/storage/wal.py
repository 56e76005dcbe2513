"""The write-ahead log: segment files of CRC-framed records (framing in :mod:`.wal_records`).

Theory of operation
-------------------
* The WAL directory holds segments named ``%016x-%016x.wal``: a sequence number (0, 1, 2, ...,
  contiguous) and the index of the first entry expected in the segment (the last entry index
  written so far, plus one, when the segment was cut). Only the newest segment is written to.
  A leader overwriting a conflicting suffix shortens the log, so a later segment can carry a
  lower index than an earlier one. Either way, whatever the log holds at or above a segment's
  index was written in that segment or a later one, which is all that reading from a snapshot
  and releasing old segments rely on.
* :meth:`WAL.save` appends entry records then one state record in a single ``write`` and fsyncs
  when there were entries or the term or vote changed; a commit-only change is written but not
  fsynced (raft can recompute the commit index). :meth:`WAL.save_snapshot` appends a snapshot
  marker (optionally with a hard state, in the same write) and always fsyncs.
* Once the newest segment reaches ``segment_size`` bytes the WAL *cuts*: it fsyncs the segment,
  writes the next one under a temporary name (segment header, metadata, current hard state),
  fsyncs it, renames it into place and fsyncs the directory. A segment therefore always appears
  complete, and only the newest one can end in a torn write.
* :meth:`WAL.open` repairs a torn tail of the newest segment (truncate + fsync, logged at WARNING)
  and then appends there. :meth:`WAL.read_all` replays from the segment that holds the snapshot
  and returns the hard state and the entries after the snapshot; an entry whose index is already
  held replaces it and everything after it (a leader overwrote a conflicting suffix).
* :meth:`WAL.release_to` marks the segments wholly before the snapshot's segment as no longer
  needed; :meth:`WAL.purge` deletes the oldest of those while keeping the newest ``keep`` files.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
from collections.abc import Iterator, Sequence

import attrs

from trio_raft.core.encoding import (
    Reader,
    encode_snapshot_metadata,
    entry_from_bytes,
    entry_to_bytes,
    hard_state_from_bytes,
    hard_state_to_bytes,
    read_snapshot_metadata,
)
from trio_raft.core.errors import DecodeError
from trio_raft.core.messages import EMPTY_HARD_STATE, Entry, HardState, SnapshotMetadata
from trio_raft.errors import (
    WALError,
    WALLockedError,
    WALSnapshotNotFoundError,
    WALUnrepairableError,
)
from trio_raft.storage import wal_records as rec
from trio_raft.storage.fileutil import DIR_MODE, FILE_MODE, datasync, fsync_dir, write_all

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

#: Default segment size: the WAL cuts a new segment once the current one reaches this many bytes.
SEGMENT_SIZE = 64 << 20
#: Default number of segment files :meth:`WAL.purge` keeps.
MAX_WAL_FILES = 5

_NAME = re.compile(r"^([0-9a-f]{16})-([0-9a-f]{16})\.wal$")
_LOCK_NAME = "LOCK"


def segment_name(seq: int, index: int) -> str:
    return f"{seq:016x}-{index:016x}.wal"


def parse_segment_name(name: str) -> tuple[int, int] | None:
    m = _NAME.match(name)
    return (int(m.group(1), 16), int(m.group(2), 16)) if m else None


def wal_exists(dirpath: str | os.PathLike[str]) -> bool:
    """True when ``dirpath`` holds at least one WAL segment."""
    try:
        return any(parse_segment_name(n) for n in os.listdir(dirpath))
    except FileNotFoundError:
        return False


@attrs.frozen(slots=True)
class Segment:
    seq: int
    index: int
    path: str


@attrs.frozen(slots=True)
class WALContents:
    """What :meth:`WAL.read_all` found after the snapshot it was asked about."""

    metadata: bytes
    hard_state: HardState
    entries: tuple[Entry, ...]


def _list_segments(dirpath: str) -> list[Segment]:
    segs: list[Segment] = []
    for name in sorted(os.listdir(dirpath)):
        parsed = parse_segment_name(name)
        if parsed is None:
            if name != _LOCK_NAME and not name.endswith(".wal.tmp"):
                log.warning("ignoring unexpected file %s in WAL directory", name)
            continue
        segs.append(Segment(parsed[0], parsed[1], os.path.join(dirpath, name)))
    for prev, cur in itertools.pairwise(segs):
        if cur.seq != prev.seq + 1:
            raise rec.corrupt(cur.path, 0, f"segment sequence gap after {prev.path}")
    return segs


def _lock_dir(dirpath: str) -> int:
    fd = os.open(os.path.join(dirpath, _LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                 FILE_MODE)
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise WALLockedError(dirpath) from None
    return fd


def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class WAL:
    """An open write-ahead log. Blocking I/O; not thread-safe (callers serialise access)."""

    def __init__(self, dirpath: str, segments: list[Segment], *, metadata: bytes,
                 hard_state: HardState, last_index: int, size: int, lock_fd: int,
                 segment_size: int) -> None:
        self.dir = dirpath
        self._segments = segments
        self.metadata = metadata
        self._hard_state = hard_state
        self._last_index = last_index
        self._size = size
        self._lock_fd = lock_fd
        self.segment_size = segment_size
        self._released_below = segments[0].seq
        self._fd: int | None = os.open(segments[-1].path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self._failed: BaseException | None = None

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def create(cls, dirpath: str | os.PathLike[str], metadata: bytes = b"", *,
               segment_size: int = SEGMENT_SIZE) -> WAL:
        """Create a new WAL with one empty segment ``0000000000000000-0000000000000000.wal``."""
        dirpath = os.fspath(dirpath)
        if wal_exists(dirpath):
            raise WALError(f"wal: {dirpath} already holds a WAL")
        if not os.path.isdir(dirpath):
            parent = os.path.dirname(os.path.abspath(dirpath))
            os.makedirs(parent, DIR_MODE, exist_ok=True)
            os.mkdir(dirpath, DIR_MODE)
            fsync_dir(parent)
        lock_fd = _lock_dir(dirpath)
        try:
            seg = Segment(0, 0, os.path.join(dirpath, segment_name(0, 0)))
            size = _write_new_segment(seg, metadata, EMPTY_HARD_STATE)
            return cls(dirpath, [seg], metadata=metadata, hard_state=EMPTY_HARD_STATE,
                       last_index=0, size=size, lock_fd=lock_fd, segment_size=segment_size)
        except BaseException:
            os.close(lock_fd)
            raise

    @classmethod
    def open(cls, dirpath: str | os.PathLike[str], *, segment_size: int = SEGMENT_SIZE) -> WAL:
        """Open an existing WAL for appending, repairing a torn tail of the newest segment."""
        dirpath = os.fspath(dirpath)
        lock_fd = _lock_dir(dirpath)
        try:
            for name in os.listdir(dirpath):
                if name.endswith(".wal.tmp"):
                    log.info("removing unfinished WAL segment %s", name)
                    os.unlink(os.path.join(dirpath, name))
            segs = _list_segments(dirpath)
            if not segs:
                raise WALError(f"wal: no segments in {dirpath}")
            last = segs[-1]
            data = _read_file(last.path)
            result = rec.scan(last.path, data, is_last=True)
            if result.torn_at is not None:
                _repair(last.path, result, len(data))
            metadata, hs, last_index = _summarise_last(last, result.records)
            size = result.torn_at if result.torn_at is not None else len(data)
            return cls(dirpath, segs, metadata=metadata, hard_state=hs, last_index=last_index,
                       size=size, lock_fd=lock_fd, segment_size=segment_size)
        except BaseException:
            os.close(lock_fd)
            raise

    # -- properties -----------------------------------------------------------------------
    @property
    def hard_state(self) -> HardState:
        """The last hard state written (durable or not)."""
        return self._hard_state

    @property
    def last_index(self) -> int:
        return self._last_index

    @property
    def segments(self) -> list[Segment]:
        return list(self._segments)

    # -- writes ---------------------------------------------------------------------------
    def save(self, hard_state: HardState | None, entries: Sequence[Entry] = (), *,
             sync: bool = False) -> bool:
        """Append ``entries`` and then ``hard_state`` (when it changed) in one write.

        fsyncs when there are entries, when the term or vote changed, or when ``sync`` is true.
        Returns whether it fsynced. Saving nothing new is a no-op.
        """
        self._check_usable()
        buf = bytearray()
        for ent in entries:
            rec.frame(rec.RecordType.ENTRY, entry_to_bytes(ent), buf)
        prev = self._hard_state
        new_state = hard_state is not None and not hard_state.is_empty() and hard_state != prev
        if new_state:
            assert hard_state is not None
            rec.frame(rec.RecordType.STATE, hard_state_to_bytes(hard_state), buf)
        if not buf:
            return False
        must_sync = bool(entries) or sync or (
            new_state and hard_state is not None
            and (hard_state.term != prev.term or hard_state.vote != prev.vote))
        self._append(buf, must_sync)
        if entries:
            self._last_index = entries[-1].index
        if new_state:
            assert hard_state is not None
            self._hard_state = hard_state
        self._maybe_cut()
        return must_sync

    def save_snapshot(self, metadata: SnapshotMetadata, hard_state: HardState | None = None
                      ) -> None:
        """Append a snapshot marker (and ``hard_state`` if it changed, in the same write); fsync.

        A marker counts as valid (:meth:`valid_snapshot_entries`) only once a hard state with a
        commit index at or above it is written; passing that hard state here makes the pair
        atomic.
        """
        self._check_usable()
        payload = bytearray()
        encode_snapshot_metadata(metadata, payload)
        buf = bytearray()
        rec.frame(rec.RecordType.SNAPSHOT, payload, buf)
        new_state = (hard_state is not None and not hard_state.is_empty()
                     and hard_state != self._hard_state)
        if new_state:
            assert hard_state is not None
            rec.frame(rec.RecordType.STATE, hard_state_to_bytes(hard_state), buf)
        self._append(buf, True)
        self._last_index = max(self._last_index, metadata.index)
        if new_state:
            assert hard_state is not None
            self._hard_state = hard_state
        self._maybe_cut()

    def sync(self) -> None:
        self._check_usable()
        assert self._fd is not None
        datasync(self._fd)

    def _check_usable(self) -> None:
        if self._failed is not None:
            raise WALError(f"wal: {self.dir} failed earlier: {self._failed}") from self._failed
        if self._fd is None:
            raise WALError(f"wal: {self.dir} is closed")

    def _append(self, buf: bytearray, must_sync: bool) -> None:
        assert self._fd is not None
        try:
            write_all(self._fd, buf)
            if must_sync:
                datasync(self._fd)
        except OSError as exc:
            self._failed = exc
            raise WALError(f"wal: write to {self._segments[-1].path} failed: {exc}") from exc
        self._size += len(buf)

    def _maybe_cut(self) -> None:
        if self._size < self.segment_size:
            return
        assert self._fd is not None
        try:
            datasync(self._fd)
            last = self._segments[-1]
            seg = Segment(last.seq + 1, self._last_index + 1,
                          os.path.join(self.dir, segment_name(last.seq + 1, self._last_index + 1)))
            size = _write_new_segment(seg, self.metadata, self._hard_state)
            new_fd = os.open(seg.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        except OSError as exc:
            self._failed = exc
            raise WALError(f"wal: cutting a new segment in {self.dir} failed: {exc}") from exc
        os.close(self._fd)
        self._fd = new_fd
        self._segments.append(seg)
        self._size = size
        log.debug("wal: cut segment %s", seg.path)

    # -- retention --------------------------------------------------------------------------
    def release_to(self, index: int) -> None:
        """Mark segments before the one that holds ``index`` as not needed for recovery."""
        keep_from = self._segments[0].seq
        for seg in self._segments:
            if seg.index <= index:
                keep_from = seg.seq
        self._released_below = max(self._released_below, keep_from)

    def purge(self, keep: int = MAX_WAL_FILES) -> list[str]:
        """Delete released segments, oldest first, keeping at least the newest ``keep`` files."""
        keep = max(1, keep)
        victims: list[Segment] = []
        for seg in self._segments[: max(0, len(self._segments) - keep)]:
            if seg.seq >= self._released_below:
                break
            victims.append(seg)
        removed: list[str] = []
        for seg in victims:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(seg.path)
            removed.append(seg.path)
            self._segments.pop(0)
        if removed:
            fsync_dir(self.dir)
            log.info("wal: purged %d segment(s): %s", len(removed), removed)
        return removed

    # -- reads ----------------------------------------------------------------------------
    def _records(self, start: int) -> Iterator[tuple[Segment, rec.RawRecord]]:
        """Every record from segment position ``start`` on, segment headers checked."""
        segs = _list_segments(self.dir)
        segs = [s for s in segs if s.seq >= self._segments[start].seq]
        for i, seg in enumerate(segs):
            is_last = i == len(segs) - 1
            data = _read_file(seg.path)
            result = rec.scan(seg.path, data, is_last=is_last)
            if result.torn_at is not None:
                raise rec.corrupt(seg.path, result.torn_at, result.torn_reason)
            _check_preamble(seg, result.records)
            for r in result.records[1:]:
                yield seg, r

    def read_all(self, snapshot_index: int = 0, snapshot_term: int = 0) -> WALContents:
        """Hard state and entries after the snapshot ``(snapshot_index, snapshot_term)``.

        Raises :class:`WALSnapshotNotFoundError` when ``snapshot_index > 0`` and the WAL holds
        no marker for that snapshot, or was purged past it.
        """
        # Entries after the snapshot live in the segment holding its index and later ones; a
        # first segment cut right after the snapshot index (named index + 1) is enough too.
        start = 0 if self._segments[0].index <= snapshot_index + 1 else None
        for i, seg in enumerate(self._segments):
            if seg.index <= snapshot_index:
                start = i
        if start is None:
            raise WALSnapshotNotFoundError(
                f"WAL in {self.dir} begins at index {self._segments[0].index}, after snapshot "
                f"index {snapshot_index}")
        metadata = b""
        hs = EMPTY_HARD_STATE
        ents: list[Entry] = []
        matched = snapshot_index == 0
        for seg, r in self._records(start):
            try:
                if r.type == rec.RecordType.ENTRY:
                    ent = entry_from_bytes(r.payload)
                    if ent.index <= snapshot_index:
                        continue
                    pos = ent.index - snapshot_index - 1
                    if pos > len(ents):
                        have = snapshot_index + len(ents)
                        raise rec.corrupt(seg.path, r.offset,
                                          f"entry index {ent.index} leaves a gap after {have}")
                    del ents[pos:]
                    ents.append(ent)
                elif r.type == rec.RecordType.STATE:
                    hs = hard_state_from_bytes(r.payload)
                elif r.type == rec.RecordType.METADATA:
                    metadata = bytes(r.payload)
                elif r.type == rec.RecordType.SNAPSHOT:
                    meta = _decode_marker(r.payload)
                    if meta.index == snapshot_index and snapshot_index:
                        if meta.term != snapshot_term:
                            raise WALSnapshotNotFoundError(
                                f"{seg.path} offset {r.offset}: snapshot marker at index "
                                f"{meta.index} has term {meta.term}, want {snapshot_term}")
                        matched = True
                else:
                    raise rec.corrupt(seg.path, r.offset, f"unexpected {r.type.name} record")
            except (DecodeError, ValueError) as exc:
                raise rec.corrupt(seg.path, r.offset,
                                  f"impossible {r.type.name} record: {exc}") from None
        if not matched:
            raise WALSnapshotNotFoundError(
                f"no marker for snapshot index {snapshot_index} term {snapshot_term} in {self.dir}")
        return WALContents(metadata, hs, tuple(ents))

    def valid_snapshot_entries(self) -> list[SnapshotMetadata]:
        """Snapshot markers at or below the commit index of the last hard state, oldest first."""
        markers: list[SnapshotMetadata] = []
        hs = EMPTY_HARD_STATE
        for seg, r in self._records(0):
            try:
                if r.type == rec.RecordType.SNAPSHOT:
                    markers.append(_decode_marker(r.payload))
                elif r.type == rec.RecordType.STATE:
                    hs = hard_state_from_bytes(r.payload)
                elif r.type == rec.RecordType.SEGMENT:
                    raise rec.corrupt(seg.path, r.offset, "segment header in mid-segment")
            except (DecodeError, ValueError) as exc:
                raise rec.corrupt(seg.path, r.offset,
                                  f"impossible {r.type.name} record: {exc}") from None
        return [m for m in markers if m.index <= hs.commit]

    def close(self) -> None:
        """Fsync and close. Idempotent."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                if self._failed is None:
                    datasync(fd)
            finally:
                os.close(fd)
                os.close(self._lock_fd)

    def __enter__(self) -> WAL:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- helpers ----------------------------------------------------------------------------------


def _decode_marker(payload: memoryview) -> SnapshotMetadata:
    r = Reader(payload)
    meta = read_snapshot_metadata(r)
    r.done("snapshot marker")
    return meta


def _write_new_segment(seg: Segment, metadata: bytes, hs: HardState) -> int:
    """Write a complete segment preamble under a temporary name and rename it into place."""
    buf = bytearray()
    rec.frame(rec.RecordType.SEGMENT, rec.segment_header_payload(seg.seq, seg.index), buf)
    rec.frame(rec.RecordType.METADATA, metadata, buf)
    if not hs.is_empty():
        rec.frame(rec.RecordType.STATE, hard_state_to_bytes(hs), buf)
    tmp = seg.path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
    try:
        try:
            write_all(fd, buf)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, seg.path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(os.path.dirname(seg.path))
    return len(buf)


def _check_preamble(seg: Segment, records: list[rec.RawRecord]) -> None:
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


def _repair(path: str, result: rec.ScanResult, size: int) -> None:
    """Truncate a torn tail at ``result.torn_at`` and fsync; log what was dropped."""
    assert result.torn_at is not None
    kinds = [r.type for r in result.records[:2]]
    if kinds != [rec.RecordType.SEGMENT, rec.RecordType.METADATA]:
        raise WALUnrepairableError(
            f"wal unrepairable: {path}: torn at offset {result.torn_at} inside the segment "
            f"preamble ({result.torn_reason})")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, result.torn_at)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise WALUnrepairableError(f"wal unrepairable: truncating {path}: {exc}") from exc
    log.warning("wal: repaired torn tail of %s: %s at offset %d; dropped %d byte(s)",
                path, result.torn_reason, result.torn_at, size - result.torn_at)


def _summarise_last(seg: Segment, records: list[rec.RawRecord]) -> tuple[bytes, HardState, int]:
    """Metadata, last hard state and last index written, from the newest segment's records."""
    _check_preamble(seg, records)
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
                last_index = max(last_index, _decode_marker(r.payload).index)
        except (DecodeError, ValueError) as exc:
            raise rec.corrupt(seg.path, r.offset,
                              f"impossible {r.type.name} record: {exc}") from None
    return metadata, hs, last_index
