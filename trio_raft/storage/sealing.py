"""What storage needs to seal and open state machine payloads (``.fsm`` files, backups).

Storage does not do cryptography. When the envelope is on, the engine hands the storage
functions a :class:`PayloadCipher` (``trio_raft.envelope.Cipher`` is one; the sealed stream
layout is ``trio_raft/envelope/stream.py``, documented in docs/formats.md): writing a payload
then goes through :meth:`PayloadCipher.seal_payload`, and reading one whose descriptor (or
backup header) says it is sealed through :meth:`PayloadCipher.open_payload`. The ``.fsm``
framing does not change: the CRC32C footer and the token cover the sealed bytes, so sending,
receiving and verifying a payload work on it unopened.

Invariant: a payload is read as sealed exactly when its descriptor's SEALED_PAYLOAD record
says so (``descriptor.py``); a sealed payload without a cipher is a
:class:`~trio_raft.errors.SealedSnapshotKeyError` naming the file, never a restore of
ciphertext.
"""

from __future__ import annotations

from typing import Any, BinaryIO, Protocol

from trio_raft.errors import SealedSnapshotKeyError


class SealedWriter(Protocol):
    """A binary writer that seals what it is given; :meth:`finish` seals the last chunk."""

    def write(self, data: Any) -> int: ...

    def finish(self) -> None: ...


class PayloadCipher(Protocol):
    """Seals and opens payloads for one snapshot (index, term) at a time."""

    @property
    def active_key_id(self) -> int: ...

    def seal_payload(self, out: Any, index: int, term: int) -> SealedWriter: ...

    def open_payload(self, raw: Any, size: int, index: int, term: int,
                     where: str) -> BinaryIO: ...


def require_cipher(cipher: PayloadCipher | None, key_id: int, where: str) -> PayloadCipher:
    """``cipher``, or the typed error for a sealed payload that nothing can open."""
    if cipher is None:
        raise SealedSnapshotKeyError(
            f"{where}: the payload is sealed (key id {key_id}) and no raft cipher is wired")
    return cipher


def drain(reader: Any, size: int = 1 << 20) -> None:
    """Read ``reader`` to its end (a sealed reader verifies every chunk as it goes)."""
    while reader.read(size):
        pass
