"""The wrapped-payload wire layout and the AES-256-GCM seal/open primitives.

Layout (all integers big-endian)::

    offset  size  field
    0       1     version (1)
    1       1     flag (0; any other value is rejected as an unsupported version)
    2       4     key id (u32; 0 is reserved and never names a key)
    6       12    nonce
    18      n+16  AES-256-GCM ciphertext of the n plaintext bytes, then the 16-byte tag

The header is 18 bytes and the overhead 34, so anything shorter than 34 bytes is
:class:`EnvelopeShortError`. The additional authenticated data is the 6 bytes
``b"R" | version | key id``: re-labelling an envelope with another key id or version fails the
tag check. The flag byte is not authenticated, which is why only the value 0 is accepted.

Everything here is pure (no I/O, no state): the key store supplies keys, the nonce source
supplies nonces, :class:`~trio_raft.envelope.cipher.Cipher` combines them.
"""

from __future__ import annotations

import struct

import attrs
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from trio_raft.errors import (
    BadNonceSizeError,
    EnvelopeShortError,
    EnvelopeVersionError,
    IntegrityError,
    ReservedKeyIDError,
)

VERSION = 0x01
FLAG = 0x00
NONCE_SIZE = 12
TAG_SIZE = 16
KEY_SIZE = 32
_HEADER = struct.Struct(">BBI")
HEADER_SIZE = _HEADER.size + NONCE_SIZE  # 18
OVERHEAD = HEADER_SIZE + TAG_SIZE  # 34
MAX_KEY_ID = 0xFFFFFFFF
_AAD = struct.Struct(">cBI")


@attrs.frozen
class Envelope:
    """A parsed wrapped payload (``ciphertext`` includes the trailing tag)."""

    key_id: int
    nonce: bytes
    ciphertext: bytes
    version: int = VERSION
    flag: int = FLAG

    def encode(self) -> bytes:
        return _HEADER.pack(self.version, self.flag, self.key_id) + self.nonce + self.ciphertext


def aad(version: int, key_id: int) -> bytes:
    """The 6 authenticated bytes: ``'R' | version | key id``."""
    return _AAD.pack(b"R", version, key_id)


def header(key_id: int) -> bytes:
    """The first 6 bytes of an envelope of this version under ``key_id``."""
    return _HEADER.pack(VERSION, FLAG, key_id)


def check_key_id(key_id: int) -> None:
    if key_id == 0:
        raise ReservedKeyIDError()
    if not 0 < key_id <= MAX_KEY_ID:
        raise ValueError(f"key id {key_id} does not fit in u32")


def parse(data: bytes) -> Envelope:
    """Split a wrapped payload into its fields (no cryptography)."""
    if len(data) < OVERHEAD:
        raise EnvelopeShortError(f"{len(data)} bytes, at least {OVERHEAD} needed")
    version, flag, key_id = _HEADER.unpack_from(data)
    if version != VERSION:
        raise EnvelopeVersionError(f"version {version}")
    if flag != FLAG:
        raise EnvelopeVersionError(f"flag {flag:#04x}")
    nonce = bytes(data[_HEADER.size:HEADER_SIZE])
    return Envelope(key_id, nonce, bytes(data[HEADER_SIZE:]), version, flag)


def aead_for(key: bytes | AESGCM) -> AESGCM:
    """An AES-256-GCM object for a 32-byte key (key stores cache these per key id)."""
    if isinstance(key, AESGCM):
        return key
    if len(key) != KEY_SIZE:
        raise ValueError(f"AES-256 key must be {KEY_SIZE} bytes, got {len(key)}")
    return AESGCM(key)


def seal(key: bytes | AESGCM, key_id: int, nonce: bytes, plaintext: bytes) -> bytes:
    """Encrypt ``plaintext`` under ``key`` (AES-256) and return the wrapped payload."""
    check_key_id(key_id)
    if len(nonce) != NONCE_SIZE:
        raise BadNonceSizeError(f"{len(nonce)} bytes, want {NONCE_SIZE}")
    ct = aead_for(key).encrypt(nonce, plaintext, aad(VERSION, key_id))
    return _HEADER.pack(VERSION, FLAG, key_id) + nonce + ct


def open_envelope(env: Envelope, key: bytes | AESGCM) -> bytes:
    """Decrypt a parsed envelope with ``key``; IntegrityError when the tag does not match."""
    check_key_id(env.key_id)
    if len(env.nonce) != NONCE_SIZE:
        raise BadNonceSizeError(f"{len(env.nonce)} bytes, want {NONCE_SIZE}")
    try:
        return aead_for(key).decrypt(env.nonce, env.ciphertext, aad(env.version, env.key_id))
    except InvalidTag:
        raise IntegrityError(f"key id {env.key_id}") from None
