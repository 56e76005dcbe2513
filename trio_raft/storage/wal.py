"""The write-ahead log: segment files of CRC-framed records (framing in :mod:`.wal_records`,
segment files in :mod:`.wal_segments`).

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

Failures
--------
All file access goes through the :class:`~trio_raft.storage.fileio.FileIO` the WAL was created
or opened with. A failed write, fsync/fdatasync, segment cut (any step of it) or purge directory
fsync *poisons* the WAL: the call raises :class:`WALIOError` (naming the file and the operation,
``__cause__`` the :class:`OSError`) and every later write, sync or purge raises
:class:`WALPoisonedError`. Nothing is retried, least of all an fsync: after a failed fsync the
kernel may have dropped the dirty pages, so a second fsync that succeeds would prove nothing.
``close`` of a poisoned WAL closes its descriptors without syncing. Whatever the failed call
wrote may or may not be on disk; reopening the directory (which repairs a torn tail) shows what
is, and every record of a call that returned successfully is there.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence

import attrs

from trio_raft.core.encoding import (
    encode_snapshot_metadata,
    entry_from_bytes,
    entry_to_bytes,
    hard_state_from_bytes,
    hard_state_to_bytes,
)
from trio_raft.core.errors import DecodeError
from trio_raft.core.messages import EMPTY_HARD_STATE, Entry, HardState, SnapshotMetadata
from trio_raft.errors import (
    StorageIOError,
    WALError,
    WALIOError,
    WALPoisonedError,
    WALSnapshotNotFoundError,
)
from trio_raft.storage import wal_records as rec
from trio_raft.storage import wal_segments as ws
from trio_raft.storage.fileio import OS_FILE_IO, FileIO
from trio_raft.storage.fileutil import (
    close_quietly,
    fsync_dir,
    io_errors,
    listdir_if_exists,
    make_dirs,
    read_file,
    unlink_if_exists,
    write_all,
)
from trio_raft.storage.wal_segments import Segment, parse_segment_name, segment_name

log = logging.getLogger(__name__)

#: Default segment size: the WAL cuts a new segment once the current one reaches this many bytes.
SEGMENT_SIZE = 64 << 20
#: Default number of segment files :meth:`WAL.purge` keeps.
MAX_WAL_FILES = 5

__all__ = [
    "MAX_WAL_FILES",
    "SEGMENT_SIZE",
    "WAL",
    "Segment",
    "WALContents",
    "parse_segment_name",
    "segment_name",
    "wal_exists",
]


def wal_exists(dirpath: str | os.PathLike[str], *, file_io: FileIO = OS_FILE_IO) -> bool:
    """True when ``dirpath`` holds at least one WAL segment."""
    dirpath = os.fspath(dirpath)
    with ws.wal_errors("wal"):
        names = listdir_if_exists(dirpath, file_io=file_io)
    return any(parse_segment_name(n) for n in names)


@attrs.frozen(slots=True)
class WALContents:
    """What :meth:`WAL.read_all` found after the snapshot it was asked about."""

    metadata: bytes
    hard_state: HardState
    entries: tuple[Entry, ...]


class WAL:
    """An open write-ahead log. Blocking I/O; not thread-safe (callers serialise access).

    Build one with :meth:`create` or :meth:`open`; it keeps the ``file_io`` it was built with
    and does all its file access through it.
    """

    def __init__(self, dirpath: str, segments: list[Segment], *, metadata: bytes,
                 hard_state: HardState, last_index: int, size: int, fd: int, lock_fd: int,
                 segment_size: int, file_io: FileIO) -> None:
        self.dir = dirpath
        self._segments = segments
        self.metadata = metadata
        self._hard_state = hard_state
        self._last_index = last_index
        self._size = size
        self._lock_fd = lock_fd
        self.segment_size = segment_size
        self._io = file_io
        self._released_below = segments[0].seq
        self._fd: int | None = fd
        #: The first write/sync failure; once set, every write raises WALPoisonedError.
        self._failed: WALIOError | None = None

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def create(cls, dirpath: str | os.PathLike[str], metadata: bytes = b"", *,
               segment_size: int = SEGMENT_SIZE, file_io: FileIO = OS_FILE_IO) -> WAL:
        """Create a new WAL with one empty segment ``0000000000000000-0000000000000000.wal``.

        The directory (and missing parents) is created. A failure raises :class:`WALIOError`
        and leaves at most a directory without a complete segment (``wal_exists`` is false).
        """
        dirpath = os.fspath(dirpath)
        if wal_exists(dirpath, file_io=file_io):
            raise WALError(f"wal: {dirpath} already holds a WAL")
        with ws.wal_errors(f"wal: creating {dirpath}"):
            make_dirs(dirpath, file_io=file_io)
            lock_fd = ws.lock_dir(dirpath, file_io)
            try:
                seg = Segment(0, 0, os.path.join(dirpath, segment_name(0, 0)))
                size = ws.write_new_segment(seg, metadata, EMPTY_HARD_STATE, file_io)
                fd = ws.open_for_append(seg.path, file_io)
            except BaseException:
                close_quietly(lock_fd, dirpath, file_io=file_io)
                raise
        return cls(dirpath, [seg], metadata=metadata, hard_state=EMPTY_HARD_STATE,
                   last_index=0, size=size, fd=fd, lock_fd=lock_fd,
                   segment_size=segment_size, file_io=file_io)

    @classmethod
    def open(cls, dirpath: str | os.PathLike[str], *, segment_size: int = SEGMENT_SIZE,
             file_io: FileIO = OS_FILE_IO) -> WAL:
        """Open an existing WAL for appending, repairing a torn tail of the newest segment."""
        dirpath = os.fspath(dirpath)
        with ws.wal_errors(f"wal: opening {dirpath}"):
            lock_fd = ws.lock_dir(dirpath, file_io)
            try:
                ws.remove_unfinished_segments(dirpath, file_io)
                segs = ws.list_segments(dirpath, file_io)
                if not segs:
                    raise WALError(f"wal: no segments in {dirpath}")
                last = segs[-1]
                data = read_file(last.path, file_io=file_io)
                result = rec.scan(last.path, data, is_last=True)
                if result.torn_at is not None:
                    ws.repair(last.path, result, len(data), file_io)
                metadata, hs, last_index = ws.summarise_last(last, result.records)
                size = result.torn_at if result.torn_at is not None else len(data)
                fd = ws.open_for_append(last.path, file_io)
            except BaseException:
                close_quietly(lock_fd, dirpath, file_io=file_io)
                raise
        return cls(dirpath, segs, metadata=metadata, hard_state=hs, last_index=last_index,
                   size=size, fd=fd, lock_fd=lock_fd, segment_size=segment_size,
                   file_io=file_io)

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

    @property
    def file_io(self) -> FileIO:
        """The seam every file access of this WAL goes through."""
        return self._io

    @property
    def failure(self) -> WALIOError | None:
        """The failure that poisoned this WAL, or None while it is usable."""
        return self._failed

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
        """fdatasync the newest segment."""
        fd = self._check_usable()
        try:
            self._io.fdatasync(fd)
        except OSError as exc:
            raise self._poison(WALIOError.from_os_error(
                "fdatasync", self._segments[-1].path, exc, "wal")) from exc

    def _check_usable(self) -> int:
        """The newest segment's descriptor; raises unless the WAL is open and not poisoned."""
        if self._failed is not None:
            raise WALPoisonedError(
                f"wal: {self.dir} failed earlier, refusing writes: {self._failed}"
            ) from self._failed
        if self._fd is None:
            raise WALError(f"wal: {self.dir} is closed")
        return self._fd

    def _poison(self, err: WALIOError) -> WALIOError:
        if self._failed is None:
            self._failed = err
            log.error("%s; the WAL refuses every further write", err)
        return err

    def _append(self, buf: bytearray, must_sync: bool) -> None:
        # The hot path: one write (more only after a short write) and at most one fdatasync.
        fd = self._fd
        assert fd is not None
        op = "write"
        try:
            write_all(fd, buf, file_io=self._io)
            if must_sync:
                op = "fdatasync"
                self._io.fdatasync(fd)
        except OSError as exc:
            raise self._poison(WALIOError.from_os_error(
                op, self._segments[-1].path, exc, "wal")) from exc
        self._size += len(buf)

    def _maybe_cut(self) -> None:
        if self._size < self.segment_size:
            return
        seg = self._start_segment(self._last_index + 1, "cutting segment")
        log.debug("wal: cut segment %s", seg.path)

    def _start_segment(self, first_index: int, what: str) -> Segment:
        """Fdatasync the open segment, write and open a new one starting at ``first_index``
        (with the metadata and hard state), switch appends to it and close the old one."""
        old_fd = self._fd
        assert old_fd is not None
        last = self._segments[-1]
        seg = Segment(last.seq + 1, first_index,
                      os.path.join(self.dir, segment_name(last.seq + 1, first_index)))
        try:
            with io_errors("fdatasync", last.path):
                self._io.fdatasync(old_fd)
            size = ws.write_new_segment(seg, self.metadata, self._hard_state, self._io)
            new_fd = ws.open_for_append(seg.path, self._io)
        except StorageIOError as exc:
            raise self._poison(ws.to_wal_error(
                exc, f"wal: {what} {seg.path}")) from exc.__cause__
        self._fd = new_fd
        self._segments.append(seg)
        self._size = size
        close_quietly(old_fd, last.path, file_io=self._io)  # fdatasynced above
        return seg

    def restart_after(self, meta: SnapshotMetadata) -> list[str]:
        """Start a new segment named ``meta.index + 1`` holding everything recovery needs from
        the snapshot ``meta`` on (its marker, the entries after it, the hard state), fsynced,
        then delete every older segment; returns the deleted paths.

        The WAL must hold a marker for ``meta`` (:meth:`read_all` checks). A crash before the
        old segments are gone leaves them and the new one: the entries the new segment
        repeats replace their earlier copies on replay, so the log reads the same. Used to
        drop, in one step, every entry at or below a snapshot (``docs/envelope.md``: no
        cleartext left after the cutover).
        """
        self._check_usable()
        contents = self.read_all(meta.index, meta.term)
        seg = self._start_segment(meta.index + 1, "restarting in segment")
        payload = bytearray()
        encode_snapshot_metadata(meta, payload)
        buf = bytearray()
        rec.frame(rec.RecordType.SNAPSHOT, payload, buf)
        for ent in contents.entries:
            rec.frame(rec.RecordType.ENTRY, entry_to_bytes(ent), buf)
        rec.frame(rec.RecordType.STATE, hard_state_to_bytes(self._hard_state), buf)
        self._append(buf, True)
        self._released_below = seg.seq
        removed = self.purge(keep=1)
        log.info("wal: restarted after the snapshot at index %d in %s", meta.index, seg.path)
        return removed

    # -- retention --------------------------------------------------------------------------
    def release_to(self, index: int) -> None:
        """Mark segments before the one that holds ``index`` as not needed for recovery."""
        keep_from = self._segments[0].seq
        for seg in self._segments:
            if seg.index <= index:
                keep_from = seg.seq
        self._released_below = max(self._released_below, keep_from)

    def purge(self, keep: int = MAX_WAL_FILES) -> list[str]:
        """Delete released segments, oldest first, keeping at least the newest ``keep`` files.

        A segment that cannot be deleted stops the purge there (logged; deleting a later one
        would leave a gap in the sequence). A failed fsync of the directory poisons the WAL.
        """
        self._check_usable()
        keep = max(1, keep)
        victims: list[Segment] = []
        for seg in self._segments[: max(0, len(self._segments) - keep)]:
            if seg.seq >= self._released_below:
                break
            victims.append(seg)
        removed: list[str] = []
        for seg in victims:
            try:
                unlink_if_exists(seg.path, file_io=self._io)
            except StorageIOError as exc:
                log.warning("wal: purge stopped: %s", exc)
                break
            removed.append(seg.path)
            self._segments.pop(0)
        if removed:
            try:
                fsync_dir(self.dir, file_io=self._io)
            except StorageIOError as exc:
                raise self._poison(ws.to_wal_error(exc, "wal: purge")) from exc.__cause__
            log.info("wal: purged %d segment(s): %s", len(removed), removed)
        return removed

    # -- reads ----------------------------------------------------------------------------
    def _records(self, start: int) -> Iterator[tuple[Segment, rec.RawRecord]]:
        """Every record from segment position ``start`` on, segment headers checked."""
        with ws.wal_errors(f"wal: reading {self.dir}"):
            segs = ws.list_segments(self.dir, self._io)
        segs = [s for s in segs if s.seq >= self._segments[start].seq]
        for i, seg in enumerate(segs):
            is_last = i == len(segs) - 1
            with ws.wal_errors("wal: reading"):
                data = read_file(seg.path, file_io=self._io)
            result = rec.scan(seg.path, data, is_last=is_last)
            if result.torn_at is not None:
                raise rec.corrupt(seg.path, result.torn_at, result.torn_reason)
            ws.check_preamble(seg, result.records)
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
                    meta = ws.decode_marker(r.payload)
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
                    markers.append(ws.decode_marker(r.payload))
                elif r.type == rec.RecordType.STATE:
                    hs = hard_state_from_bytes(r.payload)
                elif r.type == rec.RecordType.SEGMENT:
                    raise rec.corrupt(seg.path, r.offset, "segment header in mid-segment")
            except (DecodeError, ValueError) as exc:
                raise rec.corrupt(seg.path, r.offset,
                                  f"impossible {r.type.name} record: {exc}") from None
        return [m for m in markers if m.index <= hs.commit]

    def close(self) -> None:
        """fdatasync (unless poisoned) and close. Idempotent.

        A failed final fdatasync raises :class:`WALIOError`; the descriptors are closed anyway.
        """
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        path = self._segments[-1].path
        try:
            if self._failed is None:
                try:
                    self._io.fdatasync(fd)
                except OSError as exc:
                    raise self._poison(WALIOError.from_os_error(
                        "fdatasync", path, exc, "wal: closing")) from exc
        finally:
            close_quietly(fd, path, file_io=self._io)
            close_quietly(self._lock_fd, os.path.join(self.dir, ws.LOCK_NAME), file_io=self._io)

    def __enter__(self) -> WAL:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


