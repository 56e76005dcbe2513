"""SnapshotExchange with real files: landing, refusals, protection through retention, sending,
and disk failures injected through its file-I/O seam."""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path

import crc32c
import pytest

from tests.transport.conftest import grpc_pair
from tests.transport.snapshot_helpers import (
    ProbedExchange,
    fsm_name,
    open_files_under,
    snap_msg,
    spools,
    write_fsm,
)
from trio_raft.errors import (
    DispatchError,
    FSMSnapshotFileCRCError,
    FSMSnapshotNotFoundError,
    FSMSnapshotTokenCRCError,
    ReceivedFSMSnapshotStaleError,
    SnapshotPayloadCRCError,
    SnapshotPayloadTooLargeError,
    StorageIOError,
    TransportError,
)
from trio_raft.storage import fsm_snapshot as fsm
from trio_raft.storage import snapshots as snaps
from trio_raft.testing.faults import Fault, FaultyFileIO


def test_land_a_payload(tmp_path: Path) -> None:
    ex = ProbedExchange(tmp_path / "fsm")
    incoming = ex.begin_incoming(7)
    assert ex.protected_indexes() == {7}
    incoming.write(b"hello ")
    incoming.write(memoryview(b"world"))
    assert len(spools(tmp_path / "fsm")) == 1
    token = incoming.finalize(crc32c.crc32c(b"hello world"))
    assert token == fsm.encode_snapshot_token(7, crc32c.crc32c(b"hello world"))
    path = tmp_path / "fsm" / fsm_name(7)
    assert path.read_bytes() == b"hello world" + struct.pack(">I", crc32c.crc32c(b"hello world"))
    fsm.verify_fsm_snapshot_file(path, crc32c.crc32c(b"hello world"), check_token=True)
    assert spools(tmp_path / "fsm") == []
    assert incoming.state == "finalized"
    with pytest.raises(TransportError):
        incoming.write(b"more")
    assert ex.protected_indexes() == {7}  # until installed (applied) or aborted


def test_stale_is_refused_at_begin_and_at_finalize(tmp_path: Path) -> None:
    ex = ProbedExchange(tmp_path, applied=10)
    with pytest.raises(ReceivedFSMSnapshotStaleError):
        ex.begin_incoming(10)
    incoming = ex.begin_incoming(11)
    incoming.write(b"x")
    ex.applied = 11  # the node caught up another way while the payload was arriving
    with pytest.raises(ReceivedFSMSnapshotStaleError):
        incoming.finalize()
    incoming.abort()
    assert os.listdir(tmp_path) == []
    assert ex.protected_indexes() == frozenset()


def test_cap_and_crc_mismatch_leave_nothing(tmp_path: Path) -> None:
    ex = ProbedExchange(tmp_path, max_bytes=10)
    incoming = ex.begin_incoming(3)
    incoming.write(b"0123456789")
    with pytest.raises(SnapshotPayloadTooLargeError):
        incoming.write(b"!")
    with pytest.raises(SnapshotPayloadCRCError):
        incoming.finalize(crc32c.crc32c(b"0123456789") ^ 1)
    incoming.abort()
    incoming.abort()  # idempotent
    assert os.listdir(tmp_path) == []
    assert ex.protected_indexes() == frozenset()


def test_abort_after_finalize_removes_the_refused_file(tmp_path: Path) -> None:
    ex = ProbedExchange(tmp_path)
    incoming = ex.begin_incoming(5)
    incoming.write(b"payload")
    incoming.finalize()
    incoming.abort()  # the engine refused the message
    assert os.listdir(tmp_path) == []
    assert ex.protected_indexes() == frozenset()


def test_same_index_twice(tmp_path: Path) -> None:
    ex = ProbedExchange(tmp_path)
    first = ex.begin_incoming(9)
    first.write(b"A" * 100)
    token = first.finalize()
    again = ex.begin_incoming(9)  # a retry with the same content: the file is kept
    again.write(b"A" * 100)
    assert again.finalize() == token
    other = ex.begin_incoming(9)  # different content while the first waits: refused
    other.write(b"B" * 100)
    with pytest.raises(ReceivedFSMSnapshotStaleError):
        other.finalize()
    other.abort()
    again.abort()  # one holder refused: the other still needs the file
    assert (tmp_path / fsm_name(9)).read_bytes()[:100] == b"A" * 100
    first.abort()
    assert os.listdir(tmp_path) == []


