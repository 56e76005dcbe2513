"""The envelope cutover file: the log index from which this node's entries are wrapped.

``<data_dir>/trio-raft-envelope-cutover.bin`` (layout in ``docs/formats.md``)::

    magic "TREC" | version u8 = 1 | index u64 BE | crc32 u32 BE (zlib CRC-32 of what precedes)

Written atomically (temp file, fsync, rename, directory fsync) when the cutover marker applies,
before the applied index moves past it; read when the engine opens. Why a file: once a snapshot
covers the marker the WAL no longer holds it, yet the regime must survive restarts
(``docs/envelope.md``).
"""

from __future__ import annotations

import os
import struct
import zlib

from trio_raft.errors import KeyStoreCorruptError
from trio_raft.storage.fileio import OS_FILE_IO, FileIO
from trio_raft.storage.fileutil import read_file_if_exists, remove_stale_temp_files, replace_file

CUTOVER_FILE = "trio-raft-envelope-cutover.bin"
_CUTOVER = struct.Struct(">4sBQ")
_CRC = struct.Struct(">I")
_MAGIC = b"TREC"


def save_cutover(data_dir: str, index: int, *, file_io: FileIO = OS_FILE_IO) -> None:
    """Record ``index`` as the cutover, replacing any earlier file atomically."""
    body = _CUTOVER.pack(_MAGIC, 1, index)
    replace_file(os.path.join(data_dir, CUTOVER_FILE), body + _CRC.pack(zlib.crc32(body)),
                 file_io=file_io)


def load_cutover(data_dir: str, *, file_io: FileIO = OS_FILE_IO) -> int | None:
    """The recorded cutover index, or None when there is none; KeyStoreCorruptError for a
    damaged file."""
    remove_stale_temp_files(data_dir, CUTOVER_FILE, file_io=file_io)
    path = os.path.join(data_dir, CUTOVER_FILE)
    data = read_file_if_exists(path, file_io=file_io)
    if data is None:
        return None
    if len(data) != _CUTOVER.size + _CRC.size:
        raise KeyStoreCorruptError(f"{path}: {len(data)} bytes")
    body, (crc,) = data[: _CUTOVER.size], _CRC.unpack_from(data, _CUTOVER.size)
    magic, version, index = _CUTOVER.unpack(body)
    if zlib.crc32(body) != crc or magic != _MAGIC or version != 1:
        raise KeyStoreCorruptError(f"{path}: checksum, magic or version mismatch")
    return int(index)
