"""WAL: write semantics, fsync policy, segments, purge, replay and round trips."""

from __future__ import annotations

import errno
import os

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from trio_raft.core.messages import ConfState, Entry, EntryType, HardState, SnapshotMetadata
from trio_raft.errors import (
    WALError,
    WALIOError,
    WALLockedError,
    WALPoisonedError,
    WALSnapshotNotFoundError,
)
from trio_raft.storage.wal import WAL, parse_segment_name, segment_name, wal_exists
from trio_raft.testing.faults import Fault, FaultyFileIO


def ents(lo: int, hi: int, term: int = 1, size: int = 10) -> list[Entry]:
    return [Entry(term, i, data=bytes([i % 256]) * size) for i in range(lo, hi + 1)]


def test_segment_names() -> None:
    assert segment_name(1, 0x2A) == "0000000000000001-000000000000002a.wal"
    assert parse_segment_name(segment_name(7, 99)) == (7, 99)
    assert parse_segment_name("x.wal") is None


def test_create_then_reopen_round_trip(tmp_path) -> None:
    d = tmp_path / "wal"
    assert not wal_exists(d)
    with WAL.create(d, b"node=1") as w:
        w.save(HardState(1, 1, 0), ents(1, 5))
        w.save(HardState(1, 1, 3), [])
    assert wal_exists(d)
    with WAL.open(d) as w:
        c = w.read_all()
        assert c.metadata == b"node=1"
        assert c.hard_state == HardState(1, 1, 3)
        assert c.entries == tuple(ents(1, 5))
        assert w.last_index == 5


def test_create_refuses_existing(tmp_path) -> None:
    WAL.create(tmp_path / "wal").close()
    with pytest.raises(WALError, match="already holds a WAL"):
        WAL.create(tmp_path / "wal")


def test_open_missing_segments(tmp_path) -> None:
    (tmp_path / "wal").mkdir()
    with pytest.raises(WALError, match="no segments"):
        WAL.open(tmp_path / "wal")


def test_directory_lock(tmp_path) -> None:
    with WAL.create(tmp_path / "wal"), pytest.raises(WALLockedError):
        WAL.open(tmp_path / "wal")
    WAL.open(tmp_path / "wal").close()


def test_fsync_policy(tmp_path) -> None:
    fio = FaultyFileIO()  # no rules: a recorder
    with WAL.create(tmp_path / "wal", file_io=fio) as w:
        fio.calls.clear()

        def syncs() -> int:
            return len(fio.calls_to("fdatasync"))

        assert w.save(HardState(1, 0, 0), []) is True  # term change
        assert w.save(HardState(1, 2, 0), []) is True  # vote change
        assert w.save(HardState(1, 2, 1), []) is False  # commit only: written, not synced
        assert w.save(HardState(1, 2, 1), ents(1, 64)) is True  # a batch: one fsync
        assert w.save(HardState(1, 2, 1), []) is False  # nothing new: no-op
        assert w.save(None, []) is False
        assert w.save(HardState(1, 2, 2), [], sync=True) is True  # caller insists
        assert syncs() == 4
        w.save_snapshot(SnapshotMetadata(ConfState([1]), 10, 1))
        assert syncs() == 5
        assert not fio.calls_to("fsync")  # the WAL's own appends use fdatasync only
    with WAL.open(tmp_path / "wal") as w:
        assert w.read_all().hard_state == HardState(1, 2, 2)


def test_batch_is_one_write(tmp_path) -> None:
    fio = FaultyFileIO()
    with WAL.create(tmp_path / "wal", file_io=fio) as w:
        fio.calls.clear()
        w.save(HardState(1, 1, 0), ents(1, 1024))
        writes = fio.calls_to("write")
    assert len(writes) == 1
    assert writes[0].nbytes is not None and writes[0].nbytes > 1024 * 10


