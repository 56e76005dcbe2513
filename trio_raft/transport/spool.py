"""On-disk spool for a snapshot payload being received, and its finalization as a ``.fsm`` file.

A received snapshot's payload goes to a temporary file (``trio-raft-snapshot-*.spool`` in the
spool directory) while its CRC32C (Castagnoli) is computed over exactly the bytes written. When the
stream is complete, :meth:`SnapshotSpool.finalize_as_fsm` turns the spool into the payload file
the storage layer reads (spec e.1)::

    <fsm dir>/%016x.fsm  =  payload || CRC32C(payload) as u32 big-endian

It appends the footer, fsyncs, closes, renames the spool over the final name and fsyncs the
directory. After a successful rename :meth:`SnapshotSpool.close` leaves the file alone; on every
other path ``close`` removes the spool. All methods block (file I/O): call them from a worker
thread. They are serialized by a lock, so ``close`` from one thread never races a ``finalize``
running in another.
"""

from __future__ import annotations

import logging
import os
import struct
import tempfile
import threading

import crc32c

from trio_raft.errors import SnapshotPayloadTooLargeError, TransportError

log = logging.getLogger(__name__)

#: Default cap on a received snapshot payload (16 GiB, as the seed).
DEFAULT_MAX_SNAPSHOT_BYTES = 16 << 30
#: Largest payload handed to the handler inline (no .fsm directory configured).
MAX_INLINE_SNAPSHOT_BYTES = 1 << 30
SPOOL_PREFIX = "trio-raft-snapshot-"
SPOOL_SUFFIX = ".spool"

_CRC = struct.Struct(">I")


def fsm_file_name(index: int) -> str:
    """``%016x.fsm``: the payload file name for a snapshot at ``index``."""
    return f"{index:016x}.fsm"


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_spools(directory: str) -> int:
    """Delete leftover spool files (a crash mid-transfer leaves them); returns how many."""
    removed = 0
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return 0
    for name in names:
        if name.startswith(SPOOL_PREFIX) and name.endswith(SPOOL_SUFFIX):
            try:
                os.unlink(os.path.join(directory, name))
                removed += 1
            except FileNotFoundError:
                pass
    return removed


class SnapshotSpool:
    """A temporary file receiving one snapshot payload."""

    def __init__(self, directory: str, *, max_bytes: int = DEFAULT_MAX_SNAPSHOT_BYTES) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        os.makedirs(directory, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix=SPOOL_PREFIX, suffix=SPOOL_SUFFIX, dir=directory)
        self._file = os.fdopen(fd, "w+b")
        self.path: str | None = path
        self.directory = directory
        self.max_bytes = max_bytes
        self.size = 0
        self.crc = 0
        self.final_path: str | None = None
        self._lock = threading.Lock()
        self._closed = False

    def write(self, data: bytes | memoryview) -> None:
        """Append payload bytes; :class:`SnapshotPayloadTooLargeError` past the cap."""
        with self._lock:
            self._check_open()
            if self.size + len(data) > self.max_bytes:
                raise SnapshotPayloadTooLargeError(
                    f"{self.size + len(data)} bytes > limit {self.max_bytes}"
                )
            self._file.write(data)
            self.crc = crc32c.crc32c(data, self.crc)
            self.size += len(data)

    def read_all(self, *, max_bytes: int = MAX_INLINE_SNAPSHOT_BYTES) -> bytes:
        """The whole payload, for handing it to the handler inline."""
        with self._lock:
            self._check_open()
            if self.size > max_bytes:
                raise SnapshotPayloadTooLargeError(
                    f"{self.size} bytes > in-memory limit {max_bytes}"
                )
            self._file.flush()
            self._file.seek(0)
            data = self._file.read()
            self._file.seek(0, os.SEEK_END)
            return data

    def finalize_as_fsm(self, fsm_dir: str, index: int) -> str:
        """Append the CRC footer, fsync, rename to ``fsm_dir/%016x.fsm``, fsync the directory.
        Returns the final path. On failure the spool stays for :meth:`close` to remove."""
        with self._lock:
            self._check_open()
            assert self.path is not None
            self._file.write(_CRC.pack(self.crc))
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._closed = True
            os.makedirs(fsm_dir, exist_ok=True)
            final = os.path.join(fsm_dir, fsm_file_name(index))
            os.replace(self.path, final)
            self.path = None
            self.final_path = final
            fsync_dir(fsm_dir)
            return final

    def close(self) -> None:
        """Close the file and remove the spool unless it was finalized. Idempotent."""
        with self._lock:
            if not self._file.closed:
                try:
                    self._file.close()
                except OSError:
                    log.warning("closing snapshot spool %s failed", self.path, exc_info=True)
            self._closed = True
            if self.path is not None:
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
                except OSError:
                    log.warning("removing snapshot spool %s failed", self.path, exc_info=True)
                self.path = None

    def _check_open(self) -> None:
        if self._closed:
            raise TransportError("snapshot spool is closed")

    def __enter__(self) -> SnapshotSpool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
