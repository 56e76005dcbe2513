"""State-machine snapshot payload files (``.fsm``) and the snapshot token (spec e).

Layouts::

    fsm-snap/%016x.fsm   := payload | CRC32C(payload) u32 BE          (minimum size 4)
    token (17 bytes)     := b"TRFT" | version u8 = 1 | index u64 BE | crc u32 BE

The raft snapshot's ``data`` holds the token; it names the ``.fsm`` file by index and pins its
CRC. Anything that is not exactly 17 bytes starting with the magic is a legacy *inline* payload.

Errors (all :class:`~trio_raft.errors.FSMSnapshotError`):

==================================  =======================================================
``FSMSnapshotNotFoundError``        the file does not exist
``FSMSnapshotTooSmallError``        the file is shorter than the 4-byte footer
``FSMSnapshotTokenCRCError``        the footer differs from the token's CRC
``FSMSnapshotFileCRCError``         the payload's CRC differs from the footer
``FSMSnapshotTokenInvalidError``    a token of the wrong length, magic or version
``FSMSnapshotTooLargeError``        an in-memory read of a payload above the limit (1 GiB)
==================================  =======================================================

Everything blocks; the engine calls it from worker threads.
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
import tempfile
from typing import Any, BinaryIO, Protocol

import crc32c as _crc32c

from trio_raft.errors import (
    FSMSnapshotFileCRCError,
    FSMSnapshotNotFoundError,
    FSMSnapshotTokenCRCError,
    FSMSnapshotTokenInvalidError,
    FSMSnapshotTooLargeError,
    FSMSnapshotTooSmallError,
)
from trio_raft.storage.fileutil import FILE_MODE, fsync_dir, make_dirs

crc32c = _crc32c.crc32c

TOKEN_MAGIC = b"TRFT"
TOKEN_VERSION = 1
TOKEN_SIZE = 17
FOOTER_SIZE = 4
#: Read-ahead / write buffer size used when streaming payloads.
BUFFER_SIZE = 1 << 20
#: Largest payload :func:`read_fsm_snapshot_payload` loads into memory by default.
MAX_IN_MEMORY_PAYLOAD = 1 << 30
FSM_SUFFIX = ".fsm"
TMP_SUFFIX = ".fsm.tmp"

_TOKEN = struct.Struct(">4sBQI")
_FOOTER = struct.Struct(">I")


class FSMSnapshot(Protocol):
    """What ``StateMachine.snapshot()`` returns: a captured handle written out in a thread."""

    def write_to(self, writer: BinaryIO) -> int: ...

    def close(self) -> None: ...


class Restorable(Protocol):
    def restore(self, reader: BinaryIO) -> Any: ...


# -- token ------------------------------------------------------------------------------------


def encode_snapshot_token(index: int, crc: int) -> bytes:
    return _TOKEN.pack(TOKEN_MAGIC, TOKEN_VERSION, index, crc)


def is_snapshot_token(data: bytes) -> bool:
    """True if ``data`` is shaped like a token (17 bytes, our magic); else it is inline data."""
    return len(data) == TOKEN_SIZE and data[:4] == TOKEN_MAGIC


def decode_snapshot_token(data: bytes) -> tuple[int, int]:
    """Return ``(index, crc)``; raise FSMSnapshotTokenInvalidError for anything else."""
    if len(data) != TOKEN_SIZE:
        raise FSMSnapshotTokenInvalidError(f"token is {len(data)} bytes, want {TOKEN_SIZE}")
    magic, version, index, crc = _TOKEN.unpack(data)
    if magic != TOKEN_MAGIC:
        raise FSMSnapshotTokenInvalidError(f"bad token magic {magic!r}")
    if version != TOKEN_VERSION:
        raise FSMSnapshotTokenInvalidError(f"unsupported token version {version}")
    return index, crc


def fsm_snapshot_path(directory: str | os.PathLike[str], index: int) -> str:
    return os.path.join(os.fspath(directory), f"{index:016x}{FSM_SUFFIX}")


def parse_fsm_snapshot_name(name: str) -> int | None:
    """The index of a ``%016x.fsm`` file name, or None for any other name."""
    if len(name) != 16 + len(FSM_SUFFIX) or not name.endswith(FSM_SUFFIX):
        return None
    digits = name[:16]
    if any(c not in "0123456789abcdef" for c in digits):
        return None
    return int(digits, 16)


# -- writing ----------------------------------------------------------------------------------


class _CRCWriter(io.RawIOBase):
    """A write-only raw stream that hashes what passes through to ``sink``."""

    def __init__(self, sink: BinaryIO) -> None:
        self._sink = sink
        self.crc = 0
        self.count = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        self.crc = crc32c(view, self.crc)
        self.count += len(view)
        self._sink.write(view)
        return len(view)


def write_fsm_snapshot_file(snapshot: FSMSnapshot, directory: str | os.PathLike[str],
                            index: int) -> int:
    """Write ``snapshot`` to ``<directory>/%016x.fsm`` and return the payload's CRC32C.

    Streams ``snapshot.write_to`` through a 1 MiB buffer into ``*.fsm.tmp``, appends the
    big-endian CRC footer, fsyncs, renames over the final name (replacing it) and fsyncs the
    directory. The temporary file is removed on error. The snapshot handle is not closed here.
    """
    directory = os.fspath(directory)
    make_dirs(directory)
    fd, tmp = tempfile.mkstemp(prefix=f"{index:016x}-", suffix=TMP_SUFFIX, dir=directory)
    try:
        os.fchmod(fd, FILE_MODE)
        with open(fd, "wb", buffering=0) as raw:
            hasher = _CRCWriter(raw)
            buffered = io.BufferedWriter(hasher, BUFFER_SIZE)
            snapshot.write_to(buffered)
            buffered.flush()
            crc = hasher.crc
            raw.write(_FOOTER.pack(crc))
            os.fsync(raw.fileno())
        os.replace(tmp, fsm_snapshot_path(directory, index))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)
    return crc


# -- reading ----------------------------------------------------------------------------------


class _PayloadRaw(io.RawIOBase):
    """A raw reader over the first ``limit`` bytes of a file, optionally hashing them."""

    def __init__(self, f: BinaryIO, limit: int, *, owns: bool = True) -> None:
        self._f = f
        self._left = limit
        self._owns = owns
        self.crc = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        if self._left <= 0 or not len(view):
            return 0
        n = self._f.readinto(view[: min(len(view), self._left)])  # type: ignore[attr-defined]
        if not n:
            raise EOFError(f"fsm snapshot: file shrank while reading ({self._left} bytes short)")
        self._left -= n
        self.crc = crc32c(view[:n], self.crc)
        return int(n)

    def remaining(self) -> int:
        return self._left

    def close(self) -> None:
        if not self.closed and self._owns:
            self._f.close()
        super().close()


def _open_checked(path: str) -> tuple[BinaryIO, int, int]:
    """Open ``path``; return (file, payload size, footer CRC)."""
    try:
        f = open(path, "rb")  # noqa: SIM115 - handed to the caller
    except FileNotFoundError:
        raise FSMSnapshotNotFoundError(path) from None
    try:
        size = os.fstat(f.fileno()).st_size
        if size < FOOTER_SIZE:
            raise FSMSnapshotTooSmallError(f"{path} ({size} bytes)")
        f.seek(size - FOOTER_SIZE)
        (footer,) = _FOOTER.unpack(f.read(FOOTER_SIZE))
        f.seek(0)
        return f, size - FOOTER_SIZE, footer
    except BaseException:
        f.close()
        raise


def _drain(reader: Any) -> None:
    while reader.read(BUFFER_SIZE):
        pass


def open_and_restore_fsm_snapshot(state_machine: Restorable, path: str | os.PathLike[str],
                                  token_crc: int) -> None:
    """Restore ``state_machine`` from the ``.fsm`` file at ``path``.

    The footer is compared with ``token_crc`` *before* ``restore`` is called; the full CRC is
    checked after it returns (and after draining what ``restore`` left unread). On
    FSMSnapshotFileCRCError the state machine may already be modified: treat it as fatal.
    """
    path = os.fspath(path)
    f, payload_size, footer = _open_checked(path)
    with f:
        if footer != token_crc:
            raise FSMSnapshotTokenCRCError(
                f"{path}: footer {footer:#010x}, token {token_crc:#010x}")
        raw = _PayloadRaw(f, payload_size, owns=False)
        reader = io.BufferedReader(raw, BUFFER_SIZE)
        state_machine.restore(reader)
        _drain(reader)
        if raw.crc != footer:
            raise FSMSnapshotFileCRCError(
                f"{path}: computed {raw.crc:#010x}, footer {footer:#010x}")


def verify_fsm_snapshot_file(path: str | os.PathLike[str], token_crc: int, *,
                             check_token: bool = False) -> None:
    """Full CRC pass over the payload (FileCRC), then compare the footer with ``token_crc``
    (TokenCRC) when ``token_crc != 0`` or ``check_token`` is set."""
    path = os.fspath(path)
    f, payload_size, footer = _open_checked(path)
    with f:
        raw = _PayloadRaw(f, payload_size, owns=False)
        _drain(io.BufferedReader(raw, BUFFER_SIZE))
    if raw.crc != footer:
        raise FSMSnapshotFileCRCError(f"{path}: computed {raw.crc:#010x}, footer {footer:#010x}")
    if (check_token or token_crc != 0) and footer != token_crc:
        raise FSMSnapshotTokenCRCError(f"{path}: footer {footer:#010x}, token {token_crc:#010x}")


def read_fsm_snapshot_payload(path: str | os.PathLike[str],
                              limit: int = MAX_IN_MEMORY_PAYLOAD) -> bytes:
    """The whole payload in memory, CRC-verified against the footer."""
    path = os.fspath(path)
    f, payload_size, footer = _open_checked(path)
    with f:
        if payload_size > limit:
            raise FSMSnapshotTooLargeError(f"{path}: {payload_size} bytes > {limit}")
        data = f.read(payload_size)
    if len(data) != payload_size:
        raise FSMSnapshotFileCRCError(f"{path}: short read")
    crc = crc32c(data)
    if crc != footer:
        raise FSMSnapshotFileCRCError(f"{path}: computed {crc:#010x}, footer {footer:#010x}")
    return data


def open_fsm_snapshot_payload(path: str | os.PathLike[str]) -> tuple[BinaryIO, int, int]:
    """A streaming reader over the payload (footer excluded), its size and the footer CRC.

    The CRC is *not* verified (the reader is for sending; the receiver checks). Close the
    reader when done.
    """
    path = os.fspath(path)
    f, payload_size, footer = _open_checked(path)
    reader = io.BufferedReader(_PayloadRaw(f, payload_size), BUFFER_SIZE)
    return reader, payload_size, footer
