"""Sealed snapshot payloads (trio_raft/envelope/stream.py): round trips at chunk edges, and
every way of tampering with a sealed stream is a typed error naming the file."""

from __future__ import annotations

import io
import os

import pytest

from trio_raft.envelope import stream
from trio_raft.errors import SealedSnapshotIntegrityError, SealedSnapshotKeyError, UnknownKeyIDError

DEK = bytes(range(32))
OTHER = bytes(reversed(range(32)))
NONCE = b"\x00\x00\x00\x07" + b"\x00" * 8


def keys(key_id: int) -> bytes:
    if key_id == 3:
        return DEK
    if key_id == 4:
        return OTHER
    raise UnknownKeyIDError(f"key id {key_id}")


def seal(plain: bytes, *, chunk: int = 16, index: int = 10, term: int = 2, key_id: int = 3,
         pieces: int = 7) -> bytes:
    out = io.BytesIO()
    w = stream.SealingWriter(out, dek=keys(key_id), key_id=key_id, nonce=NONCE, index=index,
                             term=term, chunk_size=chunk)
    for i in range(0, len(plain), pieces):
        w.write(plain[i:i + pieces])
    w.finish()
    return out.getvalue()


def unseal(sealed: bytes, *, index: int = 10, term: int = 2, where: str = "/x/0a.fsm") -> bytes:
    reader = stream.open_payload(io.BytesIO(sealed), len(sealed), keys=keys, index=index,
                                 term=term, where=where)
    return reader.read()


@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 32, 33, 100])
def test_round_trip_at_chunk_edges(size):
    plain = os.urandom(size)
    sealed = seal(plain)
    assert len(sealed) == stream.sealed_size(size, 16)
    assert stream.is_sealed(sealed)
    assert unseal(sealed) == plain
    if size >= 8:
        assert plain not in sealed


@pytest.mark.parametrize("pieces", [1, 5, 16, 17, 32, 48])
@pytest.mark.parametrize("size", [0, 16, 32, 33, 64, 100])
def test_any_write_pattern_round_trips(size, pieces):
    # Chunk-sized pieces of immutable bytes are held back by reference, the others copied.
    plain = os.urandom(size)
    sealed = seal(plain, pieces=pieces)
    assert len(sealed) == stream.sealed_size(size, 16)
    assert unseal(sealed) == plain


def test_a_mutable_buffer_reused_after_write_is_sealed_as_it_was():
    out = io.BytesIO()
    w = stream.SealingWriter(out, dek=DEK, key_id=3, nonce=NONCE, index=10, term=2,
                             chunk_size=16)
    buf = bytearray(b"a" * 16)
    w.write(buf)
    buf[:] = b"b" * 16
    w.write(buf)
    w.write(b"")
    w.finish()
    assert unseal(out.getvalue()) == b"a" * 16 + b"b" * 16


def test_same_plaintext_never_seals_the_same_way():
    plain = b"a" * 40
    assert seal(plain)[stream.HEADER_SIZE:] != seal(plain)[stream.HEADER_SIZE:]


def _chunks(sealed: bytes, chunk: int = 16) -> tuple[bytes, list[bytes]]:
    head, body = sealed[:stream.HEADER_SIZE], sealed[stream.HEADER_SIZE:]
    step = chunk + 16
    return head, [body[i:i + step] for i in range(0, len(body), step)]


def test_reordered_chunks_are_refused():
    head, chunks = _chunks(seal(os.urandom(48)))
    assert len(chunks) == 3
    swapped = head + chunks[1] + chunks[0] + chunks[2]
    with pytest.raises(SealedSnapshotIntegrityError, match=r"/x/0a\.fsm: chunk 0"):
        unseal(swapped)


def test_dropped_or_truncated_chunks_are_refused():
    head, chunks = _chunks(seal(os.urandom(48)))
    with pytest.raises(SealedSnapshotIntegrityError, match="chunk 1"):
        unseal(head + chunks[0] + chunks[2])  # a middle chunk dropped
    with pytest.raises(SealedSnapshotIntegrityError, match="chunk 1 of 2"):
        unseal(head + chunks[0] + chunks[1])  # cut at a chunk boundary: no last flag
    with pytest.raises(SealedSnapshotIntegrityError):
        unseal(head + chunks[0] + chunks[1] + chunks[2][:-3])  # inside the last tag


