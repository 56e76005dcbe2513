"""Key store (KEK-sealed DEKs), KEK sources, nonce uniqueness across restarts, control records."""

from __future__ import annotations

import base64
import os
import struct
import threading

import pytest

from trio_raft import errors
from trio_raft.envelope import (
    KEK,
    Cipher,
    ControlRecord,
    KEKError,
    KeyConflictError,
    KeyStore,
    KeyStoreCorruptError,
    NonceSource,
    Opcode,
    decode_control,
    is_control,
    open_dek,
    parse,
    seal_dek,
)
from trio_raft.envelope.keystore import KEY_FILE
from trio_raft.envelope.nonce import NONCE_FILE


def test_store_persists_keys_sealed_and_reopens(tmp_path, kek):
    d = tmp_path / "keys"
    store = KeyStore.open(d, kek)
    dek = os.urandom(32)
    assert store.install(1, dek)
    assert not store.install(1, dek)  # idempotent
    store.install(2, os.urandom(32), activate=False)
    raw = (d / KEY_FILE).read_bytes()
    assert dek not in raw  # only sealed on disk
    again = KeyStore.open(d, kek)
    assert again.key_ids() == [1, 2]
    assert again.active_key_id == 1
    assert again.key_bytes(1) == dek


def test_wrong_kek_fails_clearly(tmp_path, kek):
    d = tmp_path / "keys"
    KeyStore.open(d, kek).install(1, os.urandom(32))
    with pytest.raises(KEKError, match=r"does not match the key store .*keys\.bin"):
        KeyStore.open(d, KEK.generate())
    sealed = seal_dek(kek, 3, os.urandom(32))
    with pytest.raises(KEKError, match="key id 3"):
        open_dek(KEK.generate(), 3, sealed)
    assert isinstance(KEKError(), errors.EnvelopeError)


def test_sealed_dek_is_bound_to_its_key_id(kek):
    sealed = seal_dek(kek, 3, os.urandom(32))
    with pytest.raises(KeyStoreCorruptError, match="another key id"):
        open_dek(kek, 4, sealed)


def test_corrupt_store(tmp_path, kek):
    d = tmp_path / "keys"
    KeyStore.open(d, kek).install(1, os.urandom(32))
    path = d / KEY_FILE
    data = bytearray(path.read_bytes())
    data[20] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(KeyStoreCorruptError, match="checksum"):
        KeyStore.open(d, kek)


def test_key_conflict(kek):
    store = KeyStore(kek)
    store.install(1, bytes(32))
    with pytest.raises(KeyConflictError):
        store.install(1, bytes([1]) * 32)


def test_kek_sources(tmp_path, monkeypatch):
    key = os.urandom(32)
    raw = tmp_path / "raw.kek"
    raw.write_bytes(key)
    hexf = tmp_path / "hex.kek"
    hexf.write_text(key.hex() + "\n")
    raw.chmod(0o600)
    hexf.chmod(0o400)
    assert KEK.from_file(raw).key == key
    assert KEK.from_file(hexf).key == key
    monkeypatch.setenv("TEST_KEK", base64.b64encode(key).decode())
    k = KEK.from_env("TEST_KEK")
    assert k.key == key and "TEST_KEK" in k.source
    assert key.hex() not in repr(k)
    monkeypatch.delenv("TEST_KEK")
    with pytest.raises(KEKError, match="TEST_KEK is not set"):
        KEK.from_env("TEST_KEK")
    bad = tmp_path / "bad.kek"
    bad.write_text("too short")
    bad.chmod(0o600)
    with pytest.raises(KEKError, match=str(bad)):
        KEK.from_file(bad)
    with pytest.raises(KEKError, match="cannot read"):
        KEK.from_file(tmp_path / "missing.kek")


def test_kek_file_must_not_live_in_the_key_store(tmp_path):
    d = tmp_path / "keys"
    d.mkdir()
    (d / "kek").write_bytes(os.urandom(32))
    (d / "kek").chmod(0o600)
    with pytest.raises(KEKError, match="must not live inside"):
        KeyStore.open(d, KEK.from_file(d / "kek"))


