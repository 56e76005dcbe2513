""".fsm payload files, .snap metadata files and the peers file under injected disk faults:
a typed error, no temporary file left, and the previous file intact and readable."""

from __future__ import annotations

import errno
import os

import pytest

from trio_raft.core.messages import ConfState, Snapshot, SnapshotMetadata
from trio_raft.errors import SnapshotFileError, StorageError, StorageIOError
from trio_raft.storage import fsm_snapshot as fsm
from trio_raft.storage import snapshots as snaps
from trio_raft.storage.peers import (
    PersistedPeer,
    load_persisted_peers,
    save_persisted_peers,
    write_current_persisted_peers,
)
from trio_raft.testing.faults import Fault, FaultyFileIO

from .helpers import BytesSnapshot, RawSink

BIG = bytes(range(256)) * (12 << 10)  # 3 MiB: several 1 MiB buffer flushes


def only(directory) -> list[str]:
    return sorted(os.listdir(directory))


# -- .fsm ---------------------------------------------------------------------------------------

# ``BIG`` written in 64 KiB chunks reaches the file in five writes: three flushes of the 1 MiB
# buffer (15 chunks each), the last 3 chunks, then the 4-byte footer.
FSM_FAULTS: dict[str, list[Fault]] = {
    "enospc mid-write": [Fault("write", path="*.fsm.tmp", after=1, error=errno.ENOSPC)],
    "short write then enospc": [Fault("write", path="*.fsm.tmp", after=1, short_write=100),
                                Fault("write", path="*.fsm.tmp", after=2, error=errno.ENOSPC)],
    "eio on the footer": [Fault("write", path="*.fsm.tmp", after=4)],
    "failed fsync": [Fault("fsync", path="*.fsm.tmp")],
    "failed close": [Fault("close", path="*.fsm.tmp")],
    "failed rename": [Fault("replace", path="*.fsm.tmp")],
    "failed create": [Fault("open", path="*.fsm.tmp", error=errno.ENOSPC)],
}


@pytest.mark.parametrize("case", sorted(FSM_FAULTS))
@pytest.mark.parametrize("index", [5, 9], ids=["over-existing", "new-index"])
def test_failed_fsm_write_leaves_no_temp_and_the_previous_file(tmp_path, case: str,
                                                               index: int) -> None:
    crc_old = fsm.write_fsm_snapshot_file(BytesSnapshot(b"index five"), tmp_path, 5)
    crc_older = fsm.write_fsm_snapshot_file(BytesSnapshot(b"index three"), tmp_path, 3)
    fio = FaultyFileIO(FSM_FAULTS[case])
    with pytest.raises(StorageIOError) as info:
        fsm.write_fsm_snapshot_file(BytesSnapshot(BIG, chunk=64 << 10), tmp_path, index,
                                    file_io=fio)
    err = info.value
    fired = fio.fired()[-1]  # the short write (when there is one) fired first
    assert fired.fault is not None and err.errno == fired.fault.error
    assert fsm.TMP_SUFFIX in err.path and isinstance(err.__cause__, OSError)
    if case == "eio on the footer":
        assert fired.nbytes == fsm.FOOTER_SIZE
    if case != "failed rename":
        assert fio.calls_to("replace") == []  # never renamed
    assert only(tmp_path) == ["0000000000000003.fsm", "0000000000000005.fsm"]
    assert fsm.read_fsm_snapshot_payload(fsm.fsm_snapshot_path(tmp_path, 5)) == b"index five"
    fsm.verify_fsm_snapshot_file(fsm.fsm_snapshot_path(tmp_path, 5), crc_old)
    fsm.verify_fsm_snapshot_file(fsm.fsm_snapshot_path(tmp_path, 3), crc_older)


def test_fsm_write_failure_swallowed_by_write_to_is_still_reported(tmp_path) -> None:
    class Careless:
        def write_to(self, writer) -> int:
            try:
                for _ in range(4):
                    writer.write(b"z" * (1 << 20))
            except OSError:  # a state machine that hides the error
                pass
            except StorageError:
                pass
            return 4 << 20

        def close(self) -> None:
            pass

    fio = FaultyFileIO([Fault("write", path="*.fsm.tmp", after=1, error=errno.ENOSPC)])
    with pytest.raises(StorageIOError) as info:
        fsm.write_fsm_snapshot_file(Careless(), tmp_path, 7, file_io=fio)
    assert info.value.errno == errno.ENOSPC
    assert only(tmp_path) == []


def test_fsm_short_writes_are_completed(tmp_path) -> None:
    fio = FaultyFileIO([Fault("write", path="*.fsm.tmp", short_write=1000, repeat=True)])
    crc = fsm.write_fsm_snapshot_file(BytesSnapshot(BIG, chunk=64 << 10), tmp_path, 4,
                                      file_io=fio)
    path = fsm.fsm_snapshot_path(tmp_path, 4)
    assert fsm.read_fsm_snapshot_payload(path) == BIG
    fsm.verify_fsm_snapshot_file(path, crc)


