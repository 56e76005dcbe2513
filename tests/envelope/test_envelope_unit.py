"""The wire layout and every envelope error."""

from __future__ import annotations

import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from trio_raft import errors
from trio_raft.envelope import OVERHEAD, Cipher, KeyStore, NonceSource, parse, seal
from trio_raft.envelope import envelope as env

KEY = bytes(range(32))
NONCE = bytes(12)


def test_layout_and_roundtrip():
    blob = seal(KEY, 7, NONCE, b"hello")
    assert len(blob) == len(b"hello") + OVERHEAD == 5 + 34
    version, flag, key_id = struct.unpack_from(">BBI", blob)
    assert (version, flag, key_id) == (1, 0, 7)
    assert blob[6:18] == NONCE
    e = parse(blob)
    assert e.key_id == 7 and e.nonce == NONCE and len(e.ciphertext) == 5 + 16
    assert env.open_envelope(e, KEY) == b"hello"
    assert e.encode() == blob
    # AAD is 'R' | version | key id: exactly what the library authenticates.
    assert env.aad(1, 7) == b"R\x01\x00\x00\x00\x07"
    assert AESGCM(KEY).decrypt(NONCE, blob[18:], env.aad(1, 7)) == b"hello"


def test_empty_plaintext_is_exactly_the_overhead():
    blob = seal(KEY, 1, NONCE, b"")
    assert len(blob) == OVERHEAD
    assert env.open_envelope(parse(blob), KEY) == b""


@pytest.mark.parametrize("n", [0, 1, 17, 18, 33])
def test_short(n):
    with pytest.raises(errors.EnvelopeShortError):
        parse(bytes([1]) + bytes(max(0, n - 1)))


def test_version_and_flag():
    blob = bytearray(seal(KEY, 1, NONCE, b"x"))
    blob[0] = 2
    with pytest.raises(errors.EnvelopeVersionError, match="version 2"):
        parse(bytes(blob))
    blob[0] = 1
    blob[1] = 0x80
    with pytest.raises(errors.EnvelopeVersionError, match="flag"):
        parse(bytes(blob))


def test_reserved_key_id():
    with pytest.raises(errors.ReservedKeyIDError):
        seal(KEY, 0, NONCE, b"x")
    blob = bytearray(seal(KEY, 1, NONCE, b"x"))
    blob[2:6] = bytes(4)
    with pytest.raises(errors.ReservedKeyIDError):
        env.open_envelope(parse(bytes(blob)), KEY)
    store = KeyStore(kek=_kek())
    with pytest.raises(errors.ReservedKeyIDError):
        store.aead(0)


def test_bad_nonce_size():
    for n in (0, 8, 11, 13, 24):
        with pytest.raises(errors.BadNonceSizeError):
            seal(KEY, 1, bytes(n), b"x")
    with pytest.raises(errors.BadNonceSizeError):
        env.open_envelope(env.Envelope(1, bytes(8), bytes(20)), KEY)


def test_integrity_every_bit_of_nonce_and_ciphertext():
    blob = seal(KEY, 3, NONCE, b"payload bytes")
    for i in range(6, len(blob)):
        for bit in (0, 7):
            bad = bytearray(blob)
            bad[i] ^= 1 << bit
            with pytest.raises(errors.IntegrityError):
                env.open_envelope(parse(bytes(bad)), KEY)


def test_aad_binds_key_id():
    """Re-labelling an envelope with another key id that *holds the same key* still fails."""
    store = KeyStore(_kek(), keys={1: KEY, 2: KEY}, active=1)
    c = Cipher(store, NonceSource(node_id=1, epoch=1))
    blob = bytearray(c.wrap(b"secret"))
    blob[5] = 2
    with pytest.raises(errors.IntegrityError):
        c.unwrap(bytes(blob))


def test_unknown_key_id():
    store = KeyStore(_kek(), keys={1: KEY}, active=1)
    c = Cipher(store, NonceSource(node_id=1, epoch=1))
    other = seal(bytes(32), 9, NONCE, b"x")
    with pytest.raises(errors.UnknownKeyIDError, match="key id 9"):
        c.unwrap(other)
    with pytest.raises(errors.UnknownKeyIDError, match="no active key"):
        Cipher(KeyStore(_kek()), NonceSource(node_id=1, epoch=1)).wrap(b"x")


def test_nil_keystore():
    c = Cipher(None, None)
    with pytest.raises(errors.NilKeystoreError):
        c.wrap(b"x")
    with pytest.raises(errors.NilKeystoreError):
        c.unwrap(seal(KEY, 1, NONCE, b"x"))


def test_errors_are_envelope_errors_and_distinct_from_fatal():
    for cls in (errors.EnvelopeShortError, errors.EnvelopeVersionError, errors.UnknownKeyIDError,
                errors.ReservedKeyIDError, errors.BadNonceSizeError, errors.IntegrityError,
                errors.NilKeystoreError):
        assert issubclass(cls, errors.EnvelopeError)
    assert not issubclass(errors.EnvelopeCutoverInProgressError, errors.RaftUnwrapFailedError)
    assert not issubclass(errors.RaftUnwrapFailedError, errors.EnvelopeCutoverInProgressError)


def test_cipher_roundtrip_uses_fresh_nonces():
    store = KeyStore(_kek(), keys={4: KEY}, active=4)
    c = Cipher(store, NonceSource(node_id=0x1234_5678_9ABC_DEF0, epoch=5))
    blobs = [c.wrap(b"same") for _ in range(100)]
    assert len({parse(b).nonce for b in blobs}) == 100
    assert all(c.unwrap(b) == b"same" for b in blobs)
    assert parse(blobs[0]).nonce == struct.pack(">III", 0x1234_5678 ^ 0x9ABC_DEF0, 5, 0)


def _kek():
    from trio_raft.envelope import KEK

    return KEK(bytes(32), "test")
