"""The one storage-side object through which snapshot payloads leave and arrive.

The engine creates one :class:`SnapshotExchange` per data directory and hands it to its transport
once (``Transport.attach``). The transport never touches ``fsm-snap/`` itself: it asks the
exchange for a reader over a payload it must send, and for an :class:`IncomingSnapshot` to spool a
payload it receives. Every file layout used here is defined in
:mod:`trio_raft.storage.fsm_snapshot` (``.fsm`` file, token) and :mod:`trio_raft.storage.recovery`
(the spool prefix); nothing is redefined.

Every file access goes through the :class:`~trio_raft.storage.fileio.FileIO` the exchange was
built with (``file_io``, the real one by default; the engine passes its data directory's), by
way of the helpers of :mod:`trio_raft.storage.fileutil` and the ``.fsm`` reader of
:mod:`trio_raft.storage.fsm_snapshot` (docs/storage.md section 8). A failed disk operation is a
:class:`~trio_raft.errors.StorageIOError` naming the operation and the file, never a bare
:class:`OSError`.

Sending: :meth:`SnapshotExchange.open_outgoing` turns ``Snapshot.data`` into an
:class:`OutgoingPayload` when it names a ``.fsm`` file (a snapshot descriptor or a bare token,
:mod:`trio_raft.storage.descriptor`: the payload of ``fsm-snap/%016x.fsm``, footer excluded,
size known) or ``None`` when the data is an inline payload. The reader computes the
CRC32C of what it hands out and, before handing out the last bytes, compares it with the file's
footer and the token: a damaged (or shrunken) file raises
:class:`~trio_raft.errors.FSMSnapshotFileCRCError` before the receiver could see a complete
stream.

Receiving: :meth:`SnapshotExchange.begin_incoming` refuses an index at or below the applied index
(:class:`~trio_raft.errors.ReceivedFSMSnapshotStaleError`), creates a spool file
``fsm-snap/trio-raft-snapshot-*.spool`` (the prefix that recovery deletes at open) and protects
the index from snapshot retention. The :class:`IncomingSnapshot` then

* ``write``: appends bytes (unbuffered: each chunk is handed to the disk before ``write``
  returns), computing CRC32C over exactly the bytes written, refusing anything past the size cap
  (:class:`~trio_raft.errors.SnapshotPayloadTooLargeError`); when the exchange's
  ``sealed_required(index)`` says the node's envelope is on for that index, a payload that
  does not start like a sealed stream (``trio_raft/envelope/stream.py``) is refused before any
  byte of it reaches the spool (:class:`~trio_raft.errors.SealedSnapshotRequiredError`), so a
  spool never holds cleartext the node knows should be sealed;
* ``finalize``: refuses a stale index or a payload whose CRC differs from the one the sender
  announced, else appends the big-endian CRC footer, fsyncs, closes, renames to ``%016x.fsm``,
  fsyncs the directory and returns the new ``Snapshot.data``: the data the sender announced
  with its token replaced by the local one (a descriptor keeps its cluster id, members and every
  other record), or the local token when the sender announced no descriptor;
* ``abort``: idempotent; closes the spool and removes it, or the finalized file when the engine
  refused it, and releases the protection. It never raises for a file system problem (it runs
  on error and cancellation paths): a failed removal is logged, and recovery deletes spools and
  unreferenced ``.fsm`` files at the next open.

Invariants:

* Nothing half-written is ever visible under a ``.fsm`` name: the rename is the last step, after
  the footer, the fsync and the close, and a rename whose directory fsync failed is undone.
* A disk failure is final for its incoming snapshot: after a failed write, fsync or close every
  later ``write`` and ``finalize`` raises that same error (a failed fsync is never retried,
  docs/storage.md section 8.2); only ``abort`` is left, and it removes the spool.
* A protected index is never a leak: protections at or below the applied index are dropped the
  next time anyone looks (:meth:`SnapshotExchange.protected_indexes`), so a message the engine
  accepted and then dropped pins its file only until the node applies past it.
* A finalized file whose message the engine has not installed yet is not replaced by a second
  transfer of the same index with different content (that would break the first token's CRC);
  the second one is refused as stale. Same content is accepted (the file is kept as it is).

Everything here blocks (file I/O): the transports call it through ``trio.to_thread.run_sync``.
The exchange and each incoming snapshot are safe to call from several worker threads.
"""

from __future__ import annotations

import collections
import logging
import os
import struct
import threading
from collections.abc import Callable

import crc32c

