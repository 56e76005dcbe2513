"""The .fsm payload file and token: every operation and each of the six errors."""

from __future__ import annotations

import os

import crc32c
import pytest

from trio_raft.errors import (
    FSMSnapshotError,
    FSMSnapshotFileCRCError,
    FSMSnapshotNotFoundError,
    FSMSnapshotTokenCRCError,
    FSMSnapshotTokenInvalidError,
    FSMSnapshotTooLargeError,
    FSMSnapshotTooSmallError,
)
from trio_raft.storage.fsm_snapshot import (
    BUFFER_SIZE,
    decode_snapshot_token,
    encode_snapshot_token,
    fsm_snapshot_path,
    is_snapshot_token,
    open_and_restore_fsm_snapshot,
    open_fsm_snapshot_payload,
    parse_fsm_snapshot_name,
    read_fsm_snapshot_payload,
    verify_fsm_snapshot_file,
    write_fsm_snapshot_file,
)

from .helpers import BytesSnapshot, RawSink, flip_bit, truncate


def test_token_round_trip_and_layout() -> None:
    tok = encode_snapshot_token(0x0102030405060708, 0xDEADBEEF)
    assert len(tok) == 17
    assert tok == b"TRFT\x01" + bytes.fromhex("0102030405060708") + bytes.fromhex("deadbeef")
    assert is_snapshot_token(tok)
    assert decode_snapshot_token(tok) == (0x0102030405060708, 0xDEADBEEF)
    assert not is_snapshot_token(b"{}")
    assert not is_snapshot_token(tok + b"x")


@pytest.mark.parametrize("bad", [
    b"", b"TRFT\x01" + bytes(11), b"TRFT\x01" + bytes(13),  # wrong lengths
    b"EKVT\x01" + bytes(12),  # wrong magic
    b"TRFT\x02" + bytes(12),  # wrong version
])
def test_token_invalid(bad: bytes) -> None:
    with pytest.raises(FSMSnapshotTokenInvalidError, match="token format invalid"):
        decode_snapshot_token(bad)


def test_path_and_name() -> None:
    p = fsm_snapshot_path("/x", 0xAB)
    assert p == "/x/00000000000000ab.fsm"
    assert parse_fsm_snapshot_name(os.path.basename(p)) == 0xAB
    assert parse_fsm_snapshot_name("00000000000000AB.fsm") is None
    assert parse_fsm_snapshot_name("00000000000000ab.fsm.tmp") is None


def test_write_layout_and_restore(tmp_path) -> None:
    payload = os.urandom(3 * BUFFER_SIZE + 123)
    handle = BytesSnapshot(payload, chunk=65537)
    crc = write_fsm_snapshot_file(handle, tmp_path / "fsm", 42)
    assert not handle.closed  # the caller closes the handle
    path = fsm_snapshot_path(tmp_path / "fsm", 42)
    with open(path, "rb") as f:
        raw = f.read()
    assert raw[:-4] == payload and raw[-4:] == crc.to_bytes(4, "big")
    assert crc == crc32c.crc32c(payload)
    assert [n for n in os.listdir(tmp_path / "fsm") if n.endswith(".tmp")] == []

    sink = RawSink()
    open_and_restore_fsm_snapshot(sink, path, crc)
    assert sink.got == payload
    verify_fsm_snapshot_file(path, crc)
    verify_fsm_snapshot_file(path, 0)  # token check skipped when 0
    assert read_fsm_snapshot_payload(path) == payload
    reader, size, footer = open_fsm_snapshot_payload(path)
    with reader:
        assert size == len(payload) and footer == crc
        assert reader.read() == payload


def test_write_replaces_and_cleans_up_on_error(tmp_path) -> None:
    write_fsm_snapshot_file(BytesSnapshot(b"old"), tmp_path, 1)
    crc = write_fsm_snapshot_file(BytesSnapshot(b"new"), tmp_path, 1)
    assert read_fsm_snapshot_payload(fsm_snapshot_path(tmp_path, 1)) == b"new"

    class Failing:
        def write_to(self, writer) -> int:
            writer.write(b"partial")
            raise RuntimeError("snapshot failed")

        def close(self) -> None:
            pass

    with pytest.raises(RuntimeError):
        write_fsm_snapshot_file(Failing(), tmp_path, 2)
    assert sorted(os.listdir(tmp_path)) == ["0000000000000001.fsm"]
    verify_fsm_snapshot_file(fsm_snapshot_path(tmp_path, 1), crc)


def test_empty_payload(tmp_path) -> None:
    crc = write_fsm_snapshot_file(BytesSnapshot(b""), tmp_path, 3)
    path = fsm_snapshot_path(tmp_path, 3)
    assert os.path.getsize(path) == 4
    assert read_fsm_snapshot_payload(path) == b""
    verify_fsm_snapshot_file(path, crc, check_token=True)


