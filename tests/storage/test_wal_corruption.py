"""Hand-damaged WAL files: torn tails are repaired once, everything else is a clear error."""

from __future__ import annotations

import logging
import os

import pytest

from trio_raft.core.messages import Entry, HardState
from trio_raft.errors import WALCorruptError, WALUnrepairableError
from trio_raft.storage import wal_records as rec
from trio_raft.storage.wal import WAL

from .helpers import append_bytes, flip_bit, truncate


def build(d, n: int = 20, *, segment_size: int = 1 << 20, size: int = 50) -> list[str]:
    with WAL.create(d, segment_size=segment_size) as w:
        for i in range(1, n + 1):
            w.save(HardState(1, 1, i - 1), [Entry(1, i, data=bytes([i]) * size)])
        return [s.path for s in w.segments]


def records(path: str) -> list[rec.RawRecord]:
    with open(path, "rb") as f:
        data = f.read()
    return rec.scan(path, data, is_last=False).records


def entry_offsets(path: str) -> list[int]:
    return [r.offset for r in records(path) if r.type == rec.RecordType.ENTRY]


def reopen_indexes(d) -> list[int]:
    with WAL.open(d) as w:
        return [e.index for e in w.read_all().entries]


def test_truncated_tail_is_repaired_once(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    d = tmp_path / "wal"
    (seg,) = build(d)
    size = os.path.getsize(seg)
    truncate(seg, size - 7)  # the final hard-state record loses its end
    with caplog.at_level(logging.WARNING, logger="trio_raft.storage.wal"):
        assert reopen_indexes(d) == list(range(1, 21))
    assert "repaired torn tail" in caplog.text and seg in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert reopen_indexes(d) == list(range(1, 21))
    assert "repaired" not in caplog.text


def test_tail_cut_inside_an_entry_drops_only_that_entry(tmp_path) -> None:
    d = tmp_path / "wal"
    (seg,) = build(d)
    last_entry = entry_offsets(seg)[-1]
    truncate(seg, last_entry + rec.HEADER_SIZE + 3)
    assert reopen_indexes(d) == list(range(1, 20))
    with WAL.open(d) as w:  # appending after the repair continues cleanly
        w.save(HardState(1, 1, 5), [Entry(1, 20, data=b"again")])
    assert reopen_indexes(d) == list(range(1, 21))


def test_partial_header_at_end(tmp_path) -> None:
    d = tmp_path / "wal"
    (seg,) = build(d)
    append_bytes(seg, b"\x00\x00\x01")
    assert reopen_indexes(d) == list(range(1, 21))


def test_zero_filled_tail(tmp_path) -> None:
    d = tmp_path / "wal"
    (seg,) = build(d)
    append_bytes(seg, bytes(8192))
    assert reopen_indexes(d) == list(range(1, 21))
    assert os.path.getsize(seg) == sum(rec.HEADER_SIZE + len(r.payload) for r in records(seg))


def test_zero_filled_end_of_last_record(tmp_path) -> None:
    d = tmp_path / "wal"
    (seg,) = build(d, size=200)
    size = os.path.getsize(seg)
    last = records(seg)[-1]
    with open(seg, "r+b") as f:  # the page holding the record's end never reached the disk
        f.seek(last.offset + rec.HEADER_SIZE + 2)
        f.write(bytes(size - f.tell()))
        f.write(bytes(100))
    reopen_indexes(d)
    assert os.path.getsize(seg) == last.offset


def test_bit_flip_in_middle_is_corrupt(tmp_path) -> None:
    d = tmp_path / "wal"
    (seg,) = build(d)
    off = entry_offsets(seg)[5]
    flip_bit(seg, off + rec.HEADER_SIZE + 20)
    with pytest.raises(WALCorruptError) as ei:
        WAL.open(d)
    msg = str(ei.value)
    assert seg in msg and f"offset {off}" in msg and "payload checksum" in msg
    assert ei.value.offset == off  # type: ignore[attr-defined]
    assert ei.value.path == seg  # type: ignore[attr-defined]


def test_bit_flip_in_header_is_corrupt(tmp_path) -> None:
    d = tmp_path / "wal"
    (seg,) = build(d)
    off = entry_offsets(seg)[3]
    flip_bit(seg, off + 1, bit=3)  # the length field
    with pytest.raises(WALCorruptError, match=f"offset {off}: record header checksum"):
        WAL.open(d)


def test_bit_flip_in_last_record_is_corrupt_not_torn(tmp_path) -> None:
    d = tmp_path / "wal"
    (seg,) = build(d)
    last = records(seg)[-1]
    flip_bit(seg, last.offset + rec.HEADER_SIZE)
    with pytest.raises(WALCorruptError, match="payload checksum"):
        WAL.open(d)


def test_zero_header_followed_by_data_is_corrupt(tmp_path) -> None:
    d = tmp_path / "wal"
    (seg,) = build(d)
    off = entry_offsets(seg)[2]
    with open(seg, "r+b") as f:
        f.seek(off)
        f.write(bytes(rec.HEADER_SIZE))
    with pytest.raises(WALCorruptError, match="header checksum"):
        WAL.open(d)


def test_corruption_in_older_segment(tmp_path) -> None:
    d = tmp_path / "wal"
    segs = build(d, 200, segment_size=2048)
    assert len(segs) > 3
    off = entry_offsets(segs[1])[1]
    flip_bit(segs[1], off + rec.HEADER_SIZE + 30)
    with WAL.open(d) as w, pytest.raises(WALCorruptError, match=os.path.basename(segs[1])):
        w.read_all()


def test_truncated_older_segment(tmp_path) -> None:
    d = tmp_path / "wal"
    segs = build(d, 200, segment_size=2048)
    truncate(segs[1], os.path.getsize(segs[1]) - 5)
    with WAL.open(d) as w, pytest.raises(WALCorruptError, match="runs past end of segment"):
        w.valid_snapshot_entries()


def test_missing_segment(tmp_path) -> None:
    d = tmp_path / "wal"
    segs = build(d, 200, segment_size=2048)
    os.unlink(segs[2])
    with pytest.raises(WALCorruptError, match="sequence gap"):
        WAL.open(d)


def test_renamed_segment(tmp_path) -> None:
    d = tmp_path / "wal"
    segs = build(d, 200, segment_size=2048)
    last = segs[-1]
    seq = os.path.basename(last)[:16]
    os.rename(last, os.path.join(d, f"{seq}-{0xFFFF:016x}.wal"))
    with pytest.raises(WALCorruptError, match="does not match the file name"):
        WAL.open(d)


def _append_framed(path: str, rtype: int, payload: bytes) -> None:
    buf = bytearray()
    rec.frame(rtype, payload, buf)  # type: ignore[arg-type]
    append_bytes(path, bytes(buf))


def test_unknown_record_type(tmp_path) -> None:
    d = tmp_path / "wal"
    (seg,) = build(d)
    size = os.path.getsize(seg)
    _append_framed(seg, 99, b"hello")
    with pytest.raises(WALCorruptError, match=f"offset {size}: unknown record type 99"):
        WAL.open(d)


def test_impossible_entry_record(tmp_path) -> None:
    d = tmp_path / "wal"
    (seg,) = build(d)
    size = os.path.getsize(seg)
    _append_framed(seg, rec.RecordType.ENTRY, b"\x00" * 17 + b"\x00\x00\x00\x09ab")
    with WAL.open(d) as w, pytest.raises(WALCorruptError,
                                         match=f"offset {size}: impossible ENTRY record"):
        w.read_all()


def test_segment_header_in_the_middle(tmp_path) -> None:
    d = tmp_path / "wal"
    (seg,) = build(d)
    _append_framed(seg, rec.RecordType.SEGMENT, rec.segment_header_payload(0, 0))
    with pytest.raises(WALCorruptError, match="segment header in mid-segment"):
        WAL.open(d)


def test_entry_gap_is_corrupt(tmp_path) -> None:
    d = tmp_path / "wal"
    with WAL.create(d) as w:
        w.save(HardState(1, 1, 1), [Entry(1, 1), Entry(1, 2)])
        w.save(HardState(1, 1, 1), [Entry(1, 7)])
    with WAL.open(d) as w, pytest.raises(WALCorruptError, match="entry index 7 leaves a gap"):
        w.read_all()


def test_torn_preamble_is_unrepairable(tmp_path) -> None:
    d = tmp_path / "wal"
    (seg,) = build(d)
    truncate(seg, 10)
    with pytest.raises(WALUnrepairableError, match="preamble"):
        WAL.open(d)


def test_failed_repair_is_unrepairable(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "wal"
    (seg,) = build(d)
    truncate(seg, os.path.getsize(seg) - 3)

    def fail(fd: int, size: int) -> None:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(os, "ftruncate", fail)
    with pytest.raises(WALUnrepairableError, match="Read-only"):
        WAL.open(d)


def test_stale_segment_temp_file_is_removed(tmp_path) -> None:
    d = tmp_path / "wal"
    build(d)
    stale = d / "0000000000000001-0000000000000015.wal.tmp"
    stale.write_bytes(b"half a segment")
    assert reopen_indexes(d) == list(range(1, 21))
    assert not stale.exists()