from trio_raft.errors import (
    FSMSnapshotFileCRCError,
    FSMSnapshotTokenCRCError,
    ReceivedFSMSnapshotStaleError,
    SealedSnapshotRequiredError,
    SnapshotPayloadCRCError,
    SnapshotPayloadTooLargeError,
    StorageIOError,
    TransportError,
)
from trio_raft.storage import descriptor
from trio_raft.storage import fsm_snapshot as fsm
from trio_raft.storage.fileio import OS_FILE_IO, FileIO
from trio_raft.storage.fileutil import (
    close_quietly,
    create_temp_file,
    discard_temp_file,
    fsync_dir,
    io_errors,
    lexists,
    make_dirs,
    rename,
    unlink_if_exists,
    write_all,
)
from trio_raft.storage.recovery import SPOOL_PREFIX

log = logging.getLogger(__name__)

#: The first bytes of a sealed payload (``trio_raft/envelope/stream.py``; docs/formats.md).
SEALED_MAGIC = b"TRSP"
#: Default cap on one received snapshot payload (16 GiB).
DEFAULT_MAX_SNAPSHOT_BYTES = 16 << 30
SPOOL_SUFFIX = ".spool"

_FOOTER = struct.Struct(">I")


class OutgoingPayload:
    """A blocking reader over one ``.fsm`` payload being sent (footer excluded).

    ``read(n)`` returns up to ``n`` bytes, ``b""`` at the end; the CRC of the whole payload is
    checked against the footer and the token before the last bytes are returned. ``close`` is
    idempotent. Use it from one thread at a time.
    """

    def __init__(self, path: str, index: int, token_crc: int, *,
                 file_io: FileIO = OS_FILE_IO) -> None:
        reader, size, footer = fsm.open_fsm_snapshot_payload(path, file_io=file_io)
        if footer != token_crc:
            reader.close()
            raise FSMSnapshotTokenCRCError(
                f"{path}: footer {footer:#010x}, token {token_crc:#010x}")
        self.path = path
        self.index = index
        self.size = size
        #: The CRC32C the token names (the receiver checks its own against it).
        self.crc = token_crc
        self._reader = reader
        self._left = size
        self._crc = 0

    def read(self, n: int) -> bytes:
        if n <= 0:
            raise ValueError("read size must be positive")
        if self._reader.closed:
            raise TransportError(f"snapshot payload {self.path} is closed")
        if self._left == 0:
            return b""
        try:
            data = self._reader.read(min(n, self._left))
        except EOFError:
            data = b""
        if not data:
            raise FSMSnapshotFileCRCError(f"{self.path}: {self._left} bytes short")
        self._left -= len(data)
        self._crc = crc32c.crc32c(data, self._crc)
        if self._left == 0 and self._crc != self.crc:
            raise FSMSnapshotFileCRCError(
                f"{self.path}: computed {self._crc:#010x}, footer {self.crc:#010x}")
        return data

    @property
    def closed(self) -> bool:
        return self._reader.closed

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> OutgoingPayload:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class IncomingSnapshot:
    """One received payload on its way to ``fsm-snap/%016x.fsm`` (see the module docstring)."""

    def __init__(self, exchange: SnapshotExchange, index: int, max_bytes: int) -> None:
        self._exchange = exchange
        self._io = exchange.file_io
        self.index = index
        self.max_bytes = max_bytes
        #: Bytes written to the spool so far, and their CRC32C.
        self.size = 0
        self.crc = 0
        #: The first disk failure; final (see the module docstring).
        self.failure: StorageIOError | None = None
        self._lock = threading.Lock()
        fd, path = create_temp_file(exchange.fsm_dir, SPOOL_PREFIX, SPOOL_SUFFIX,
                                    file_io=self._io)
        self._fd: int | None = fd
        self.spool_path: str | None = path
        self.final_path: str | None = None
        #: Bytes that must start the payload (the sealed magic), not yet all seen.
        self._must_start = SEALED_MAGIC if exchange.sealed_required(index) else b""
        self._state = "open"  # open -> finalized -> (aborted) | open -> aborted

    @property
    def state(self) -> str:
        return self._state

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append payload bytes; :class:`SnapshotPayloadTooLargeError` past the cap, a
        :class:`StorageIOError` when the disk refuses them."""
        with self._lock:
            fd, spool = self._open_fd()
            n = memoryview(data).nbytes
            if self.size + n > self.max_bytes:
                raise SnapshotPayloadTooLargeError(
                    f"{self.size + n} bytes > limit {self.max_bytes}")
            if self._must_start:
                head = bytes(memoryview(data)[:len(self._must_start)])
                if not self._must_start.startswith(head):
                    raise SealedSnapshotRequiredError(
                        f"index {self.index}: this node's envelope is on above its cutover, "
                        "and the payload is not sealed")
                self._must_start = self._must_start[len(head):]
            try:
                with io_errors("write", spool):
                    write_all(fd, data, file_io=self._io)
            except StorageIOError as exc:
                self.failure = exc
                raise
            self.crc = crc32c.crc32c(data, self.crc)
            self.size += n

    def finalize(self, expected_crc: int | None = None, announced: bytes = b"") -> bytes:
        """Footer, fsync, close, rename to ``%016x.fsm``, directory fsync; returns the snapshot
        data for the handler: ``announced`` (the sender's ``Snapshot.data``) naming the local
        file (:func:`~trio_raft.storage.descriptor.with_token`), or the local token.

        ``expected_crc`` is the CRC the sender announced (its token), when it did: a different
        CRC raises :class:`SnapshotPayloadCRCError`. A stale index raises
        :class:`ReceivedFSMSnapshotStaleError`; a damaged descriptor in ``announced``
        :class:`~trio_raft.errors.SnapshotDescriptorError`; a disk failure a
        :class:`StorageIOError`. On any error nothing is left under the ``.fsm`` name; the spool
        stays for :meth:`abort`.
        """
        with self._lock:
            fd, spool = self._open_fd()
            if expected_crc is not None and expected_crc != self.crc:
                raise SnapshotPayloadCRCError(
                    f"index {self.index}: received {self.crc:#010x}, sender announced "
                    f"{expected_crc:#010x}")
            self._exchange._check_fresh(self.index)
            if self._must_start or (self._exchange.sealed_required(self.index) and announced
                                    and not descriptor.envelope_of(announced).sealed_key_id):
                raise SealedSnapshotRequiredError(
                    f"index {self.index}: this node's envelope is on above its cutover, and "
                    "the snapshot is not sealed")
            token = fsm.encode_snapshot_token(self.index, self.crc)
            data = descriptor.with_token(announced, token) if announced else token
            final = fsm.fsm_snapshot_path(self._exchange.fsm_dir, self.index)
            try:
                with io_errors("write", spool):
                    write_all(fd, _FOOTER.pack(self.crc), file_io=self._io)
                with io_errors("fsync", spool):
                    self._io.fsync(fd)
                self._fd = None  # the seam releases the descriptor even when close fails
                with io_errors("close", spool):
                    self._io.close(fd)
                self._exchange._land(self, final)
            except StorageIOError as exc:
                self.failure = exc
                raise
            self.final_path = final
            self._state = "finalized"
            return data

    def abort(self) -> None:
        """Close and remove the spool (or remove the finalized file: the engine refused it) and
        release the protection. Idempotent; never raises for the file system (a failure is
        logged)."""
        with self._lock:
            if self._state == "aborted":
                return
            was = self._state
            self._state = "aborted"
            if self._fd is not None:
                close_quietly(self._fd, self.spool_path or "", file_io=self._io)
                self._fd = None
            if self.spool_path is not None:
                discard_temp_file(self.spool_path, file_io=self._io)
                self.spool_path = None
            self._exchange._release(self, finalized=was == "finalized")

    def _open_fd(self) -> tuple[int, str]:
        if self.failure is not None:
            raise self.failure
        if self._state != "open" or self._fd is None or self.spool_path is None:
            raise TransportError(f"incoming snapshot at index {self.index} is {self._state}")
        return self._fd, self.spool_path


class SnapshotExchange:
    """Snapshot payloads in and out of one ``fsm-snap`` directory (see the module docstring)."""

    def __init__(self, fsm_dir: str | os.PathLike[str], applied_index: Callable[[], int], *,
                 max_bytes: int = DEFAULT_MAX_SNAPSHOT_BYTES,
                 file_io: FileIO = OS_FILE_IO,
                 sealed_required: Callable[[int], bool] = lambda index: False) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        #: Whether a payload received for an index must be sealed (the engine's envelope).
        self.sealed_required = sealed_required
        self.fsm_dir = os.fspath(fsm_dir)
        self.max_bytes = max_bytes
        #: The seam every file access of this exchange goes through.
        self.file_io = file_io
        self._applied_index = applied_index
        self._lock = threading.Lock()
        #: index -> number of transfers holding it (in flight, or finalized and handed over).
        self._holds: collections.Counter[int] = collections.Counter()
        #: finalized files waiting for the engine: index -> (CRC, transfers that handed it over).
        self._landed: dict[int, tuple[int, int]] = {}

    # -- sending ----------------------------------------------------------------------------------

    def open_outgoing(self, data: bytes) -> OutgoingPayload | None:
        """A reader over the payload ``data`` names when it is a descriptor or a token; ``None``
        when ``data`` is an inline payload. Raises the ``FSMSnapshot*Error`` of a missing or
        damaged file, :class:`~trio_raft.errors.SnapshotDescriptorError` for a damaged
        descriptor, or a :class:`StorageIOError` when it cannot be read."""
        ref = descriptor.payload_ref(data)
        if ref is None:
            return None
        index, crc = ref
        return OutgoingPayload(fsm.fsm_snapshot_path(self.fsm_dir, index), index, crc,
                               file_io=self.file_io)

    # -- receiving --------------------------------------------------------------------------------

    def begin_incoming(self, index: int) -> IncomingSnapshot:
        """Start receiving the payload of the snapshot at ``index`` (protects ``index`` until the
        returned object is aborted or the node applies past it). A :class:`StorageIOError` when
        the spool cannot be created (nothing is left protected then)."""
        if index <= 0:
            raise ValueError("a received snapshot has a positive index")
        make_dirs(self.fsm_dir, file_io=self.file_io)
        with self._lock:
            self._check_fresh(index)
            self._holds[index] += 1
        try:
            return IncomingSnapshot(self, index, self.max_bytes)
        except BaseException:
            with self._lock:
                self._drop_hold(index)
            raise

    def protected_indexes(self) -> frozenset[int]:
        """``.fsm`` indexes snapshot retention must keep (received, not yet installed)."""
        applied = self._applied_index()
        with self._lock:
            for index in [i for i in self._holds if i <= applied]:
                del self._holds[index]
                self._landed.pop(index, None)
            return frozenset(self._holds)

    # -- internals (called by IncomingSnapshot under its own lock) --------------------------------

    def _check_fresh(self, index: int) -> None:
        applied = self._applied_index()
        if index <= applied:
            raise ReceivedFSMSnapshotStaleError(f"index={index} applied={applied}")

    def _land(self, incoming: IncomingSnapshot, final: str) -> None:
        """Move the closed, fsynced spool to ``final`` (or drop it when the same payload is
        already there, waiting) and fsync the directory."""
        spool = incoming.spool_path
        assert spool is not None
        io = self.file_io
        with self._lock:
            crc, holders = self._landed.get(incoming.index, (incoming.crc, 0))
            waiting = holders > 0 and lexists(final, file_io=io)
            if waiting and crc != incoming.crc:
                raise ReceivedFSMSnapshotStaleError(
                    f"index={incoming.index}: a different payload at this index is waiting to "
                    "be installed")
            if waiting:
                unlink_if_exists(spool, file_io=io)  # same content: keep the file already there
            else:
                rename(spool, final, file_io=io)
            incoming.spool_path = None
            try:
                fsync_dir(self.fsm_dir, file_io=io)
            except StorageIOError:
                if not waiting:  # not durable: never hand it over
                    discard_temp_file(final, file_io=io)
                raise
            self._landed[incoming.index] = (incoming.crc, holders + 1 if waiting else 1)

    def _release(self, incoming: IncomingSnapshot, *, finalized: bool) -> None:
        index = incoming.index
        with self._lock:
            self._drop_hold(index)
            if not finalized:
                return
            crc, holders = self._landed.get(index, (incoming.crc, 0))
            if holders > 1:
                self._landed[index] = (crc, holders - 1)
                return
            self._landed.pop(index, None)
            # At or below the applied index the file may be the installed snapshot's: retention
            # removes it once nothing refers to it.
            if holders == 1 and index > self._applied_index():
                self._remove_logged(fsm.fsm_snapshot_path(self.fsm_dir, index))

    def _drop_hold(self, index: int) -> None:
        if self._holds[index] <= 1:
            self._holds.pop(index, None)
        else:
            self._holds[index] -= 1

    def _remove_logged(self, path: str) -> None:
        """Remove a refused ``.fsm`` file, best effort (recovery removes what is left)."""
        try:
            if unlink_if_exists(path, file_io=self.file_io):
                fsync_dir(self.fsm_dir, file_io=self.file_io)
        except StorageIOError as exc:
            log.warning("removing received snapshot file %s failed: %s", path, exc)
