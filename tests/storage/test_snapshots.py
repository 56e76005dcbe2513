"""Snapshot metadata files, their retention, and stale .fsm cleanup."""

from __future__ import annotations

import errno
import os

import pytest

from trio_raft.core.messages import ConfState, Snapshot, SnapshotMetadata
from trio_raft.errors import SnapshotFileError
from trio_raft.storage import snapshots as snaps
from trio_raft.storage.fsm_snapshot import (
    encode_snapshot_token,
    fsm_snapshot_path,
    write_fsm_snapshot_file,
)
from trio_raft.testing.faults import Fault, FaultyFileIO

from .helpers import BytesSnapshot, flip_bit, truncate


def meta(index: int, term: int = 1) -> SnapshotMetadata:
    return SnapshotMetadata(ConfState([1, 2, 3], [4]), index, term)


def save_pair(snap_dir: str, fsm_dir: str, index: int, term: int = 1) -> Snapshot:
    crc = write_fsm_snapshot_file(BytesSnapshot(b"state-%d" % index), fsm_dir, index)
    snap = Snapshot(meta(index, term), encode_snapshot_token(index, crc))
    snaps.Snapshotter(snap_dir).save(snap)
    return snap


def test_snap_file_round_trip(tmp_path) -> None:
    s = snaps.Snapshotter(tmp_path / "snap")
    snap = Snapshot(meta(0x10, 2), b"inline payload")
    path = s.save(snap)
    assert os.path.basename(path) == "0000000000000002-0000000000000010.snap"
    assert s.load(path) == snap
    assert [(f.term, f.index) for f in s.files()] == [(2, 0x10)]
    with pytest.raises(SnapshotFileError, match="empty snapshot"):
        s.save(Snapshot())


@pytest.mark.parametrize("damage,match", [
    (lambda p: flip_bit(p, os.path.getsize(p) - 3), "CRC32C mismatch"),
    (lambda p: truncate(p, os.path.getsize(p) - 1), "does not match file size"),
    (lambda p: truncate(p, 5), "too short"),
    (lambda p: flip_bit(p, 0), "bad magic"),
    (lambda p: flip_bit(p, 4), "unsupported version"),
])
def test_corrupt_snap_files(tmp_path, damage, match: str) -> None:
    s = snaps.Snapshotter(tmp_path)
    path = s.save(Snapshot(meta(5), b"x" * 100))
    damage(path)
    with pytest.raises(SnapshotFileError, match=match):
        s.load(path)


def test_snap_body_that_does_not_decode(tmp_path) -> None:
    import crc32c

    body = b"\x00" * 5
    data = snaps._HEADER.pack(snaps.SNAP_MAGIC, 1, len(body), crc32c.crc32c(body)) + body
    with pytest.raises(SnapshotFileError, match="truncated"):
        snaps.decode_snap_file(data, "x.snap")


def test_snap_name_must_match_contents(tmp_path) -> None:
    s = snaps.Snapshotter(tmp_path)
    path = s.save(Snapshot(meta(5), b"x"))
    os.rename(path, tmp_path / snaps.snap_name(1, 6))
    with pytest.raises(SnapshotFileError, match="does not match its name"):
        s.load(str(tmp_path / snaps.snap_name(1, 6)))


def test_missing_snap_file(tmp_path) -> None:
    with pytest.raises(SnapshotFileError):
        snaps.Snapshotter(tmp_path).load(str(tmp_path / snaps.snap_name(1, 1)))


def test_load_newest_available_skips_invalid_and_corrupt(tmp_path, caplog) -> None:
    s = snaps.Snapshotter(tmp_path)
    for i in (10, 20, 30):
        s.save(Snapshot(meta(i), b"%d" % i))
    flip_bit(tmp_path / snaps.snap_name(1, 20), 20)
    valid = [meta(10), meta(20)]  # 30 is not WAL-valid (commit below it)
    got = s.load_newest_available(valid)
    assert got is not None and got.metadata.index == 10
    assert "skipping unusable snapshot file" in caplog.text
    assert s.load_newest_available([]) is None
    assert s.load_newest_available([meta(30, term=2)]) is None  # term must match too


def test_purge_keeps_newest_three_and_their_fsm(tmp_path) -> None:
    sd, fd = str(tmp_path / "snap"), str(tmp_path / "fsm")
    for i in range(1, 7):
        save_pair(sd, fd, i * 10)
    removed = snaps.purge_old_snapshot_files(sd, fd)
    assert len(removed) == 6
    assert [f.index for f in snaps.Snapshotter(sd).files()] == [40, 50, 60]
    assert sorted(os.listdir(fd)) == [os.path.basename(fsm_snapshot_path(fd, i))
                                      for i in (40, 50, 60)]
    assert snaps.purge_old_snapshot_files(sd, fd) == []


