"""The cluster id file ``trio-raft-cluster-id.bin`` (docs/storage.md section 5a).

A cluster id is a random 32-hex-digit id (:func:`new_cluster_id`, uuid4) naming one history
of one cluster: every member holds the same one. It is chosen when a history starts (a
single-voter bootstrap, a single-voter restore from a backup, a recovery from a lost quorum)
or, when several voters start one together, by their first leader through the log
(``trio_raft/engine/identity.py``); a data dir that has none adopts the first one it learns
(from the log or from an installed snapshot). The engine compares it with the id the state
machine's own store reports before it skips a snapshot restore.

Layout (integers big-endian)::

    b"TRCI" | version u8 = 1 | length u8 | id (ASCII) | CRC32C u32 of everything before

Written atomically (temporary file, fsync, rename, directory fsync) through the file-I/O seam;
a damaged file is :class:`~trio_raft.errors.ClusterIdFileError`, never silently ignored.
"""

from __future__ import annotations

import os
import struct
import uuid

import crc32c as _crc32c

from trio_raft.errors import ClusterIdFileError, SnapshotDescriptorError
from trio_raft.storage.descriptor import check_cluster_id
from trio_raft.storage.fileio import OS_FILE_IO, FileIO
from trio_raft.storage.fileutil import read_file_if_exists, remove_stale_temp_files, replace_file

CLUSTER_ID_FILE = "trio-raft-cluster-id.bin"
_MAGIC = b"TRCI"
_HEAD = struct.Struct(">4sBB")
_CRC = struct.Struct(">I")


def new_cluster_id() -> str:
    """A fresh random cluster id (uuid4, 32 lowercase hex digits)."""
    return uuid.uuid4().hex


def cluster_id_path(data_dir: str | os.PathLike[str]) -> str:
    return os.path.join(os.fspath(data_dir), CLUSTER_ID_FILE)


def encode_cluster_id(cluster_id: str) -> bytes:
    try:
        raw = check_cluster_id(cluster_id).encode("ascii")
    except SnapshotDescriptorError as exc:
        raise ValueError(str(exc)) from None
    body = _HEAD.pack(_MAGIC, 1, len(raw)) + raw
    return body + _CRC.pack(_crc32c.crc32c(body))


def decode_cluster_id(data: bytes, path: str = "<cluster id>") -> str:
    if len(data) < _HEAD.size + _CRC.size:
        raise ClusterIdFileError(f"{path}: {len(data)} bytes")
    magic, version, n = _HEAD.unpack_from(data)
    if magic != _MAGIC or version != 1:
        raise ClusterIdFileError(f"{path}: bad magic or version")
    if len(data) != _HEAD.size + n + _CRC.size:
        raise ClusterIdFileError(f"{path}: length {n} does not match the file size")
    (crc,) = _CRC.unpack_from(data, _HEAD.size + n)
    if _crc32c.crc32c(data[: _HEAD.size + n]) != crc:
        raise ClusterIdFileError(f"{path}: CRC32C mismatch")
    try:
        return check_cluster_id(data[_HEAD.size:_HEAD.size + n].decode("ascii"))
    except (UnicodeDecodeError, SnapshotDescriptorError):
        raise ClusterIdFileError(f"{path}: not a valid cluster id") from None


def save_cluster_id(data_dir: str | os.PathLike[str], cluster_id: str, *,
                    file_io: FileIO = OS_FILE_IO) -> None:
    """Record ``cluster_id`` for ``data_dir``, replacing any earlier file atomically."""
    replace_file(cluster_id_path(data_dir), encode_cluster_id(cluster_id), file_io=file_io)


def load_cluster_id(data_dir: str | os.PathLike[str], *,
                    file_io: FileIO = OS_FILE_IO) -> str | None:
    """The recorded cluster id, or None when the data dir has none (an older data dir, or a
    history whose id has not been chosen yet)."""
    data_dir = os.fspath(data_dir)
    remove_stale_temp_files(data_dir, CLUSTER_ID_FILE, file_io=file_io)
    path = cluster_id_path(data_dir)
    data = read_file_if_exists(path, file_io=file_io)
    return None if data is None else decode_cluster_id(data, path)