def test_fsm_read_faults_are_typed(tmp_path) -> None:
    crc = fsm.write_fsm_snapshot_file(BytesSnapshot(BIG), tmp_path, 2)
    path = fsm.fsm_snapshot_path(tmp_path, 2)
    for fault, call in [
        (Fault("pread"), lambda fio: fsm.read_fsm_snapshot_payload(path, file_io=fio)),
        (Fault("readinto", after=1),
         lambda fio: fsm.open_and_restore_fsm_snapshot(RawSink(), path, crc, file_io=fio)),
        (Fault("readinto"), lambda fio: fsm.verify_fsm_snapshot_file(path, crc, file_io=fio)),
        (Fault("fstat"), lambda fio: fsm.open_fsm_snapshot_payload(path, file_io=fio)),
    ]:
        fio = FaultyFileIO([fault])
        with pytest.raises(StorageIOError) as info:
            call(fio)
        assert info.value.path == path and info.value.op == "read"
        opened, closed = len(fio.calls_to("open")), len(fio.calls_to("close"))
        assert opened == closed == 1  # no descriptor leaked


# -- .snap ---------------------------------------------------------------------------------------


def snap_at(index: int, voters: list[int], data: bytes) -> Snapshot:
    return Snapshot(SnapshotMetadata(ConfState(voters), index, 2), data)


@pytest.mark.parametrize("fault", [
    Fault("write", path=".snap.tmp-", error=errno.ENOSPC),
    Fault("fsync", path=".snap.tmp-"),
    Fault("replace", path=".snap.tmp-"),
    Fault("open", path=".snap.tmp-", error=errno.EDQUOT),
], ids=lambda f: f"{sorted(f.ops)[0]}-{errno.errorcode[f.error]}")
def test_failed_snap_save_leaves_the_previous_file_readable(tmp_path, fault: Fault) -> None:
    old = snap_at(10, [1, 2, 3], b"old token")
    sn = snaps.Snapshotter(tmp_path / "snap")
    path = sn.save(old)
    faulty = snaps.Snapshotter(tmp_path / "snap", file_io=FaultyFileIO([fault]))
    with pytest.raises(StorageIOError) as info:
        faulty.save(snap_at(10, [1, 2], b"new token"))  # the same file name
    assert info.value.errno == fault.error and ".snap.tmp-" in info.value.path
    assert only(tmp_path / "snap") == [os.path.basename(path)]
    assert sn.load(path) == old


def test_snap_read_failure_falls_back_to_an_older_valid_snapshot(tmp_path, caplog) -> None:
    sn = snaps.Snapshotter(tmp_path / "snap")
    older, newer = snap_at(5, [1], b"a"), snap_at(9, [1], b"b")
    sn.save(older)
    newest_path = sn.save(newer)
    fio = FaultyFileIO([Fault("readinto", path=newest_path, error=errno.EIO)])
    reading = snaps.Snapshotter(tmp_path / "snap", file_io=fio)
    with pytest.raises(SnapshotFileError, match="Input/output error") as info:
        reading.load(newest_path)
    assert isinstance(info.value.__cause__, OSError)
    fio.clear()
    fio.add(Fault("readinto", path=newest_path))
    assert reading.load_newest_available([older.metadata, newer.metadata]) == older
    assert "skipping unusable snapshot file" in caplog.text


# -- peers file ---------------------------------------------------------------------------------

PEERS_1 = [PersistedPeer(1, "n1", "h:1"), PersistedPeer(2, "n2", "h:2")]
PEERS_2 = [*PEERS_1, PersistedPeer(3, "n3", "h:3", "learner")]


@pytest.mark.parametrize("fault", [
    Fault("write", path="peers.bin.tmp-", error=errno.ENOSPC),
    Fault("write", path="peers.bin.tmp-", short_write=7),  # completed: succeeds
    Fault("fsync", path="peers.bin.tmp-"),
    Fault("replace", path="peers.bin.tmp-"),
], ids=["enospc", "short", "fsync", "rename"])
def test_failed_peers_write_leaves_the_previous_file_readable(tmp_path, fault: Fault) -> None:
    assert save_persisted_peers(tmp_path, 1, PEERS_1, seed=PEERS_1)
    fio = FaultyFileIO([fault])
    if fault.short_write is not None:
        write_current_persisted_peers(tmp_path, 2, PEERS_2, file_io=fio)
        assert load_persisted_peers(tmp_path).peers == tuple(PEERS_2)  # type: ignore[union-attr]
        return
    with pytest.raises(StorageIOError) as info:
        write_current_persisted_peers(tmp_path, 2, PEERS_2, file_io=fio)
    assert info.value.errno == fault.error
    pf = load_persisted_peers(tmp_path)
    assert pf is not None and pf.index == 1 and pf.peers == tuple(PEERS_1) and pf.seed_active
    assert only(tmp_path) == ["trio-raft-peers.bin"]


def test_peers_read_failure_is_typed(tmp_path) -> None:
    save_persisted_peers(tmp_path, 1, PEERS_1)
    with pytest.raises(StorageIOError) as info:
        load_persisted_peers(tmp_path, file_io=FaultyFileIO([Fault("readinto")]))
    assert info.value.op == "read" and info.value.path.endswith("trio-raft-peers.bin")