def test_cleanup_stale_fsm_files(tmp_path) -> None:
    sd, fd = str(tmp_path / "snap"), str(tmp_path / "fsm")
    save_pair(sd, fd, 10)
    write_fsm_snapshot_file(BytesSnapshot(b"orphan"), fd, 11)
    open(os.path.join(fd, "000000000000000c-x.fsm.tmp"), "wb").close()
    open(os.path.join(fd, "notes.txt"), "wb").close()
    removed = snaps.cleanup_stale_fsm_files(sd, fd)
    assert sorted(removed) == ["000000000000000b.fsm", "000000000000000c-x.fsm.tmp"]
    assert sorted(os.listdir(fd)) == ["000000000000000a.fsm", "notes.txt"]


def test_prepare_keeps_newest_restorable_wal_valid(tmp_path) -> None:
    sd, fd = str(tmp_path / "snap"), str(tmp_path / "fsm")
    for i in (10, 20, 30):
        save_pair(sd, fd, i)
    snaps.prepare_fsm_snapshot_write(sd, fd, 40, [meta(10), meta(20), meta(30)])
    assert [f.index for f in snaps.Snapshotter(sd).files()] == [30]
    assert os.listdir(fd) == ["000000000000001e.fsm"]


def test_prepare_prefers_restorable_over_newest(tmp_path) -> None:
    sd, fd = str(tmp_path / "snap"), str(tmp_path / "fsm")
    for i in (10, 20, 30):
        save_pair(sd, fd, i)
    flip_bit(fsm_snapshot_path(fd, 30), 0)  # 30's payload is corrupt: not restorable
    snaps.prepare_fsm_snapshot_write(sd, fd, 40, [meta(10), meta(20), meta(30)])
    assert [f.index for f in snaps.Snapshotter(sd).files()] == [20]


def test_prepare_without_restorable_keeps_wal_valid_and_fallbacks(tmp_path) -> None:
    sd, fd = str(tmp_path / "snap"), str(tmp_path / "fsm")
    for i in (10, 20, 30, 40):
        save_pair(sd, fd, i)
    flip_bit(fsm_snapshot_path(fd, 40), 0)
    # only 40 is WAL-valid, and it is not restorable: keep it, plus two restorable ones
    snaps.prepare_fsm_snapshot_write(sd, fd, 50, [meta(40)])
    assert [f.index for f in snaps.Snapshotter(sd).files()] == [20, 30, 40]


def test_prepare_no_wal_everything_valid_and_protected_fsm(tmp_path) -> None:
    sd, fd = str(tmp_path / "snap"), str(tmp_path / "fsm")
    for i in (10, 20):
        save_pair(sd, fd, i)
    write_fsm_snapshot_file(BytesSnapshot(b"received"), fd, 15)  # no .snap: an orphan
    write_fsm_snapshot_file(BytesSnapshot(b"received"), fd, 16)  # protected orphan
    write_fsm_snapshot_file(BytesSnapshot(b"future"), fd, 99)  # at/after next index: kept
    snaps.prepare_fsm_snapshot_write(sd, fd, 30, None, protected=[16])
    assert [f.index for f in snaps.Snapshotter(sd).files()] == [20]
    assert sorted(os.listdir(fd)) == ["0000000000000010.fsm", "0000000000000014.fsm",
                                      "0000000000000063.fsm"]


def test_prepare_single_candidate_is_never_removed(tmp_path) -> None:
    sd, fd = str(tmp_path / "snap"), str(tmp_path / "fsm")
    save_pair(sd, fd, 10)
    flip_bit(fsm_snapshot_path(fd, 10), 0)
    snaps.prepare_fsm_snapshot_write(sd, fd, 20, [])
    assert [f.index for f in snaps.Snapshotter(sd).files()] == [10]


def test_prepare_errors_are_only_warnings(tmp_path, caplog) -> None:
    sd, fd = str(tmp_path / "snap"), str(tmp_path / "fsm")
    fio = FaultyFileIO([Fault("listdir", path=sd, error=errno.EIO, repeat=True)])
    assert snaps.prepare_fsm_snapshot_write(sd, fd, 5, None, file_io=fio) == []
    assert fio.fired()
    assert "Input/output error" in caplog.text and sd in caplog.text
