"""State-machine snapshot payload files (``.fsm``) and the snapshot token
(docs/storage.md section 4).

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

Writing fails with :class:`~trio_raft.errors.StorageIOError` (naming the file and the failed
operation) when the disk refuses a create, write, fsync or rename; the temporary file is then
removed, nothing is renamed, and an older ``.fsm`` of the same index is left as it was. Every
file access goes through the :class:`~trio_raft.storage.fileio.FileIO` passed as ``file_io``
(the real one by default).

Sealed payloads (``trio_raft/storage/sealing.py``): ``seal=`` makes the writer seal the
state through the given cipher, ``sealed=`` makes the restore open it; the footer and the token
cover the sealed bytes either way.

Everything blocks; the engine calls it from worker threads.
"""

from __future__ import annotations

import io
import os
import struct
from typing import Any, BinaryIO, Protocol, cast

import crc32c as _crc32c

from trio_raft.errors import (
    FSMSnapshotFileCRCError,
    FSMSnapshotNotFoundError,
    FSMSnapshotTokenCRCError,
    FSMSnapshotTokenInvalidError,
    FSMSnapshotTooLargeError,
    FSMSnapshotTooSmallError,
    StorageIOError,
)
from trio_raft.storage.fileio import OS_FILE_IO, FileIO
from trio_raft.storage.fileutil import (
    close_quietly,
    create_temp_file,
    discard_temp_file,
    fsync_dir,
    io_errors,
    make_dirs,
    pread_exact,
    write_all,
)
from trio_raft.storage.sealing import PayloadCipher, drain
from trio_raft.storage.streams import FDReader, FDWriter

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


def write_fsm_snapshot_file(snapshot: FSMSnapshot, directory: str | os.PathLike[str],
                            index: int, *, file_io: FileIO = OS_FILE_IO,
                            seal: tuple[PayloadCipher, int] | None = None) -> int:
    """Write ``snapshot`` to ``<directory>/%016x.fsm`` and return the payload's CRC32C.

    Streams ``snapshot.write_to`` through a 1 MiB buffer into ``<index>-<random>.fsm.tmp``,
    appends the big-endian CRC footer, fsyncs, renames over the final name (replacing it) and
    fsyncs the directory. On any error the temporary file is removed and nothing is renamed; an
    error of ``write_to`` itself propagates unchanged, a disk error is a
    :class:`StorageIOError` (also when ``write_to`` caught it and returned). The snapshot
    handle is not closed here. ``seal`` (cipher, term): the payload is sealed for the snapshot
    at ``index`` and that term.
    """
    directory = os.fspath(directory)
    make_dirs(directory, file_io=file_io)
    fd, tmp = create_temp_file(directory, f"{index:016x}-", TMP_SUFFIX, file_io=file_io)
    try:
        try:
            writer = FDWriter(file_io, fd, tmp, BUFFER_SIZE, checksum=True)
            if seal is None:
                snapshot.write_to(cast(BinaryIO, writer))
            else:
                sealer = seal[0].seal_payload(writer, index, seal[1])
                snapshot.write_to(cast(BinaryIO, sealer))
                sealer.finish()
            writer.finish()
            crc = writer.crc
            with io_errors("write", tmp):
                write_all(fd, _FOOTER.pack(crc), file_io=file_io)
            with io_errors("fsync", tmp):
                file_io.fsync(fd)
        except BaseException:
            close_quietly(fd, tmp, file_io=file_io)
            raise
        with io_errors("close", tmp):
            file_io.close(fd)
        final = fsm_snapshot_path(directory, index)
        with io_errors("rename", f"{tmp} -> {final}"):
            file_io.replace(tmp, final)
    except BaseException:
        discard_temp_file(tmp, file_io=file_io)
        raise
    fsync_dir(directory, file_io=file_io)
    return crc


# -- reading ----------------------------------------------------------------------------------


def _open_checked(path: str, file_io: FileIO) -> tuple[int, int, int]:
    """Open ``path``; return (descriptor, payload size, footer CRC)."""
    try:
        fd = file_io.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise FSMSnapshotNotFoundError(path) from None
    except OSError as exc:
        raise StorageIOError.from_os_error("open", path, exc) from exc
    try:
        with io_errors("read", path):
            size = file_io.fstat(fd).st_size
            if size < FOOTER_SIZE:
                raise FSMSnapshotTooSmallError(f"{path} ({size} bytes)")
            try:
                footer_bytes = pread_exact(fd, FOOTER_SIZE, size - FOOTER_SIZE, file_io=file_io)
            except EOFError:
                raise FSMSnapshotTooSmallError(f"{path} (shrank while opening)") from None
        (footer,) = _FOOTER.unpack(footer_bytes)
        return fd, size - FOOTER_SIZE, footer
    except BaseException:
        close_quietly(fd, path, file_io=file_io)
        raise