def test_protection_keeps_a_received_file_through_retention(tmp_path: Path) -> None:
    """A finalized .fsm that the engine has not installed has no .snap yet: retention before a
    local snapshot write would delete it unless it is protected."""
    snap_dir, fsm_dir = tmp_path / "snap", tmp_path / "fsm-snap"
    snap_dir.mkdir()
    ex = ProbedExchange(fsm_dir, applied=20)
    incoming = ex.begin_incoming(50)
    incoming.write(os.urandom(1000))
    incoming.finalize()
    write_fsm(fsm_dir, 10, b"old, unreferenced")
    removed = snaps.prepare_fsm_snapshot_write(str(snap_dir), str(fsm_dir), 60, None,
                                               ex.protected_indexes())
    assert [os.path.basename(p) for p in removed] == [fsm_name(10)]
    assert (fsm_dir / fsm_name(50)).exists()
    # The message was dropped; the node later applies past 50 another way: released.
    ex.applied = 55
    assert ex.protected_indexes() == frozenset()
    removed = snaps.prepare_fsm_snapshot_write(str(snap_dir), str(fsm_dir), 60, None,
                                               ex.protected_indexes())
    assert [os.path.basename(p) for p in removed] == [fsm_name(50)]
    incoming.abort()  # a late abort at or below the applied index touches no file
    assert os.listdir(fsm_dir) == []


def test_open_outgoing(tmp_path: Path) -> None:
    ex = ProbedExchange(tmp_path)
    assert ex.open_outgoing(b"inline payload") is None
    payload = os.urandom(3000)
    token = write_fsm(tmp_path, 4, payload)
    with ex.open_outgoing(token) as out:  # type: ignore[union-attr]
        assert out.size == 3000
        got = b"".join(iter(lambda: out.read(1000), b""))
    assert got == payload
    assert out.closed
    with pytest.raises(FSMSnapshotTokenCRCError):
        ex.open_outgoing(fsm.encode_snapshot_token(4, 1))
    with pytest.raises(FSMSnapshotNotFoundError):
        ex.open_outgoing(fsm.encode_snapshot_token(5, 1))
    path = tmp_path / fsm_name(4)
    raw = bytearray(path.read_bytes())
    raw[2999] ^= 1
    path.write_bytes(bytes(raw))
    with ex.open_outgoing(token) as out:  # type: ignore[union-attr]
        assert len(out.read(2000)) == 2000  # the damage is found before the last bytes go
        with pytest.raises(FSMSnapshotFileCRCError):
            out.read(2000)


# -- disk failures: through the exchange's seam --------------------------------------------------

PAYLOAD = os.urandom(3 << 20)
#: The spool's own calls (the glob matches the spool's path), and the fsm directory itself.
SPOOL = "*/trio-raft-snapshot-*.spool"
RECEIVE_FAULTS: dict[str, tuple[str, list[Fault]]] = {
    # case: (the operation the error names, the rules)
    "eio mid-payload": ("write", [Fault("write", path=SPOOL, after=1)]),
    "short write then enospc": ("write", [
        Fault("write", path=SPOOL, after=1, short_write=100),
        Fault("write", path=SPOOL, after=2, error=errno.ENOSPC)]),
    "eio on the footer": ("write", [Fault("write", path=SPOOL, after=3)]),
    "failed fsync": ("fsync", [Fault("fsync", path=SPOOL)]),
    "failed close": ("close", [Fault("close", path=SPOOL)]),
    "failed rename": ("rename", [Fault("replace", path=SPOOL)]),
    "failed directory fsync": ("fsync", [Fault("fsync", path="*/fsm")]),
}


@pytest.mark.parametrize("case", sorted(RECEIVE_FAULTS))
def test_a_disk_failure_while_receiving_is_typed_final_and_leaves_nothing(
        tmp_path: Path, case: str) -> None:
    op, rules = RECEIVE_FAULTS[case]
    fio = FaultyFileIO(rules)
    ex = ProbedExchange(tmp_path / "fsm", io=fio)
    incoming = ex.begin_incoming(12)
    [spool] = spools(tmp_path / "fsm")
    with pytest.raises(StorageIOError) as info:
        for i in range(3):  # three 1 MiB writes, then the footer
            incoming.write(PAYLOAD[i << 20:(i + 1) << 20])
        incoming.finalize(crc32c.crc32c(PAYLOAD))
    err = info.value
    fired = fio.fired()[-1]  # the short write (when there is one) fired first
    assert fired.fault is not None
    assert err.op == op and err.errno == fired.fault.error
    assert isinstance(err.__cause__, OSError)
    assert str(tmp_path / "fsm") in err.path
    # Final: nothing more is written, and a failed fsync is never tried again.
    fsyncs = len(fio.calls_to("fsync"))
    with pytest.raises(StorageIOError) as again:
        incoming.finalize()
    assert again.value is err
    with pytest.raises(StorageIOError):
        incoming.write(b"more")
    assert len(fio.calls_to("fsync")) == fsyncs
    # Nothing half-written was finalized; abort leaves nothing, not even a descriptor.
    assert not (tmp_path / "fsm" / fsm_name(12)).exists()
    incoming.abort()
    assert os.listdir(tmp_path / "fsm") == []
    assert ex.protected_indexes() == frozenset()
    assert open_files_under(tmp_path) == []
    opened = [c for c in fio.calls_to("open") if spool in c.path]
    assert len(opened) == 1