def test_overwrite_conflicting_suffix(tmp_path) -> None:
    with WAL.create(tmp_path / "wal") as w:
        w.save(HardState(1, 1, 2), ents(1, 10, term=1))
        w.save(HardState(2, 2, 2), ents(6, 8, term=2))  # a new leader overwrote 6..10
    with WAL.open(tmp_path / "wal") as w:
        got = w.read_all().entries
    assert [e.index for e in got] == list(range(1, 9))
    assert [e.term for e in got] == [1] * 5 + [2] * 3


def test_entry_types_and_empty_data(tmp_path) -> None:
    es = [Entry(1, 1), Entry(1, 2, EntryType.CONF_CHANGE, b"cc"),
          Entry(1, 3, EntryType.CONF_CHANGE_V2, b"")]
    with WAL.create(tmp_path / "wal") as w:
        w.save(HardState(1, 0, 0), es)
    with WAL.open(tmp_path / "wal") as w:
        assert w.read_all().entries == tuple(es)


def test_cut_purge_and_read_at_snapshot(tmp_path) -> None:
    d = tmp_path / "wal"
    with WAL.create(d, b"m", segment_size=2048) as w:
        for i in range(1, 301):
            w.save(HardState(1, 1, i - 1), [Entry(1, i, data=b"x" * 40)])
        assert len(w.segments) > 8
        # every segment after the first starts with the hard state current at the cut
        w.save_snapshot(SnapshotMetadata(ConfState([1]), 250, 1), HardState(1, 1, 300))
        w.release_to(250)
        removed = w.purge(keep=2)
        assert removed
        assert w.segments[0].index <= 250
        segs_left = len(w.segments)
    assert len([n for n in os.listdir(d) if n.endswith(".wal")]) == segs_left
    with WAL.open(d, segment_size=2048) as w:
        assert [(m.index, m.term) for m in w.valid_snapshot_entries()] == [(250, 1)]
        c = w.read_all(250, 1)
        assert c.hard_state == HardState(1, 1, 300)
        assert [e.index for e in c.entries] == list(range(251, 301))
        assert c.metadata == b"m"
        with pytest.raises(WALSnapshotNotFoundError):
            w.read_all(0, 0)  # purged past it
        with pytest.raises(WALSnapshotNotFoundError):
            w.read_all(250, 2)  # wrong term
        with pytest.raises(WALSnapshotNotFoundError):
            w.read_all(260, 1)  # no marker


def test_overwritten_suffix_across_cuts_reads_and_purges(tmp_path) -> None:
    d = tmp_path / "wal"
    with WAL.create(d, segment_size=1024) as w:
        for i in range(1, 41):  # term 1 up to 40, over several segments
            w.save(HardState(1, 1, min(i - 1, 20)), [Entry(1, i, data=b"x" * 40)])
        high = w.segments[-1].index
        # A term-2 leader overwrites everything after 20, then the log grows again.
        w.save(HardState(2, 2, 20), [Entry(2, 21, data=b"y" * 40)])
        for i in range(22, 61):
            w.save(HardState(2, 2, i - 1), [Entry(2, i, data=b"y" * 40)])
        names = [seg.index for seg in w.segments]
        assert min(names[names.index(high) + 1:]) < high  # a later segment is named lower
        w.save_snapshot(SnapshotMetadata(ConfState([1]), 30, 2), HardState(2, 2, 60))
        w.release_to(30)
        assert w.purge(keep=1)
    with WAL.open(d, segment_size=1024) as w:
        c = w.read_all(30, 2)
        assert [(e.term, e.index) for e in c.entries] == [(2, i) for i in range(31, 61)]


def test_purge_keeps_unreleased_and_newest(tmp_path) -> None:
    with WAL.create(tmp_path / "wal", segment_size=1024) as w:
        for i in range(1, 101):
            w.save(HardState(1, 1, i), [Entry(1, i, data=b"y" * 40)])
        n = len(w.segments)
        assert w.purge(keep=1) == []  # nothing released
        w.release_to(10**9)  # everything but the newest is released
        assert len(w.purge(keep=3)) == n - 3
        assert len(w.segments) == 3
        assert len(w.purge(keep=0)) == 2  # keep < 1 counts as 1
        w.save(HardState(1, 1, 101), [Entry(1, 101)])