def _drain(reader: Any) -> None:
    while reader.read(BUFFER_SIZE):
        pass


def open_and_restore_fsm_snapshot(state_machine: Restorable, path: str | os.PathLike[str],
                                  token_crc: int, *, file_io: FileIO = OS_FILE_IO,
                                  sealed: tuple[PayloadCipher, int, int] | None = None) -> None:
    """Restore ``state_machine`` from the ``.fsm`` file at ``path``.

    The footer is compared with ``token_crc`` *before* ``restore`` is called; the full CRC is
    checked after it returns (and after draining what ``restore`` left unread). On
    FSMSnapshotFileCRCError the state machine may already be modified: treat it as fatal.
    ``sealed`` (cipher, index, term): the payload is a sealed stream for that snapshot; the
    state machine reads the plaintext, every chunk is verified before its bytes are handed
    out (a damaged one is SealedSnapshotIntegrityError naming ``path``, fatal likewise). A
    sealed payload is not CRC-summed on this path: every one of its bytes is authenticated
    (the header as every chunk's authenticated data, each chunk by its AES-GCM tag), which
    the CRC32C could only repeat more weakly (docs/envelope.md, "Integrity of a restore").
    """
    path = os.fspath(path)
    fd, payload_size, footer = _open_checked(path, file_io)
    if sealed is not None:
        with FDReader(file_io, fd, path, payload_size) as raw:
            if footer != token_crc:
                raise FSMSnapshotTokenCRCError(
                    f"{path}: footer {footer:#010x}, token {token_crc:#010x}")
            cipher, index, term = sealed
            # Straight from the descriptor: the reader reads whole chunks into its own buffers.
            with cipher.open_payload(raw, payload_size, index, term, path) as plain:
                state_machine.restore(plain)
                drain(plain)
        return
    with io.BufferedReader(FDReader(file_io, fd, path, payload_size, checksum=True),
                           BUFFER_SIZE) as reader:
        if footer != token_crc:
            raise FSMSnapshotTokenCRCError(
                f"{path}: footer {footer:#010x}, token {token_crc:#010x}")
        raw = cast(FDReader, reader.raw)
        state_machine.restore(cast(BinaryIO, reader))
        _drain(reader)
        if raw.crc != footer:
            raise FSMSnapshotFileCRCError(
                f"{path}: computed {raw.crc:#010x}, footer {footer:#010x}")


def verify_fsm_snapshot_file(path: str | os.PathLike[str], token_crc: int, *,
                             check_token: bool = False, file_io: FileIO = OS_FILE_IO) -> None:
    """Full CRC pass over the payload (FileCRC), then compare the footer with ``token_crc``
    (TokenCRC) when ``token_crc != 0`` or ``check_token`` is set."""
    path = os.fspath(path)
    fd, payload_size, footer = _open_checked(path, file_io)
    with FDReader(file_io, fd, path, payload_size, checksum=True) as raw:
        _drain(io.BufferedReader(raw, BUFFER_SIZE))
    if raw.crc != footer:
        raise FSMSnapshotFileCRCError(f"{path}: computed {raw.crc:#010x}, footer {footer:#010x}")
    if (check_token or token_crc != 0) and footer != token_crc:
        raise FSMSnapshotTokenCRCError(f"{path}: footer {footer:#010x}, token {token_crc:#010x}")


def read_fsm_snapshot_payload(path: str | os.PathLike[str],
                              limit: int = MAX_IN_MEMORY_PAYLOAD, *,
                              file_io: FileIO = OS_FILE_IO) -> bytes:
    """The whole payload in memory, CRC-verified against the footer."""
    path = os.fspath(path)
    fd, payload_size, footer = _open_checked(path, file_io)
    try:
        if payload_size > limit:
            raise FSMSnapshotTooLargeError(f"{path}: {payload_size} bytes > {limit}")
        with io_errors("read", path):
            data = pread_exact(fd, payload_size, 0, file_io=file_io)
    except EOFError:
        raise FSMSnapshotFileCRCError(f"{path}: short read") from None
    finally:
        close_quietly(fd, path, file_io=file_io)
    crc = crc32c(data)
    if crc != footer:
        raise FSMSnapshotFileCRCError(f"{path}: computed {crc:#010x}, footer {footer:#010x}")
    return data


def open_fsm_snapshot_payload(path: str | os.PathLike[str], *,
                              file_io: FileIO = OS_FILE_IO) -> tuple[BinaryIO, int, int]:
    """A streaming reader over the payload (footer excluded), its size and the footer CRC.

    The CRC is *not* verified (the reader is for sending; the receiver checks). Close the
    reader when done.
    """
    path = os.fspath(path)
    fd, payload_size, footer = _open_checked(path, file_io)
    reader = io.BufferedReader(FDReader(file_io, fd, path, payload_size), BUFFER_SIZE)
    return cast(BinaryIO, reader), payload_size, footer
