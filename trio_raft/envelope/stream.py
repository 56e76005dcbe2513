"""Sealed snapshot payloads: a state machine snapshot as a stream of AES-256-GCM chunks.

Once the envelope is on, the engine writes every ``.fsm`` payload (and every backup payload)
through :class:`SealingWriter`, and reads it back through :class:`OpeningReader`. The writer
never holds more than one chunk (plus the caller's own buffer) in memory, the reader one
chunk's plaintext and three sealed chunks (two read ahead). Layout (integers
big-endian; ``docs/formats.md``, sealed payloads)::

    sealed payload := header (58 bytes) | chunk 0 | chunk 1 | ... | chunk n-1
    header := magic "TRSP" | version u8 = 1 | flags u8 = 0 | key id u32 | chunk size u32
              | snapshot index u64 | snapshot term u64 | salt (28 bytes)
    chunk i := AES-256-GCM ciphertext of the chunk's plaintext, then its 16-byte tag

Every chunk but the last holds exactly ``chunk size`` plaintext bytes; the last holds 1 to
``chunk size`` bytes (none only when the whole payload is empty), so a reader that knows the
sealed length (the file's) knows where each chunk ends and which one is last.

Keys and nonces. The chunks are not sealed under the data key itself but under a subkey
``HKDF-SHA256(ikm = data key, salt = salt, info = "trio-raft sealed payload v1" | key id)``.
The salt is a fresh 12-byte nonce from the writer's :class:`~trio_raft.envelope.nonce.NonceSource`
(the same source that never hands out a nonce twice for the node's entries) followed by 16
random bytes. Chunk ``i`` uses the nonce ``0x00000000 | i u64``. The argument that no
``(key, nonce)`` pair is ever used twice: within one payload the chunk numbers differ; two
payloads use the same subkey only if they share data key and salt, and the salt's first part
never repeats for a data key (node prefix, persisted epoch, counter: ``nonce.py``), with 128
random bits on top for a key store rebuilt from scratch. The data key itself never seals a
chunk, so a payload nonce cannot collide with an entry's nonce either.

Authenticated data of chunk ``i``: the 58 header bytes, ``i`` (u64) and a last-chunk flag (u8,
1 for the last chunk). So chunks cannot be reordered (``i``), dropped or cut off at a chunk
boundary (the new last chunk was sealed with flag 0), moved to another snapshot (index and
term are in the header, which the reader also compares with the snapshot it restores), or
relabelled with another key id. A reader never releases a chunk's plaintext before its tag has
verified.

Errors (every one names ``where``, the file): :class:`SealedSnapshotIntegrityError` for
anything damaged, truncated or foreign; :class:`SealedSnapshotKeyError` for a key id the reader
has no key for.
"""

from __future__ import annotations

import functools
import io
import os
import struct
from collections.abc import Callable
from typing import Any, BinaryIO, Protocol, cast

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from trio_raft.envelope.envelope import KEY_SIZE, NONCE_SIZE, TAG_SIZE, check_key_id
from trio_raft.errors import (
    SealedSnapshotIntegrityError,
    SealedSnapshotKeyError,
    UnknownKeyIDError,
)
from trio_raft.storage.readahead import BlockReadAhead
from trio_raft.writeonly import WriteOnlyStream

MAGIC = b"TRSP"
VERSION = 1
SALT_SIZE = 28
_HEADER = struct.Struct(">4sBBIIQQ28s")
HEADER_SIZE = _HEADER.size  # 58
#: Plaintext bytes per chunk written by default (1 MiB).
DEFAULT_CHUNK_SIZE = 1 << 20
#: Largest chunk size a reader accepts (it holds four chunks' worth in memory).
MAX_CHUNK_SIZE = 64 << 20
_INFO = b"trio-raft sealed payload v1"
_CHUNK_AAD = struct.Struct(">QB")
_NONCE_PREFIX = b"\x00\x00\x00\x00"
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
#: Payloads of at least this many chunks are read ahead on a helper thread.
READ_AHEAD_CHUNKS = 3


class RawWriter(Protocol):
    """Where a :class:`SealingWriter` writes: ``write`` consumes (copies or writes out) the
    bytes it is given before it returns; it must not keep the buffer."""

    def write(self, data: Any) -> int: ...


