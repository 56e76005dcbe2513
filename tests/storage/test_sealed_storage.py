"""Storage with sealed payloads (trio_raft/storage/sealing.py): the envelope records of a
snapshot descriptor, a spool that refuses cleartext above the cutover before writing any of it,
sealed backups verified chunk by chunk and restored only with the key, and the WAL restarted
after a snapshot with nothing older left."""

from __future__ import annotations

import os
from pathlib import Path

import crc32c
import pytest

from tests.transport.snapshot_helpers import ProbedExchange, spools
from trio_raft.core.messages import Entry, EntryType, HardState, SnapshotMetadata
from trio_raft.envelope import Cipher
from trio_raft.errors import (
    SealedSnapshotIntegrityError,
    SealedSnapshotKeyError,
    SealedSnapshotRequiredError,
    SnapshotDescriptorError,
)
from trio_raft.storage import backup as bk
from trio_raft.storage import descriptor as desc
from trio_raft.storage import fsm_snapshot as fsm
from trio_raft.storage.peers import PersistedPeer
from trio_raft.storage.recovery import SNAP_DIR
from trio_raft.storage.restore import restore_backup
from trio_raft.storage.snapshots import Snapshotter
from trio_raft.storage.wal import WAL

from .helpers import BytesSnapshot

SECRET = b"SECRET-PAYLOAD-" * 1000


def envelope(cipher: Cipher, cutover: int = 5) -> desc.EnvelopeState:
    active, keys = cipher.sealed_ring()
    return desc.EnvelopeState(cutover, desc.KeyRing(active, keys), active)


def test_descriptor_carries_the_envelope(cipher: Cipher) -> None:
    env = envelope(cipher)
    d = desc.SnapshotDescriptor(fsm.encode_snapshot_token(9, 123), "abc", (), envelope=env)
    assert desc.decode_descriptor(desc.encode_descriptor(d)).envelope == env
    assert desc.envelope_of(desc.encode_descriptor(d)) == env
    plain = desc.SnapshotDescriptor(fsm.encode_snapshot_token(9, 123), "abc", ())
    assert desc.envelope_of(desc.encode_descriptor(plain)) == desc.NO_ENVELOPE
    for bad in (b"\x00\x00\x00\x02\x00\x01", b"\x00\x00\x00\x01\x00\x01\x00\x00\x00\x01\x00\x05ab",
                b"\x00\x00\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00"):
        with pytest.raises(SnapshotDescriptorError):
            desc.KeyRing.decode(bad)


def test_spool_refuses_cleartext_above_the_cutover_before_writing_it(tmp_path: Path,
                                                                      cipher: Cipher) -> None:
    ex = ProbedExchange(tmp_path / "fsm")
    ex.sealed_required = lambda index: index > 5
    below = ex.begin_incoming(5)  # at the cutover: cleartext is right
    below.write(b"KVS2 cleartext")
    below.finalize(crc32c.crc32c(b"KVS2 cleartext"))
    incoming = ex.begin_incoming(7)
    with pytest.raises(SealedSnapshotRequiredError, match="index 7"):
        incoming.write(SECRET)
    (spool,) = spools(tmp_path / "fsm")
    assert os.path.getsize(tmp_path / "fsm" / spool) == 0  # not one byte reached the disk
    incoming.abort()
    assert spools(tmp_path / "fsm") == []
    # A sealed payload is accepted, even when its magic arrives split across writes.
    sealed = bytearray()

    class Sink:
        def write(self, data: bytes) -> int:
            sealed.extend(data)
            return len(data)

    w = cipher.seal_payload(Sink(), 8, 2)
    w.write(SECRET)
    w.finish()
    ok = ex.begin_incoming(8)
    ok.write(bytes(sealed[:2]))
    ok.write(bytes(sealed[2:]))
    announced = desc.encode_descriptor(desc.SnapshotDescriptor(
        fsm.encode_snapshot_token(8, crc32c.crc32c(bytes(sealed))), "", (),
        envelope=envelope(cipher)))
    data = ok.finalize(crc32c.crc32c(bytes(sealed)), announced)
    assert desc.envelope_of(data).sealed_key_id == 1
    # A sealed-looking payload whose descriptor says it is not sealed is refused too.
    again = ex.begin_incoming(9)
    again.write(bytes(sealed))
    plain = desc.encode_descriptor(desc.SnapshotDescriptor(
        fsm.encode_snapshot_token(9, crc32c.crc32c(bytes(sealed))), "", ()))
    with pytest.raises(SealedSnapshotRequiredError):
        again.finalize(crc32c.crc32c(bytes(sealed)), plain)


def test_sealed_backup_round_trip(tmp_path: Path, cipher: Cipher) -> None:
    path = tmp_path / "b.bak"
    info = bk.BackupInfo(40, 3, "abc", (desc.SnapshotMember(11, "n1", "h:1"),),
                         envelope=envelope(cipher, cutover=20))
    written = bk.write_backup(path, info, BytesSnapshot(SECRET), seal=cipher)
    assert SECRET[:15] not in path.read_bytes()
    got = bk.read_backup_info(path)
    assert got.sealed and got.envelope == info.envelope
    assert bk.verify_backup(path, cipher=cipher) == written
    chunks: list[bytes] = []
    bk.open_sealed_payload(str(path), got, cipher, lambda r: chunks.append(r.read()))
    assert chunks == [SECRET]
    # Damaged inside the sealed stream, CRC fixed: the CRC passes, the chunk's tag does not.
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    body = bytes(raw[:-4])
    bad = tmp_path / "bad.bak"
    bad.write_bytes(body + crc32c.crc32c(body).to_bytes(4, "big"))
    bk.verify_backup(bad)  # framing and CRC only: fine
    with pytest.raises(SealedSnapshotIntegrityError, match=r"bad\.bak"):
        bk.verify_backup(bad, cipher=cipher)
    peers = [PersistedPeer(11, "n1", "h:1")]
    with pytest.raises(SealedSnapshotKeyError, match=r"b\.bak"):
        restore_backup(path, tmp_path / "nocipher", peers)
    assert not (tmp_path / "nocipher").exists()
    restore_backup(path, tmp_path / "restored", peers, cipher=cipher)
    snapper = Snapshotter(str(tmp_path / "restored" / SNAP_DIR))
    snap = snapper.load(snapper.files()[-1].path)
    assert desc.envelope_of(snap.data) == info.envelope
    for dirpath, _dirs, files in os.walk(tmp_path / "restored"):
        for name in files:
            assert SECRET[:15] not in Path(dirpath, name).read_bytes()


def test_wal_restart_after_a_snapshot_keeps_only_what_follows(tmp_path: Path) -> None:
    wal_dir = tmp_path / "wal"
    with WAL.create(wal_dir) as wal:
        entries = [Entry(term=1, index=i, type=EntryType.NORMAL, data=b"OLD-%d" % i)
                   for i in range(1, 11)]
        wal.save(HardState(term=1, vote=0, commit=10), entries)
        meta = SnapshotMetadata(index=6, term=1)
        wal.save_snapshot(meta)
        removed = wal.restart_after(meta)
        assert removed  # every older segment
        contents = wal.read_all(6, 1)
        assert [e.index for e in contents.entries] == [7, 8, 9, 10]
    blob = b"".join(p.read_bytes() for p in wal_dir.iterdir() if p.suffix == ".wal")
    assert b"OLD-5" not in blob and b"OLD-7" in blob
    with WAL.open(wal_dir) as wal:
        contents = wal.read_all(6, 1)
        assert [e.index for e in contents.entries] == [7, 8, 9, 10]
        assert contents.hard_state.commit == 10
