"""Nonces that never repeat for a key: ``node prefix | epoch | counter``.

A 12-byte AES-GCM nonce is built from three big-endian u32 fields:

* **node prefix**: the node's 64-bit id folded to 32 bits (high half XOR low half), so two nodes
  wrapping under the same key use disjoint nonce spaces;
* **epoch**: a counter persisted in ``nonce-epoch.bin`` next to the key store and bumped (written
  durably, under an exclusive file lock) every time a :class:`NonceSource` is opened, *before* any
  nonce of that epoch is handed out; a crash can waste an epoch but never reuse one. A fresh
  state file starts at a random epoch below 2**31, so a key store rebuilt from scratch and
  re-provisioned with an old key is very unlikely to land on epochs that key already used;
* **counter**: in memory, from 0; when it runs out the source bumps the epoch again.

The state file is ``magic "TRNE" | version u8 | epoch u32 | crc32 u32``; a damaged file is an
error (never silently reset, which could repeat nonces).
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import os
import secrets
import struct
import threading
import zlib
from collections.abc import Iterator

from trio_raft.envelope.errors import KeyStoreCorruptError, NonceExhaustedError
from trio_raft.storage.fileutil import make_dirs, replace_file

log = logging.getLogger(__name__)

NONCE_FILE = "nonce-epoch.bin"
LOCK_FILE = "LOCK"
_MAGIC = b"TRNE"
_STATE = struct.Struct(">4sBI")
_CRC = struct.Struct(">I")
_EPOCH = struct.Struct(">II")
_U32_BYTES = struct.Struct(">I")
_U32 = 0xFFFFFFFF


def node_prefix(node_id: int) -> int:
    """Fold a 64-bit node id into the nonce's 32-bit node field."""
    return ((node_id >> 32) ^ node_id) & _U32


def encode_state(epoch: int) -> bytes:
    body = _STATE.pack(_MAGIC, 1, epoch)
    return body + _CRC.pack(zlib.crc32(body))


def decode_state(data: bytes, path: str) -> int:
    if len(data) != _STATE.size + _CRC.size:
        raise KeyStoreCorruptError(f"{path}: {len(data)} bytes")
    body, (crc,) = data[: _STATE.size], _CRC.unpack_from(data, _STATE.size)
    if zlib.crc32(body) != crc:
        raise KeyStoreCorruptError(f"{path}: checksum mismatch")
    magic, version, epoch = _STATE.unpack(body)
    if magic != _MAGIC or version != 1:
        raise KeyStoreCorruptError(f"{path}: bad magic or version")
    return int(epoch)


@contextlib.contextmanager
def locked(directory: str) -> Iterator[None]:
    """Exclusive advisory lock on ``directory/LOCK`` (serialises epoch bumps across processes)."""
    fd = os.open(os.path.join(directory, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def bump_epoch(directory: str) -> int:
    """Durably advance the epoch in ``directory`` and return the new value."""
    make_dirs(directory)
    path = os.path.join(directory, NONCE_FILE)
    with locked(directory):
        try:
            with open(path, "rb") as f:
                epoch = decode_state(f.read(), path) + 1
        except FileNotFoundError:
            epoch = 1 + secrets.randbelow(1 << 31)
        if epoch > _U32:
            raise NonceExhaustedError(path)
        replace_file(path, encode_state(epoch))
    return epoch


class NonceSource:
    """Hands out unique 12-byte nonces for one node (thread-safe).

    The hot path takes no lock: ``next`` on an ``itertools.count`` is atomic in CPython, and
    each counter belongs to one epoch (``_state`` pairs them, replaced as one attribute), so a
    (epoch, counter) pair is never handed out twice. Running out of counter values takes the
    lock to bump the epoch once.
    """

    def __init__(self, node_id: int, epoch: int, directory: str | None = None, *,
                 first_counter: int = 0) -> None:
        self.prefix = node_prefix(node_id)
        self._directory = directory
        self._lock = threading.Lock()
        self._state = (_EPOCH.pack(self.prefix, epoch), epoch, itertools.count(first_counter))

    @property
    def epoch(self) -> int:
        return self._state[1]

    @classmethod
    def open(cls, directory: str | os.PathLike[str], node_id: int) -> NonceSource:
        directory = os.fspath(directory)
        epoch = bump_epoch(directory)
        log.info("nonce source for node prefix %08x opened at epoch %d", node_prefix(node_id),
                 epoch)
        return cls(node_id, epoch, directory)

    def next(self) -> bytes:
        while True:
            state = self._state
            n = next(state[2])
            if n <= _U32:
                return state[0] + _U32_BYTES.pack(n)
            self._next_epoch(state)

    def _next_epoch(self, exhausted: tuple[bytes, int, itertools.count[int]]) -> None:
        with self._lock:
            if self._state is not exhausted:
                return  # another thread bumped it meanwhile
            if self._directory is None:
                raise NonceExhaustedError("counter exhausted and no state directory")
            epoch = bump_epoch(self._directory)
            self._state = (_EPOCH.pack(self.prefix, epoch), epoch, itertools.count())