def test_nonces_never_repeat_across_restarts(tmp_path, kek):
    d = tmp_path / "keys"
    seen: set[bytes] = set()
    epochs = []
    for _ in range(5):
        c = Cipher.open(d, kek, node_id=42)
        if not c.active_key_id:
            c.keystore.install(1, os.urandom(32))  # type: ignore[union-attr]
        assert c.nonces is not None
        epochs.append(c.nonces.epoch)
        for _ in range(200):
            n = parse(c.wrap(b"x")).nonce
            assert n not in seen
            seen.add(n)
    assert len(seen) == 1000
    assert epochs == list(range(epochs[0], epochs[0] + 5))
    # Another node sharing the key uses a disjoint prefix.
    other = NonceSource(node_id=43, epoch=epochs[0])
    assert other.next()[:4] != NonceSource(node_id=42, epoch=epochs[0]).next()[:4]


def test_counter_exhaustion_bumps_the_persisted_epoch(tmp_path):
    first = NonceSource.open(tmp_path, node_id=1).epoch
    src = NonceSource(1, first, str(tmp_path), first_counter=0xFFFFFFFF)
    last = src.next()
    nxt = src.next()
    assert struct.unpack(">III", last)[1:] == (first, 0xFFFFFFFF)
    assert struct.unpack(">III", nxt)[1:] == (first + 1, 0)
    assert NonceSource.open(tmp_path, node_id=1).epoch == first + 2


def test_threads_drawing_across_an_epoch_bump_never_share_a_nonce(tmp_path):
    first = NonceSource.open(tmp_path, node_id=1).epoch
    src = NonceSource(1, first, str(tmp_path), first_counter=0xFFFFFFFF - 2000)
    drawn: list[list[bytes]] = [[] for _ in range(4)]

    def draw(out: list[bytes]) -> None:
        for _ in range(1500):
            out.append(src.next())

    threads = [threading.Thread(target=draw, args=(out,)) for out in drawn]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [n for out in drawn for n in out]
    assert len(set(every)) == len(every) == 6000
    epochs = {struct.unpack(">III", n)[1] for n in every}
    assert epochs == {first, first + 1}  # exactly one bump, however the threads raced
    assert NonceSource.open(tmp_path, node_id=1).epoch == first + 2


def test_corrupt_nonce_state_is_an_error_not_a_reset(tmp_path):
    NonceSource.open(tmp_path, node_id=1)
    path = tmp_path / NONCE_FILE
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(KeyStoreCorruptError):
        NonceSource.open(tmp_path, node_id=1)


def test_control_records(kek):
    sealed = seal_dek(kek, 5, os.urandom(32))
    rec = ControlRecord(Opcode.ROTATE, 5, sealed)
    blob = rec.encode()
    assert blob[0] == 0xE1 and blob[1:6] == b"TRENV"
    assert is_control(blob)
    assert decode_control(blob) == rec
    assert not is_control(b"\xe1TRENx")
    assert not is_control(b"\x01" + blob[1:])
    with pytest.raises(KeyStoreCorruptError):
        decode_control(blob[:-1])


def test_counts_are_exact_across_threads_that_come_and_go(tmp_path, kek):
    c = Cipher.open(tmp_path, kek, node_id=7)
    assert c.keystore is not None
    c.keystore.install(1, os.urandom(32))
    blob = c.wrap(b"x")

    def work() -> None:
        for _ in range(300):
            assert c.unwrap(c.wrap(b"payload")) == b"payload"
        with pytest.raises(errors.RaftError):
            c.unwrap(blob[:-1] + bytes([blob[-1] ^ 1]))

    for _ in range(3):  # threads end between rounds: their tallies are kept
        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        mid = c.counters()  # read while they run: never more than was done
        assert mid.wraps <= 1 + 3 * 4 * 300
        for t in threads:
            t.join()
    counts = c.counters()
    assert (counts.wraps, counts.unwraps, counts.unwrap_failures) == (1 + 3600, 3600, 12)
    assert counts.wrap_failures == 0


