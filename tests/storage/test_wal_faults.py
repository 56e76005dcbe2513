"""The WAL under injected disk faults: a typed error, a poisoned WAL, no fsync retried, and a
reopen (with the real seam) that recovers every acknowledged record and nothing torn."""

from __future__ import annotations

import errno
import logging
import os

import pytest

from trio_raft.core.messages import ConfState, Entry, HardState, SnapshotMetadata
from trio_raft.errors import (
    StorageIOError,
    WALError,
    WALIOError,
    WALLockedError,
    WALPoisonedError,
    WALUnrepairableError,
)
from trio_raft.storage.wal import WAL, wal_exists
from trio_raft.testing.faults import Fault, FaultyFileIO

from .helpers import append_bytes


def batch(lo: int, hi: int) -> list[Entry]:
    return [Entry(1, i, data=b"%d-" % i * 20) for i in range(lo, hi + 1)]


def acknowledged_wal(path, fio: FaultyFileIO, *, segment_size: int = 64 << 20,
                     upto: int = 30) -> tuple[WAL, list[Entry]]:
    """A WAL holding entries 1..upto in three acknowledged saves."""
    w = WAL.create(path, b"meta", segment_size=segment_size, file_io=fio)
    acked: list[Entry] = []
    for lo, hi in ((1, 10), (11, 20), (21, upto)):
        w.save(HardState(1, 1, lo - 1), batch(lo, hi))
        acked += batch(lo, hi)
    return w, acked


def reopen(path) -> tuple[list[Entry], HardState]:
    with WAL.open(path) as w:  # the real seam
        c = w.read_all()
    return list(c.entries), c.hard_state


def assert_refuses_everything(w: WAL, fio: FaultyFileIO, cause: WALIOError) -> None:
    """Every later write, sync and purge raises WALPoisonedError without touching the disk."""
    seen = len(fio.calls)
    for call in (lambda: w.save(HardState(1, 1, 1), batch(100, 100)),
                 lambda: w.save(HardState(2, 0, 0)),
                 lambda: w.save_snapshot(SnapshotMetadata(ConfState([1]), 5, 1)),
                 w.sync,
                 w.purge):
        with pytest.raises(WALPoisonedError, match="failed earlier") as info:
            call()
        assert info.value.__cause__ is cause
    w.close()  # a poisoned WAL closes without syncing
    new_ops = {c.op for c in fio.calls[seen:]}
    assert new_ops <= {"close"}, f"the poisoned WAL touched the disk: {new_ops}"
    assert w.failure is cause


@pytest.mark.parametrize("error", [errno.EIO, errno.ENOSPC])
def test_failed_write_is_typed_poisons_and_loses_nothing_acknowledged(tmp_path, error) -> None:
    fio = FaultyFileIO()
    w, acked = acknowledged_wal(tmp_path / "wal", fio)
    fio.add(Fault("write", path="*.wal", error=error))
    with pytest.raises(WALIOError) as info:
        w.save(HardState(1, 1, 30), batch(31, 40))
    err = info.value
    assert isinstance(err, StorageIOError) and isinstance(err, WALError)
    assert (err.op, err.errno) == ("write", error)
    assert err.path.endswith("0000000000000000-0000000000000000.wal")
    assert isinstance(err.__cause__, OSError) and err.__cause__.errno == error
    assert err.path in str(err) and "write" in str(err)
    assert_refuses_everything(w, fio, err)
    entries, hs = reopen(tmp_path / "wal")
    assert entries == acked  # nothing reached the disk: exactly the acknowledged records
    assert hs == HardState(1, 1, 20)


@pytest.mark.parametrize("error", [errno.EIO, errno.ENOSPC])
def test_failed_fdatasync_is_never_retried(tmp_path, error) -> None:
    fio = FaultyFileIO()
    w, acked = acknowledged_wal(tmp_path / "wal", fio)
    fio.add(Fault("fdatasync", error=error))
    with pytest.raises(WALIOError) as info:
        w.save(HardState(1, 1, 30), batch(31, 40))
    assert (info.value.op, info.value.errno) == ("fdatasync", error)
    syncs = len(fio.calls_to("fdatasync")) + len(fio.calls_to("fsync"))
    assert_refuses_everything(w, fio, info.value)
    assert len(fio.calls_to("fdatasync")) + len(fio.calls_to("fsync")) == syncs
    # The batch was written but never acknowledged; a reopen may find it (like a crash after
    # the write), whole or not at all, and always finds everything acknowledged.
    entries, _ = reopen(tmp_path / "wal")
    assert entries[: len(acked)] == acked
    assert entries[len(acked):] in ([], batch(31, 40))


