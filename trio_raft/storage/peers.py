"""The peers file ``trio-raft-peers.bin``: the cluster's members and addresses
(docs/storage.md section 5).

Layout (all integers big-endian)::

    b"TRFP" | version u32 | index u64 | count u32 | peer*
            | [version 3 only: active u8 (0|1) | seed_count u32 | peer*]
    peer := node_id u64 | [version >= 2: suffrage u8 (0 voter, 1 learner)]
            | id_len u32 | id (UTF-8) | addr_len u32 | address (UTF-8)

Versions 1-3 are read (version 1 peers are all voters); version 3 is always written, with peers
sorted by (node_id, id). ``index`` is the raft index of the configuration the file describes and
only moves forward: :func:`save_persisted_peers` with a lower index than the file's is a no-op.
The optional *bootstrap seed* is the peer list a fresh cluster was started with; it stays
``active`` until the configuration stops matching it. Writes are atomic
(:func:`~trio_raft.storage.fileutil.replace_file`): a failed write raises
:class:`~trio_raft.errors.StorageIOError` and leaves the previous file intact and readable.
Every file access goes through the :class:`~trio_raft.storage.fileio.FileIO` passed as
``file_io`` (the real one by default).
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Iterable

import attrs

from trio_raft.errors import PeersFileError
from trio_raft.storage.fileio import OS_FILE_IO, FileIO
from trio_raft.storage.fileutil import (
    make_dirs,
    read_file_if_exists,
    remove_stale_temp_files,
    replace_file,
)

log = logging.getLogger(__name__)

PEERS_FILE_NAME = "trio-raft-peers.bin"
PEERS_MAGIC = b"TRFP"
PEERS_VERSION = 3
MAX_PEERS = 1024
MAX_PEER_STRING = 1 << 20

VOTER = "voter"
LEARNER = "learner"
_SUFFRAGE_BYTES = {VOTER: 0, LEARNER: 1}
_SUFFRAGES = {0: VOTER, 1: LEARNER}

_HEAD = struct.Struct(">4sIQ")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


def _check_suffrage(_inst: object, _attr: object, value: str) -> None:
    if value not in _SUFFRAGE_BYTES:
        raise ValueError(f"suffrage must be 'voter' or 'learner', not {value!r}")


@attrs.frozen(slots=True)
class PersistedPeer:
    """One member as the peers file stores it. ``suffrage`` is ``"voter"`` or ``"learner"``."""

    node_id: int
    id: str
    address: str
    suffrage: str = attrs.field(default=VOTER, validator=_check_suffrage)


@attrs.frozen(slots=True)
class PeersFile:
    index: int
    peers: tuple[PersistedPeer, ...]
    seed: tuple[PersistedPeer, ...] = ()
    seed_active: bool = False
    version: int = PEERS_VERSION


def normalise_peers(peers: Iterable[PersistedPeer]) -> tuple[PersistedPeer, ...]:
    return tuple(sorted(peers, key=lambda p: (p.node_id, p.id)))


# -- encoding -----------------------------------------------------------------------------------


def _encode_peer(p: PersistedPeer, out: bytearray) -> None:
    ident, addr = p.id.encode(), p.address.encode()
    if len(ident) > MAX_PEER_STRING or len(addr) > MAX_PEER_STRING:
        raise PeersFileError(f"peer {p.id!r}: id or address longer than {MAX_PEER_STRING} bytes")
    out += _U64.pack(p.node_id)
    out += bytes((_SUFFRAGE_BYTES[p.suffrage],))
    out += _U32.pack(len(ident)) + ident
    out += _U32.pack(len(addr)) + addr


def encode_peers_file(pf: PeersFile) -> bytes:
    peers, seed = normalise_peers(pf.peers), normalise_peers(pf.seed)
    if len(peers) > MAX_PEERS or len(seed) > MAX_PEERS:
        raise PeersFileError(f"more than {MAX_PEERS} peers")
    out = bytearray(_HEAD.pack(PEERS_MAGIC, PEERS_VERSION, pf.index))
    out += _U32.pack(len(peers))
    for p in peers:
        _encode_peer(p, out)
    out += bytes((1 if pf.seed_active else 0,))
    out += _U32.pack(len(seed))
    for p in seed:
        _encode_peer(p, out)
    return bytes(out)


class _Cursor:
    def __init__(self, data: bytes, path: str) -> None:
        self.data, self.pos, self.path = data, 0, path

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.data):
            raise PeersFileError(f"peers file {self.path}: truncated {what} at offset {self.pos}")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u32(self, what: str) -> int:
        return int(_U32.unpack(self.take(4, what))[0])

    def u64(self, what: str) -> int:
        return int(_U64.unpack(self.take(8, what))[0])

    def string(self, what: str) -> str:
        n = self.u32(what + " length")
        if n > MAX_PEER_STRING:
            raise PeersFileError(f"peers file {self.path}: {what} length {n} exceeds limit")
        try:
            return self.take(n, what).decode()
        except UnicodeDecodeError:
            raise PeersFileError(f"peers file {self.path}: {what} is not UTF-8") from None

    def peers(self, version: int, what: str) -> tuple[PersistedPeer, ...]:
        count = self.u32(what + " count")
        if count > MAX_PEERS:
            raise PeersFileError(f"peers file {self.path}: {count} {what} exceed {MAX_PEERS}")
        out = []
        for _ in range(count):
            node_id = self.u64("node id")
            suffrage = VOTER
            if version >= 2:
                b = self.u8("suffrage")
                if b not in _SUFFRAGES:
                    raise PeersFileError(f"peers file {self.path}: unknown peer suffrage byte {b}")
                suffrage = _SUFFRAGES[b]
            ident = self.string("peer id")
            out.append(PersistedPeer(node_id, ident, self.string("peer address"), suffrage))
        return tuple(out)


def decode_peers_file(data: bytes, path: str = "<peers>") -> PeersFile:
    c = _Cursor(data, path)
    magic, version, index = _HEAD.unpack(c.take(_HEAD.size, "header"))
    if magic != PEERS_MAGIC:
        raise PeersFileError(f"peers file {path}: invalid peers magic {magic!r}")
    if version not in (1, 2, 3):
        raise PeersFileError(f"peers file {path}: unsupported peers version {version}")
    peers = c.peers(version, "peers")
    seed: tuple[PersistedPeer, ...] = ()
    active = False
    if version == 3:
        flag = c.u8("seed active flag")
        if flag > 1:
            raise PeersFileError(f"peers file {path}: unknown seed active byte {flag}")
        active = bool(flag)
        seed = c.peers(version, "seed peers")
    if c.pos != len(data):
        raise PeersFileError(f"peers file {path}: {len(data) - c.pos} trailing bytes")
    return PeersFile(index, peers, seed, active, version)


# -- files ------------------------------------------------------------------------------------


def peers_file_path(data_dir: str | os.PathLike[str]) -> str:
    return os.path.join(os.fspath(data_dir), PEERS_FILE_NAME)


def load_persisted_peers(data_dir: str | os.PathLike[str], *,
                         file_io: FileIO = OS_FILE_IO) -> PeersFile | None:
    """The peers file of ``data_dir``, or None when there is none. Stale temp files go."""
    data_dir = os.fspath(data_dir)
    remove_stale_temp_files(data_dir, PEERS_FILE_NAME, file_io=file_io)
    path = peers_file_path(data_dir)
    data = read_file_if_exists(path, file_io=file_io)
    if data is None:
        return None
    return decode_peers_file(data, path)


def _write(data_dir: str, pf: PeersFile, file_io: FileIO) -> None:
    make_dirs(data_dir, file_io=file_io)
    replace_file(peers_file_path(data_dir), encode_peers_file(pf), file_io=file_io)


def save_persisted_peers(data_dir: str | os.PathLike[str], index: int,
                         peers: Iterable[PersistedPeer],
                         seed: Iterable[PersistedPeer] | None = None, *,
                         file_io: FileIO = OS_FILE_IO) -> bool:
    """Write the peers at ``index`` unless the file already holds a higher index.

    An existing file's seed is carried over, and deactivated once ``peers`` no longer equal it.
    With no file, a given ``seed`` is stored as active. Returns whether the file was written.
    """
    data_dir = os.fspath(data_dir)
    new_peers = normalise_peers(peers)
    current = load_persisted_peers(data_dir, file_io=file_io)
    if current is not None:
        if current.index > index:
            log.debug("peers file at index %d is newer than %d; not written",
                      current.index, index)
            return False
        seed_peers, active = current.seed, current.seed_active
        if active and normalise_peers(seed_peers) != new_peers:
            active = False
    else:
        seed_peers = normalise_peers(seed) if seed is not None else ()
        active = bool(seed_peers)
    _write(data_dir, PeersFile(index, new_peers, seed_peers, active), file_io)
    return True


def write_current_persisted_peers(data_dir: str | os.PathLike[str], index: int,
                                  peers: Iterable[PersistedPeer], *,
                                  file_io: FileIO = OS_FILE_IO) -> None:
    """Always write ``peers`` at ``index`` (an applied conf change); the seed is deactivated."""
    data_dir = os.fspath(data_dir)
    current = load_persisted_peers(data_dir, file_io=file_io)
    seed = current.seed if current is not None else ()
    _write(data_dir, PeersFile(index, normalise_peers(peers), seed, False), file_io)