def test_a_spool_that_cannot_be_created_protects_nothing(tmp_path: Path) -> None:
    fio = FaultyFileIO([Fault("open", path=SPOOL, error=errno.ENOSPC)])
    ex = ProbedExchange(tmp_path / "fsm", io=fio)
    with pytest.raises(StorageIOError) as info:
        ex.begin_incoming(4)
    assert info.value.op == "create" and info.value.errno == errno.ENOSPC
    assert ex.protected_indexes() == frozenset()
    assert os.listdir(tmp_path / "fsm") == []


def test_abort_never_raises_for_the_disk(tmp_path: Path) -> None:
    fio = FaultyFileIO()
    ex = ProbedExchange(tmp_path, io=fio)
    incoming = ex.begin_incoming(3)
    incoming.write(b"abc")
    fio.add(Fault("unlink", path=SPOOL, error=errno.EROFS))
    fio.add(Fault("close", path=SPOOL))
    incoming.abort()  # both failures are logged
    assert ex.protected_indexes() == frozenset()
    assert open_files_under(tmp_path) == []  # a failed close still released the descriptor
    assert len(spools(tmp_path)) == 1  # left for recovery, which removes spools at open
    refused = ex.begin_incoming(5)
    refused.write(b"refused")
    refused.finalize()
    fio.add(Fault("unlink", path="*.fsm"))
    refused.abort()
    assert (tmp_path / fsm_name(5)).exists()  # an unreferenced .fsm: recovery removes it


def test_a_failed_read_while_sending_is_typed_and_closes_nothing_twice(tmp_path: Path) -> None:
    token = write_fsm(tmp_path, 6, PAYLOAD)
    fio = FaultyFileIO([Fault("readinto", path="*.fsm", after=1)])
    ex = ProbedExchange(tmp_path, io=fio)
    out = ex.open_outgoing(token)
    assert out is not None
    assert len(out.read(1 << 20)) == 1 << 20
    with pytest.raises(StorageIOError) as info:
        out.read(1 << 20)
    assert info.value.op == "read"
    out.close()
    out.close()
    assert out.closed and open_files_under(tmp_path) == []
    assert len(fio.calls_to("close", fsm_name(6))) == 1


def test_a_payload_file_that_shrinks_while_sending_is_refused(tmp_path: Path) -> None:
    token = write_fsm(tmp_path, 6, PAYLOAD)
    ex = ProbedExchange(tmp_path)
    with ex.open_outgoing(token) as out:  # type: ignore[union-attr]
        os.truncate(tmp_path / fsm_name(6), 1 << 20)
        with pytest.raises(FSMSnapshotFileCRCError, match="bytes short"):
            while out.read(1 << 20):
                pass
    assert open_files_under(tmp_path) == []


@pytest.mark.parametrize("rule", [Fault("write", path=SPOOL, after=1, error=errno.ENOSPC),
                                  Fault("fsync", path=SPOOL),
                                  Fault("open", path=SPOOL, error=errno.EMFILE)],
                         ids=["enospc", "fsync", "create"])
async def test_a_disk_failure_of_the_receiver_reaches_the_sender_as_internal(
        tmp_path: Path, rule: Fault) -> None:
    src, dst = ProbedExchange(tmp_path / "src"), ProbedExchange(tmp_path / "dst")
    dst.io.add(rule)
    token = write_fsm(tmp_path / "src", 40, PAYLOAD)
    async with grpc_pair(snapshot_chunk_bytes=1 << 20, a_snapshots=src, b_snapshots=dst) as (
            a, b, inbox):
        with pytest.raises(DispatchError) as info:
            await a.send_snapshot(snap_msg(40, token))
        assert info.value.code == "Internal"
        assert "StorageIOError" in str(info.value)
        assert b.incoming_transfers() == 0
    assert inbox.messages == []
    assert dst.io.fired() and os.listdir(tmp_path / "dst") == []
    assert dst.protected_indexes() == frozenset()
    assert open_files_under(tmp_path) == []