def test_wrap_follows_the_active_key_through_installs_and_activations(tmp_path, kek):
    # ``wrap`` keeps a view of each key between calls (``Cipher._hot``): every change of the
    # active key, or of its material, must reach the next envelope.
    c = Cipher.open(tmp_path, kek, node_id=3)
    store = c.keystore
    assert store is not None
    with pytest.raises(errors.UnknownKeyIDError):
        c.wrap(b"no key yet")
    first, second = os.urandom(32), os.urandom(32)
    store.install(1, first)
    assert parse(c.wrap(b"a")).key_id == 1
    store.install(2, second, activate=False)
    assert parse(c.wrap(b"b")).key_id == 1  # installed, not active
    store.activate(2)
    blob = c.wrap(b"c")
    assert parse(blob).key_id == 2
    assert KeyStore(kek, keys={2: second}, active=2).aead(2).decrypt(
        parse(blob).nonce, parse(blob).ciphertext, struct.pack(">cBI", b"R", 1, 2)) == b"c"
    store.activate(1)
    assert parse(c.wrap(b"d")).key_id == 1
    kid, sealed = c.new_sealed_key()  # a rotation arriving through the log
    c.install_sealed(kid, sealed, activate=True)
    assert parse(c.wrap(b"e")).key_id == kid
    assert [c.unwrap(c.wrap(x)) for x in (b"f", b"g")] == [b"f", b"g"]
    counts = c.counters()
    assert (counts.wraps, counts.wrap_failures) == (7, 1)


def test_unwrap_batch_counts_what_opened(tmp_path, kek):
    c = Cipher.open(tmp_path, kek, node_id=4)
    assert c.keystore is not None
    c.keystore.install(1, os.urandom(32))
    good = [c.wrap(bytes([i])) for i in range(5)]
    bad = good[0][:-1] + bytes([good[0][-1] ^ 1])
    out = c.unwrap_batch([(i, b) for i, b in enumerate(good)] + [(9, bad), (10, b"short")])
    assert {i: p for i, (_, p) in out.items()} == {i: bytes([i]) for i in range(5)}
    counts = c.counters()
    assert (counts.unwraps, counts.unwrap_failures) == (5, 0)


def test_wrap_many_is_wrap_in_a_row_with_a_failure_per_payload(tmp_path, kek):
    c = Cipher.open(tmp_path, kek, node_id=5)
    assert c.keystore is not None and c.nonces is not None
    # No key yet: every payload gets wrap's own typed error, and each is counted.
    refused = c.wrap_many([b"a", b"b"])
    assert [type(e) for e in refused] == [errors.UnknownKeyIDError] * 2
    c.keystore.install(1, os.urandom(32))
    blobs = c.wrap_many([b"p%d" % i for i in range(50)])
    assert all(isinstance(b, bytes) for b in blobs)
    assert [c.unwrap(b) for b in blobs] == [b"p%d" % i for i in range(50)]  # type: ignore[arg-type]
    assert len({parse(b).nonce for b in blobs}) == 50  # type: ignore[arg-type]
    assert {parse(b).key_id for b in blobs} == {1}  # type: ignore[arg-type]
    # The counter runs out for good (no state directory to move the epoch): the payloads past
    # the last nonce fail, those before it are wrapped.
    c.nonces = NonceSource(5, 1, None, first_counter=0xFFFFFFFF - 1)
    tail = c.wrap_many([b"x", b"y", b"z"])
    assert [type(t) for t in tail] == [bytes, bytes, errors.NonceExhaustedError]
    counts = c.counters()
    assert (counts.wraps, counts.wrap_failures) == (52, 3)


def test_sealed_dek_is_reused_until_the_kek_changes(tmp_path, kek):
    store = KeyStore.open(tmp_path / "keys", kek)
    dek = os.urandom(32)
    store.install(1, dek)
    first = store.sealed(1)
    assert store.sealed(1) == first  # every snapshot carries the same sealed ring
    assert open_dek(kek, 1, first) == dek
    new_kek = KEK.generate()
    store.rekey(new_kek)
    resealed = store.sealed(1)
    assert resealed != first
    assert open_dek(new_kek, 1, resealed) == dek
    with pytest.raises(KEKError):
        open_dek(kek, 1, resealed)