class RawReader(Protocol):
    def read(self, n: int = -1) -> bytes: ...


def is_sealed(prefix: bytes) -> bool:
    """Whether ``prefix`` (the first bytes of a payload) starts like a sealed payload."""
    return bytes(prefix[:4]) == MAGIC


def subkey(dek: bytes, key_id: int, salt: bytes) -> AESGCM:
    """The AES-256-GCM key sealing one payload's chunks (see the module docstring)."""
    if len(dek) != KEY_SIZE:
        raise ValueError(f"a data key is {KEY_SIZE} bytes")
    kdf = HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=salt,
               info=_INFO + _U32.pack(key_id))
    return AESGCM(kdf.derive(dek))


def _nonce(i: int) -> bytes:
    return _NONCE_PREFIX + _U64.pack(i)


class SealingWriter(WriteOnlyStream):
    """A write-only binary stream that seals what it is given into ``out``.

    Give it to ``Snapshot.write_to``, then call :meth:`finish` (which seals the last chunk);
    a payload without :meth:`finish` is incomplete and no reader accepts it. ``nonce`` is a
    fresh 12-byte nonce from the node's nonce source (the first part of the salt).
    """

    def __init__(self, out: RawWriter, *, dek: bytes, key_id: int, nonce: bytes, index: int,
                 term: int, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        check_key_id(key_id)
        if len(nonce) != NONCE_SIZE:
            raise ValueError(f"a nonce is {NONCE_SIZE} bytes")
        if not 0 < chunk_size <= MAX_CHUNK_SIZE:
            raise ValueError(f"chunk size must be in 1..{MAX_CHUNK_SIZE}")
        salt = nonce + os.urandom(SALT_SIZE - NONCE_SIZE)
        self.header = _HEADER.pack(MAGIC, VERSION, 0, key_id, chunk_size, index, term, salt)
        self._aead = subkey(dek, key_id, salt)
        self._out = out
        self._chunk = chunk_size
        self._buf = bytearray()
        #: Where chunks are sealed, reused (grown to the largest chunk so far).
        self._sealed = bytearray()
        #: A full chunk of an immutable ``bytes`` the caller wrote, not sealed yet (it is the
        #: last one unless more follows); ``_buf`` is empty while one is held.
        self._held: memoryview | None = None
        self._next = 0
        #: Plaintext bytes accepted so far.
        self.count = 0
        self.closed = False
        self.finished = False
        out.write(self.header)

    def write(self, data: Any) -> int:
        if self.finished or self.closed:
            raise ValueError("write to a finished sealed payload")
        view = memoryview(data).cast("B")
        n = len(view)
        if not n:
            return 0
        self.count += n
        chunk = self._chunk
        if self._held is not None:  # more follows: the chunk held back is not the last
            self._seal(self._held, last=False)
            self._held = None
        pos = 0
        if self._buf:
            room = chunk - len(self._buf)
            if n <= room:  # still fits (a full buffer may be the last chunk: kept)
                self._buf += view
                return n
            self._buf += view[:room]
            pos = room
            self._seal(memoryview(self._buf), last=False)  # full, and more follows
            self._buf = bytearray()
        # Seal every full chunk that is certainly not the last one straight from ``data``
        # (no copy), and keep the rest (1 to ``chunk`` bytes) for later.
        while n - pos > chunk:
            self._seal(view[pos:pos + chunk], last=False)
            pos += chunk
        rest = view[pos:]
        if len(rest) == chunk and isinstance(view.obj, bytes):
            self._held = rest  # immutable: held back by reference, not copied
        else:
            self._buf += rest
        return n

    def flush(self) -> None:
        pass

    def finish(self) -> None:
        """Seal the last chunk. Idempotent."""
        if self.finished:
            return
        if self._held is not None:
            self._seal(self._held, last=True)
            self._held = None
        else:
            self._seal(memoryview(self._buf), last=True)
        self._buf = bytearray()
        self.finished = True

    def close(self) -> None:
        self.closed = True

    def _seal(self, plain: memoryview, *, last: bool) -> None:
        i = self._next
        aad = self.header + _CHUNK_AAD.pack(i, 1 if last else 0)
        # Into one reused buffer (``out.write`` takes the bytes before it returns): no fresh
        # allocation per chunk, and other threads run while the chunk is encrypted.
        n = len(plain) + TAG_SIZE
        if len(self._sealed) < n:
            self._sealed = bytearray(n)
        sealed = memoryview(self._sealed)[:n]
        self._aead.encrypt_into(_nonce(i), plain, aad, sealed)
        self._out.write(sealed)
        self._next = i + 1


def sealed_size(plain_size: int, chunk_size: int = DEFAULT_CHUNK_SIZE) -> int:
    """The sealed length of ``plain_size`` plaintext bytes."""
    chunks = max(1, -(-plain_size // chunk_size))
    return HEADER_SIZE + plain_size + chunks * TAG_SIZE


class OpeningReader(io.BufferedIOBase):
    """A read-only stream of the plaintext of the sealed payload in ``raw``.

    ``size`` is the sealed length (the reader must know where the payload ends);
    ``keys(key id)`` returns the data key or raises; ``index`` and ``term`` are the snapshot's
    the payload must have been sealed for. The header is read and checked when the reader is
    built. Read it to the end to have every chunk (and the absence of anything after the
    last) verified. It is its own buffer: it holds one chunk's plaintext and hands out slices
    of it (``read``, ``read1``, ``readinto``, ``peek``), so no buffered reader goes on top.
    """

    def __init__(self, raw: RawReader, size: int, *, keys: Callable[[int], bytes], index: int,
                 term: int, where: str, on_failure: Callable[[], None] | None = None) -> None:
        super().__init__()
        self._raw = raw
        self._on_failure = on_failure
        self.where = where
        if size < HEADER_SIZE + TAG_SIZE:
            raise SealedSnapshotIntegrityError(f"{where}: sealed payload of {size} bytes is "
                                               "too short")
        head = self._read_exact(HEADER_SIZE)
        magic, version, flags, key_id, chunk, h_index, h_term, salt = _HEADER.unpack(head)
        if magic != MAGIC or version != VERSION or flags:
            raise SealedSnapshotIntegrityError(
                f"{where}: not a sealed payload of a known version (magic {magic!r}, version "
                f"{version}, flags {flags:#x})")
        if not 0 < chunk <= MAX_CHUNK_SIZE:
            raise SealedSnapshotIntegrityError(f"{where}: impossible chunk size {chunk}")
        if (h_index, h_term) != (index, term):
            raise SealedSnapshotIntegrityError(
                f"{where}: sealed for the snapshot at index {h_index} term {h_term}, not "
                f"index {index} term {term}")
        try:
            check_key_id(key_id)
            dek = keys(key_id)
        except (UnknownKeyIDError, ValueError) as exc:
            raise SealedSnapshotKeyError(f"{where}: sealed under key id {key_id}, which this "
                                         f"node does not have ({exc})") from exc
        self.key_id = key_id
        self.header = head
        self._aead = subkey(dek, key_id, salt)
        body = size - HEADER_SIZE
        full, rest = divmod(body, chunk + TAG_SIZE)
        if rest and rest < TAG_SIZE:
            raise SealedSnapshotIntegrityError(f"{where}: truncated inside a chunk tag")
        self._chunks = full + (1 if rest else 0)
        self._last_len = rest if rest else chunk + TAG_SIZE
        self._chunk_len = chunk + TAG_SIZE
        self._next = 0
        # One chunk's sealed bytes, reused chunk after chunk (allocated to the size the
        # payload needs, never more than one chunk), and the current chunk's plaintext: an
        # immutable ``bytes``, so a read of all of it hands it out without a copy.
        first = self._last_len if self._chunks == 1 else self._chunk_len
        self._plain = b""
        self._pos = 0
        # A payload of several chunks is read ahead on a helper thread, so the page-cache
        # copy of the next chunks overlaps the opening of this one
        # (``trio_raft/storage/readahead.py``; three sealed chunks in memory instead of one).
        self._ahead: BlockReadAhead | None = None
        if self._chunks >= READ_AHEAD_CHUNKS and hasattr(raw, "readinto"):
            self._sealed_buf = bytearray(0)
            # The helper holds the raw reader, not this one (which closes it when collected).
            self._ahead = BlockReadAhead(functools.partial(_fill, raw, where), self._chunks,
                                         self._chunk_len, self._last_len,
                                         name="trio-raft-sealed-read")
        else:
            self._sealed_buf = bytearray(first)

    def close(self) -> None:
        if self._ahead is not None:
            self._ahead.close()  # the raw reader is the caller's again once this returns
        super().close()

    def readable(self) -> bool:
        return True

    def _available(self) -> int:
        """Bytes of the current chunk not handed out yet, opening the next chunk when it is
        used up (0 at the end of the payload)."""
        if self.closed:
            raise ValueError("read from a closed sealed payload reader")
        while self._pos >= len(self._plain):
            if self._next >= self._chunks:
                return 0
            self._open_next()
        return len(self._plain) - self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        got = 0
        while got < len(view):
            n = self._take_into(view[got:])
            if not n:
                break
            got += n
        return got

    def readinto1(self, buffer: Any) -> int:
        return self._take_into(memoryview(buffer).cast("B"))

    def _take_into(self, view: memoryview) -> int:
        n = min(len(view), self._available())
        view[:n] = memoryview(self._plain)[self._pos:self._pos + n]
        self._pos += n
        return n

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            parts: list[bytes] = []
            while self._available():
                parts.append(self._plain[self._pos:])
                self._pos = len(self._plain)
            return b"".join(parts)
        if size <= self._available():  # within the current chunk: a slice (all of it: no copy)
            out = self._plain[self._pos:self._pos + size]
            self._pos += size
            return out
        buf = bytearray(size)
        return bytes(memoryview(buf)[:self.readinto(buf)])

    def read1(self, size: int = -1) -> bytes:
        n = self._available() if size < 0 else min(size, self._available())
        out = self._plain[self._pos:self._pos + n]
        self._pos += n
        return out

    def peek(self, size: int = 0) -> bytes:
        self._available()
        return self._plain[self._pos:]

    def drain(self) -> None:
        """Verify every chunk left (discarding its plaintext)."""
        while self._next < self._chunks:
            self._open_next()
        self._plain, self._pos = b"", 0

    def _open_next(self) -> None:
        i = self._next
        last = i == self._chunks - 1
        n = self._last_len if last else self._chunk_len
        self._plain = b""
        if self._ahead is not None:
            sealed = self._ahead.next()
        else:
            sealed = memoryview(self._sealed_buf)[:n]
            self._read_into(sealed)
        aad = self.header + _CHUNK_AAD.pack(i, 1 if last else 0)
        try:
            plain = self._aead.decrypt(_nonce(i), sealed, aad)
        except InvalidTag:
            if self._on_failure is not None:
                self._on_failure()
            raise SealedSnapshotIntegrityError(
                f"{self.where}: chunk {i} of {self._chunks} does not verify (damaged, "
                "reordered, truncated, or sealed under other key material)") from None
        self._plain, self._pos = plain, 0
        self._next = i + 1

    def _read_into(self, view: memoryview) -> None:
        """Fill ``view`` from the raw reader (``readinto`` when it has one)."""
        if getattr(self._raw, "readinto", None) is None:
            view[:] = self._read_exact(len(view))
        else:
            _fill(self._raw, self.where, view)

    def _read_exact(self, n: int) -> bytes:
        parts: list[bytes] = []
        left = n
        while left:
            try:
                data = self._raw.read(left)
            except EOFError:
                data = b""
            if not data:
                raise SealedSnapshotIntegrityError(f"{self.where}: sealed payload ends "
                                                   f"{left} bytes early")
            parts.append(data)
            left -= len(data)
        return b"".join(parts)


def _fill(raw: Any, where: str, view: memoryview) -> None:
    """Fill ``view`` with ``raw.readinto``; a payload that ends first is an integrity error."""
    got = 0
    while got < len(view):
        try:
            n = raw.readinto(view[got:])
        except EOFError:
            n = 0
        if not n:
            raise SealedSnapshotIntegrityError(f"{where}: sealed payload ends "
                                               f"{len(view) - got} bytes early")
        got += n


def open_payload(raw: RawReader, size: int, *, keys: Callable[[int], bytes], index: int,
                 term: int, where: str, on_failure: Callable[[], None] | None = None
                 ) -> BinaryIO:
    """A plaintext reader over the sealed payload in ``raw`` (see :class:`OpeningReader`)."""
    return cast(BinaryIO, OpeningReader(raw, size, keys=keys, index=index, term=term,
                                        where=where, on_failure=on_failure))
