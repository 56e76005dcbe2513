"""Binary streams over a file descriptor, through the file-I/O seam.

:class:`FDWriter` is what a state machine's ``Snapshot.write_to`` writes into (the ``.fsm``
writer, the migration spool); :class:`FDReader` is the raw reader under the ``.fsm``
restore, verify and send paths. Both move every byte through the
:class:`~trio_raft.storage.fileio.FileIO` they are given.

Invariants: a writer's first failure is final (it is raised again by every later call, so code
that swallowed it cannot make the write look successful); neither class ever closes a
descriptor it does not own; a read error is a :class:`~trio_raft.errors.StorageIOError`.
"""

from __future__ import annotations

import io
from typing import Any

import crc32c as _crc32c

from trio_raft.errors import StorageIOError
from trio_raft.storage.fileio import FileIO
from trio_raft.storage.fileutil import close_quietly, io_errors, write_all
from trio_raft.writeonly import WriteOnlyStream

__all__ = ["FDReader", "FDWriter"]


class FDWriter(WriteOnlyStream):
    """A buffered, write-only binary stream over a descriptor, through the seam.

    Handed to code that expects a binary file (``Snapshot.write_to``). It counts what it was
    given and, with ``checksum=True``, keeps its CRC32C. The first write failure is kept: it is
    raised then, and again by every later call and by :meth:`finish`, so a caller that
    swallowed it cannot make the writer look successful. :meth:`close` writes nothing and never
    closes ``fd`` (the owner of the descriptor does); only :meth:`flush` and :meth:`finish`
    write out the buffer.
    """

    def __init__(self, file_io: FileIO, fd: int, path: str, buffer_size: int, *,
                 checksum: bool = False) -> None:
        self._io = file_io
        self._fd = fd
        self.path = path
        self._limit = buffer_size
        self._buf = bytearray()
        self._checksum = checksum
        self.crc = 0
        self.count = 0
        self.closed = False
        self.failure: StorageIOError | None = None

    def write(self, data: Any) -> int:
        self._check()
        view = memoryview(data).cast("B")
        n = len(view)
        if self._checksum:
            self.crc = _crc32c.crc32c(view, self.crc)
        self.count += n
        if len(self._buf) + n < self._limit:
            self._buf += view
            return n
        self._flush_buffer()
        if n >= self._limit:
            self._write(view)
        else:
            self._buf += view
        return n

    def flush(self) -> None:
        self._check()
        self._flush_buffer()

    def finish(self) -> None:
        """Write out the buffer; raise the first failure if there was one."""
        self._check()
        self._flush_buffer()

    def close(self) -> None:
        self.closed = True

    def _check(self) -> None:
        if self.failure is not None:
            raise self.failure
        if self.closed:
            raise ValueError(f"write to {self.path} after close")

    def _flush_buffer(self) -> None:
        if self._buf:
            buf, self._buf = self._buf, bytearray()
            self._write(buf)

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        try:
            write_all(self._fd, data, file_io=self._io)
        except OSError as exc:
            self.failure = StorageIOError.from_os_error("write", self.path, exc)
            raise self.failure from exc


class FDReader(io.RawIOBase):
    """A raw, read-only stream over the first ``limit`` bytes of a descriptor, through the seam.

    Wrap it in :class:`io.BufferedReader`. With ``checksum=True`` it keeps the CRC32C of what
    was read. A file shorter than ``limit`` raises :class:`EOFError`; a read error is a
    :class:`StorageIOError`. When ``owns`` is set, closing it closes the descriptor (a failed
    close of a read-only descriptor is only logged: it cannot lose data).
    """

    def __init__(self, file_io: FileIO, fd: int, path: str, limit: int, *,
                 checksum: bool = False, owns: bool = True) -> None:
        super().__init__()
        self._io = file_io
        self._fd = fd
        self.path = path
        self._left = limit
        self._checksum = checksum
        self._owns = owns
        self.crc = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if self._left <= 0 or not len(view):
            return 0
        with io_errors("read", self.path):
            n = self._io.readinto(self._fd, view[: min(len(view), self._left)])
        if not n:
            raise EOFError(f"{self.path}: file shrank while reading ({self._left} bytes short)")
        self._left -= n
        if self._checksum:
            self.crc = _crc32c.crc32c(view[:n], self.crc)
        return n

    def remaining(self) -> int:
        return self._left

    def close(self) -> None:
        if not self.closed and self._owns:
            close_quietly(self._fd, self.path, file_io=self._io)
        super().close()