def test_flipped_bits_anywhere_are_refused():
    sealed = seal(os.urandom(40))
    for pos in (0, 5, 10, 20, 40, stream.HEADER_SIZE, stream.HEADER_SIZE + 20, len(sealed) - 1):
        damaged = bytearray(sealed)
        damaged[pos] ^= 0x01
        with pytest.raises((SealedSnapshotIntegrityError, SealedSnapshotKeyError)):
            unseal(bytes(damaged))


def test_payload_of_another_snapshot_is_refused():
    sealed = seal(b"state" * 10, index=10, term=2)
    with pytest.raises(SealedSnapshotIntegrityError, match="index 10 term 2, not index 11"):
        unseal(sealed, index=11, term=2)
    with pytest.raises(SealedSnapshotIntegrityError, match="not index 10 term 3"):
        unseal(sealed, index=10, term=3)


def test_unknown_key_and_relabelled_key_id():
    sealed = seal(b"state" * 10)
    relabelled = bytearray(sealed)
    relabelled[6:10] = (4).to_bytes(4, "big")  # key id field: a key that exists
    with pytest.raises(SealedSnapshotIntegrityError, match="chunk 0"):
        unseal(bytes(relabelled))
    relabelled[6:10] = (9).to_bytes(4, "big")
    with pytest.raises(SealedSnapshotKeyError, match="key id 9"):
        unseal(bytes(relabelled))


def test_reader_never_holds_more_than_a_chunk():
    plain = os.urandom(10 * 1024)
    sealed = seal(plain, chunk=1024, pieces=999)
    raw = stream.OpeningReader(io.BytesIO(sealed), len(sealed), keys=keys, index=10, term=2,
                               where="w")
    got = bytearray()
    buf = bytearray(300)
    while n := raw.readinto(buf):
        assert len(raw._plain) <= 1024
        got += buf[:n]
    assert bytes(got) == plain


def test_writer_refuses_bad_arguments():
    with pytest.raises(ValueError):
        stream.SealingWriter(io.BytesIO(), dek=DEK, key_id=3, nonce=b"short", index=1, term=1)
    with pytest.raises(ValueError):
        stream.SealingWriter(io.BytesIO(), dek=DEK, key_id=3, nonce=NONCE, index=1, term=1,
                             chunk_size=0)
    w = stream.SealingWriter(io.BytesIO(), dek=DEK, key_id=3, nonce=NONCE, index=1, term=1)
    w.finish()
    with pytest.raises(ValueError):
        w.write(b"more")


def test_every_way_of_reading_gives_the_plaintext_across_chunks():
    # The reader is its own buffer (one chunk of plaintext): reads of any size, lines,
    # peeks and reads into a buffer cross chunk edges and end exactly at the end.
    plain = b"".join(b"line %03d %s\n" % (i, b"x" * (i % 23)) for i in range(60))
    sealed = seal(plain, chunk=37)

    def reader() -> io.BufferedIOBase:
        r = stream.open_payload(io.BytesIO(sealed), len(sealed), keys=keys, index=10, term=2,
                                where="/x/0a.fsm")
        assert isinstance(r, io.BufferedIOBase)
        return r

    r = reader()
    got = [r.read(1), r.read(5), r.read(80), r.read1(1000)]
    done = len(b"".join(got))
    assert r.peek()[:3] == plain[done:done + 3]  # a peek takes nothing
    buf = bytearray(50)
    got.append(bytes(buf[:r.readinto(buf)]))
    got.append(r.readline())
    got.append(r.read())
    assert b"".join(got) == plain
    assert [len(g) for g in got[:3]] == [1, 5, 80] and got[5].endswith(b"\n")
    assert r.read() == b"" and r.read(10) == b"" and r.readinto(buf) == 0
    assert reader().readlines() == plain.splitlines(keepends=True)
    r7 = reader()
    assert b"".join(iter(lambda: r7.read(7), b"")) == plain
    r = reader()
    r.close()
    with pytest.raises(ValueError):
        r.read(1)