@pytest.fixture
def snapfile(tmp_path) -> tuple[str, int, bytes]:
    payload = b'{"a": "1", "b": "2"}' * 1000
    crc = write_fsm_snapshot_file(BytesSnapshot(payload), tmp_path, 9)
    return fsm_snapshot_path(tmp_path, 9), crc, payload


def test_not_found(tmp_path) -> None:
    path = fsm_snapshot_path(tmp_path, 5)
    for call in (lambda: open_and_restore_fsm_snapshot(RawSink(), path, 1),
                 lambda: verify_fsm_snapshot_file(path, 1),
                 lambda: read_fsm_snapshot_payload(path),
                 lambda: open_fsm_snapshot_payload(path)):
        with pytest.raises(FSMSnapshotNotFoundError, match="file not found"):
            call()


def test_truncated_footer_is_too_small(snapfile) -> None:
    path, crc, _ = snapfile
    truncate(path, 3)
    kv = RawSink()
    with pytest.raises(FSMSnapshotTooSmallError, match="too small to contain footer"):
        open_and_restore_fsm_snapshot(kv, path, crc)
    assert kv.restores == 0
    with pytest.raises(FSMSnapshotTooSmallError):
        verify_fsm_snapshot_file(path, crc)
    with pytest.raises(FSMSnapshotTooSmallError):
        read_fsm_snapshot_payload(path)


def test_wrong_token_crc_is_caught_before_restore(snapfile) -> None:
    path, crc, _ = snapfile
    kv = RawSink()
    match = r"token CRC32C mismatch \(metadata corrupt\)"
    with pytest.raises(FSMSnapshotTokenCRCError, match=match):
        open_and_restore_fsm_snapshot(kv, path, crc ^ 1)
    assert kv.restores == 0  # checked before any restore
    with pytest.raises(FSMSnapshotTokenCRCError):
        verify_fsm_snapshot_file(path, crc ^ 1)


def test_token_check_variants(snapfile) -> None:
    path, _, _ = snapfile
    verify_fsm_snapshot_file(path, 0)
    with pytest.raises(FSMSnapshotTokenCRCError):
        verify_fsm_snapshot_file(path, 0, check_token=True)


def test_flipped_bit_in_payload_is_file_crc(snapfile) -> None:
    path, crc, _ = snapfile
    flip_bit(path, 5000)
    kv = RawSink()
    with pytest.raises(FSMSnapshotFileCRCError, match=r"file CRC32C mismatch \(file corrupt\)"):
        open_and_restore_fsm_snapshot(kv, path, crc)
    assert kv.restores == 1  # detected after restore: the caller treats it as fatal
    with pytest.raises(FSMSnapshotFileCRCError):
        verify_fsm_snapshot_file(path, crc)
    with pytest.raises(FSMSnapshotFileCRCError):
        read_fsm_snapshot_payload(path)


def test_file_crc_checked_even_when_restore_reads_little(snapfile) -> None:
    path, crc, _ = snapfile
    flip_bit(path, 15000)
    with pytest.raises(FSMSnapshotFileCRCError):
        open_and_restore_fsm_snapshot(RawSink(read_all=False), path, crc)


def test_truncated_tail_changes_footer(snapfile) -> None:
    path, crc, _ = snapfile
    truncate(path, os.path.getsize(path) - 10)
    with pytest.raises(FSMSnapshotTokenCRCError):  # the "footer" is now payload bytes
        open_and_restore_fsm_snapshot(RawSink(), path, crc)
    with pytest.raises(FSMSnapshotFileCRCError):
        verify_fsm_snapshot_file(path, crc)


def test_too_large_for_memory(snapfile) -> None:
    path, _, payload = snapfile
    with pytest.raises(FSMSnapshotTooLargeError, match="exceeds maximum in-memory size"):
        read_fsm_snapshot_payload(path, limit=len(payload) - 1)
    assert read_fsm_snapshot_payload(path, limit=len(payload)) == payload


def test_streaming_opener_does_not_verify(snapfile) -> None:
    path, _, payload = snapfile
    flip_bit(path, 0)
    reader, size, _ = open_fsm_snapshot_payload(path)
    with reader:
        data = reader.read()
    assert size == len(payload) and len(data) == len(payload) and data != payload


def test_all_are_fsm_snapshot_errors() -> None:
    for cls in (FSMSnapshotFileCRCError, FSMSnapshotTokenCRCError, FSMSnapshotNotFoundError,
                FSMSnapshotTooSmallError, FSMSnapshotTokenInvalidError, FSMSnapshotTooLargeError):
        assert issubclass(cls, FSMSnapshotError)