def test_a_short_write_is_completed(tmp_path) -> None:
    fio = FaultyFileIO()
    w, acked = acknowledged_wal(tmp_path / "wal", fio)
    fio.add(Fault("write", path="*.wal", short_write=5))
    before = len(fio.calls_to("write"))
    w.save(HardState(1, 1, 30), batch(31, 40))
    assert len(fio.calls_to("write")) == before + 2  # 5 bytes, then the rest
    w.close()
    entries, hs = reopen(tmp_path / "wal")
    assert entries == acked + batch(31, 40) and hs == HardState(1, 1, 30)


def test_a_short_write_then_enospc_is_reported_and_the_torn_tail_repaired(tmp_path,
                                                                       caplog) -> None:
    fio = FaultyFileIO()
    w, acked = acknowledged_wal(tmp_path / "wal", fio)
    # As on a filling disk: the kernel takes 20 bytes (a record header and a bit), then ENOSPC.
    fio.add(Fault("write", path="*.wal", short_write=20))
    fio.add(Fault("write", path="*.wal", after=1, error=errno.ENOSPC))
    with pytest.raises(WALIOError) as info:
        w.save(HardState(1, 1, 30), batch(31, 40))
    assert info.value.errno == errno.ENOSPC
    assert_refuses_everything(w, fio, info.value)
    with caplog.at_level(logging.WARNING, logger="trio_raft.storage.wal"):
        entries, hs = reopen(tmp_path / "wal")
    assert entries == acked and hs == HardState(1, 1, 20)
    assert "repaired torn tail" in caplog.text and "dropped 20 byte(s)" in caplog.text


# The steps of a segment cut (segment_size=1: every save cuts), and a rule failing each one.
CUT_STEPS = {
    "fdatasync old segment": Fault("fdatasync", path="*.wal", after=1),
    "create new segment": Fault("open", path="*.wal.tmp"),
    "write new segment": Fault("write", path="*.wal.tmp", error=errno.ENOSPC),
    "fsync new segment": Fault("fsync", path="*.wal.tmp"),
    "close new segment": Fault("close", path="*.wal.tmp"),
    "rename new segment": Fault("replace", path="*.wal.tmp"),
    "fsync directory": Fault("fsync", path="*/wal"),
    "open new segment": Fault("open", path="*.wal"),
}


@pytest.mark.parametrize("step", sorted(CUT_STEPS))
def test_failed_segment_cut(tmp_path, step: str) -> None:
    fio = FaultyFileIO()
    w, acked = acknowledged_wal(tmp_path / "wal", fio, segment_size=1)
    segments = len(w.segments)
    fault = fio.add(CUT_STEPS[step])
    with pytest.raises(WALIOError, match="cutting segment") as info:
        w.save(HardState(1, 1, 30), batch(31, 40))
    assert fio.fired(fault)
    assert info.value.errno == fault.error
    assert len(w.segments) == segments
    syncs = len(fio.calls_to("fdatasync")) + len(fio.calls_to("fsync"))
    assert_refuses_everything(w, fio, info.value)
    assert len(fio.calls_to("fdatasync")) + len(fio.calls_to("fsync")) == syncs
    assert not [n for n in os.listdir(tmp_path / "wal") if n.endswith(".tmp")]
    # The batch itself was appended and fdatasynced before the cut started; the failure is
    # still reported (the engine stops), and a reopen finds it whole.
    entries, _ = reopen(tmp_path / "wal")
    assert entries[: len(acked)] == acked
    assert entries[len(acked):] in ([], batch(31, 40))
    with WAL.open(tmp_path / "wal", segment_size=1) as again:  # and the WAL goes on
        again.save(HardState(1, 1, 40), batch(len(entries) + 1, len(entries) + 3))
    assert reopen(tmp_path / "wal")[0][-1].index == len(entries) + 3