def test_snapshot_marker_validity_needs_commit(tmp_path) -> None:
    with WAL.create(tmp_path / "wal") as w:
        w.save(HardState(1, 1, 5), ents(1, 20))
        w.save_snapshot(SnapshotMetadata(ConfState([1]), 5, 1))
        w.save_snapshot(SnapshotMetadata(ConfState([1]), 15, 1))  # commit still 5
        assert [m.index for m in w.valid_snapshot_entries()] == [5]
        w.save(HardState(1, 1, 15), [])
        assert [m.index for m in w.valid_snapshot_entries()] == [5, 15]


def test_snapshot_install_resets_log(tmp_path) -> None:
    with WAL.create(tmp_path / "wal") as w:
        w.save(HardState(1, 1, 3), ents(1, 5))
        w.save_snapshot(SnapshotMetadata(ConfState([1, 2]), 100, 3), HardState(3, 0, 100))
        w.save(HardState(3, 0, 100), ents(101, 103, term=3))
        assert w.last_index == 103
    with WAL.open(tmp_path / "wal") as w:
        assert w.last_index == 103
        c = w.read_all(100, 3)
        assert [e.index for e in c.entries] == [101, 102, 103]


def test_closed_wal_rejects_writes(tmp_path) -> None:
    w = WAL.create(tmp_path / "wal")
    w.close()
    w.close()
    with pytest.raises(WALError, match="closed"):
        w.save(HardState(1, 0, 0), [])


def test_write_failure_poisons_the_wal(tmp_path) -> None:
    fio = FaultyFileIO()
    w = WAL.create(tmp_path / "wal", file_io=fio)
    fio.add(Fault("write", error=errno.ENOSPC))  # fires once
    with pytest.raises(WALIOError, match="No space left"):
        w.save(HardState(1, 0, 0), ents(1, 1))
    with pytest.raises(WALPoisonedError, match="failed earlier"):
        w.save(HardState(1, 0, 0), ents(1, 1))  # the seam would let it through now
    w.close()


entry_batches = st.lists(
    st.tuples(
        st.integers(0, 3),  # how far back the batch starts (0 = append at the end)
        st.lists(st.binary(max_size=300), min_size=0, max_size=20),
        st.booleans(),  # bump term
    ),
    max_size=25,
)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=entry_batches, segment_size=st.sampled_from([512, 4096, 1 << 20]))
# A conflicting suffix overwritten after a cut, then another cut: the newer segment's name is
# lower than the one before it, and the WAL must still open and replay.
@example(batches=[(0, [b""] * 12, False), *[(0, [], False)] * 9, (3, [b""], False)],
         segment_size=512)
def test_roundtrip_matches_model(tmp_path_factory, batches, segment_size: int) -> None:
    d = tmp_path_factory.mktemp("wal") / "wal"
    model: list[Entry] = []
    term, commit = 1, 0
    hs = HardState()
    with WAL.create(d, segment_size=segment_size) as w:
        for back, payloads, bump in batches:
            term += bump
            start = max(commit + 1, len(model) + 1 - back)
            batch = [Entry(term, start + i, data=p) for i, p in enumerate(payloads)]
            if batch:
                del model[start - 1 :]
                model.extend(batch)
            commit = min(len(model), commit + 1)
            hs = HardState(term, 1, commit)
            w.save(hs, batch)
    with WAL.open(d, segment_size=segment_size) as w:
        c = w.read_all()
        assert c.entries == tuple(model)
        assert c.hard_state == (hs if not hs.is_empty() else HardState())
        # and appending after reopen keeps working
        w.save(HardState(term, 1, commit), [Entry(term, len(model) + 1, data=b"z")])
    with WAL.open(d, segment_size=segment_size) as w:
        assert w.read_all().entries[-1] == Entry(term, len(model) + 1, data=b"z")