@pytest.mark.parametrize("op", ["write", "fdatasync"])
def test_failed_snapshot_marker(tmp_path, op: str) -> None:
    fio = FaultyFileIO()
    w, acked = acknowledged_wal(tmp_path / "wal", fio)
    fio.add(Fault(op, path="*.wal"))
    with pytest.raises(WALIOError) as info:
        w.save_snapshot(SnapshotMetadata(ConfState([1]), 20, 1), HardState(1, 1, 20))
    assert info.value.op == op
    assert_refuses_everything(w, fio, info.value)
    with WAL.open(tmp_path / "wal") as again:
        assert again.read_all().entries == tuple(acked)
        markers = again.valid_snapshot_entries()
    if op == "write":
        assert markers == []  # nothing was written
    else:  # written, not known durable: present whole or absent, never half
        assert [m.index for m in markers] in ([], [20])


def test_failed_sync_poisons(tmp_path) -> None:
    fio = FaultyFileIO()
    w, _ = acknowledged_wal(tmp_path / "wal", fio)
    w.save(HardState(1, 1, 25))  # commit only: written, not synced
    fio.add(Fault("fdatasync"))
    with pytest.raises(WALIOError) as info:
        w.sync()
    assert_refuses_everything(w, fio, info.value)


def test_failed_fdatasync_at_close_is_reported_and_releases_the_lock(tmp_path) -> None:
    fio = FaultyFileIO()
    w, acked = acknowledged_wal(tmp_path / "wal", fio)
    fio.add(Fault("fdatasync"))
    with pytest.raises(WALIOError, match="closing"):
        w.close()
    w.close()  # idempotent
    assert w.failure is not None
    assert reopen(tmp_path / "wal")[0] == acked  # the lock was released: it opens


def test_purge_stops_at_an_undeletable_segment_and_is_poisoned_by_a_failed_fsync(
        tmp_path, caplog) -> None:
    fio = FaultyFileIO()
    w, acked = acknowledged_wal(tmp_path / "wal", fio, segment_size=1)
    w.release_to(30)
    first = w.segments[0].path
    fio.add(Fault("unlink", path=first, error=errno.EACCES))
    assert w.purge(keep=1) == []  # the oldest could not go: nothing after it goes either
    assert "purge stopped" in caplog.text
    assert os.path.exists(first)
    fio.clear()
    fault = fio.add(Fault("fsync", path="*/wal"))
    with pytest.raises(WALIOError, match="purge"):
        w.purge(keep=1)
    assert fio.fired(fault)
    assert_refuses_everything(w, fio, w.failure)  # type: ignore[arg-type]
    with WAL.open(tmp_path / "wal", segment_size=1) as again:  # a gap would not open
        assert [s.seq for s in again.segments] == [2, 3]  # 0 and 1 were released and gone
        assert again.last_index == acked[-1].index


def test_open_read_failure_is_typed_and_releases_the_lock(tmp_path) -> None:
    w, _ = acknowledged_wal(tmp_path / "wal", FaultyFileIO())
    w.close()
    fio = FaultyFileIO([Fault("readinto", path="*.wal")])
    with pytest.raises(WALIOError, match="opening") as info:
        WAL.open(tmp_path / "wal", file_io=fio)
    assert info.value.op == "read" and info.value.errno == errno.EIO
    WAL.open(tmp_path / "wal").close()


def test_failed_tail_repair_is_unrepairable(tmp_path) -> None:
    w, _ = acknowledged_wal(tmp_path / "wal", FaultyFileIO())
    w.close()
    append_bytes(tmp_path / "wal" / "0000000000000000-0000000000000000.wal", b"\x00" * 40)
    fio = FaultyFileIO([Fault("ftruncate")])
    with pytest.raises(WALUnrepairableError, match="ftruncate") as info:
        WAL.open(tmp_path / "wal", file_io=fio)
    assert isinstance(info.value.__cause__, OSError)
    WAL.open(tmp_path / "wal").close()  # repaired with the real seam


def test_failed_create_leaves_no_wal_and_no_lock(tmp_path) -> None:
    fio = FaultyFileIO([Fault("fsync", path="*.wal.tmp", error=errno.ENOSPC)])
    with pytest.raises(WALIOError, match="creating") as info:
        WAL.create(tmp_path / "wal", file_io=fio)
    assert info.value.errno == errno.ENOSPC
    assert not wal_exists(tmp_path / "wal")
    assert os.listdir(tmp_path / "wal") == ["LOCK"]
    WAL.create(tmp_path / "wal").close()  # the lock is free, the name too


def test_lock_contention_is_still_walllocked(tmp_path) -> None:
    with WAL.create(tmp_path / "wal"), pytest.raises(WALLockedError):
        WAL.open(tmp_path / "wal", file_io=FaultyFileIO())
