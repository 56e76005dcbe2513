"""open_disk_state and DiskPersistence under injected disk faults.

The exhaustive tests record every seam call of a fault-free run, then fail each call in turn
(a fresh data dir per run) and check what the next open, with the real seam, makes of it.
"""

from __future__ import annotations

import errno
import os

import pytest

from trio_raft.core.messages import ConfState, Entry, HardState, Snapshot, SnapshotMetadata
from trio_raft.errors import StorageError, WALIOError, WALPoisonedError
from trio_raft.storage import open_disk_state
from trio_raft.storage.fsm_snapshot import encode_snapshot_token, write_fsm_snapshot_file
from trio_raft.storage.peers import PersistedPeer
from trio_raft.storage.recovery import DiskPersistence, RecoveryKind
from trio_raft.storage.snapshots import Snapshotter
from trio_raft.testing.faults import Call, Fault, FaultyFileIO

from .helpers import KV

P1 = PersistedPeer(11, "n1", "h:1")
P2 = PersistedPeer(22, "n2", "h:2")
BOOT = {"boot": "state"}


def cmd(i: int) -> bytes:
    return b"k%d=v%d" % (i, i)


def leftovers(data_dir) -> list[str]:
    """Temporary names anywhere under ``data_dir``."""
    out = []
    for root, dirs, files in os.walk(data_dir):
        out += [os.path.join(root, n) for n in dirs + files if ".tmp" in n]
    return out


def rule_for(calls: list[Call], i: int) -> Fault:
    """A rule failing exactly ``calls[i]`` when the same calls are made again."""
    op = calls[i].op
    return Fault(op, after=sum(1 for c in calls[:i] if c.op == op))


def caused_by_injection(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.EIO:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def boot(data_dir, fio: FaultyFileIO):
    return open_disk_state(data_dir, [P1, P2], True, KV(BOOT), file_io=fio)


def test_every_failing_step_of_a_bootstrap_leaves_nothing_half_made(tmp_path) -> None:
    probe = FaultyFileIO()
    ds = boot(tmp_path / "probe", probe)
    calls = list(probe.calls)
    ds.persistence.close()
    assert len(calls) > 50 and {"write", "fsync", "fdatasync", "replace"} <= {c.op for c in calls}
    outcomes: dict[str, int] = {"raised": 0, "survived": 0, "restart": 0, "bootstrap": 0}
    for i in range(len(calls)):
        d = tmp_path / f"run{i}"
        fio = FaultyFileIO([rule_for(calls, i)])
        try:
            boot(d, fio).persistence.close()
        except StorageError as exc:
            assert caused_by_injection(exc), f"step {i} {calls[i]}: {exc!r}"
            outcomes["raised"] += 1
        else:  # a failure that cannot lose anything (closing a file only read) is logged
            outcomes["survived"] += 1
        assert fio.fired(), f"step {i} {calls[i]} was not reached"
        kv = KV(BOOT)
        again = open_disk_state(d, [P1, P2], True, kv)  # the real seam
        try:
            assert again.kind in (RecoveryKind.BOOTSTRAP, RecoveryKind.RESTART)
            outcomes[again.kind.value] += 1
            meta = again.snapshot.metadata
            assert (meta.index, meta.term, meta.conf_state) == (1, 1, ConfState([11, 22]))
            assert again.hard_state == HardState(term=1, commit=1) and again.entries == ()
            assert kv.data == BOOT
            assert kv.restores == (1 if again.kind is RecoveryKind.RESTART else 0)
            assert leftovers(d) == [], f"step {i} {calls[i]}"
        finally:
            again.persistence.close()
    # Both ends were reached: failures before the WAL was in place start over, later ones
    # find the complete boot state.
    assert outcomes["raised"] > 0.8 * len(calls)
    assert outcomes["restart"] > 0 and outcomes["bootstrap"] > 0


def run_node(ds, kv: KV, acked: list[int]) -> None:
    """What the engine does while running: entries (over segment cuts), a local snapshot with
    its retention, more entries, a membership change. ``acked`` gets every entry index whose
    save returned."""
    p = ds.persistence
    for i in range(2, 9):
        p.save_ready(HardState(1, 11, i), [Entry(1, i, data=cmd(i))], None, True)
        acked.append(i)
        kv.apply(cmd(i))
    token = p.write_fsm_snapshot(kv.snapshot(), 8)
    p.save_local_snapshot(8, 1, ConfState([11]), token)
    p.purge()
    for i in range(9, 12):
        p.save_ready(HardState(1, 11, i), [Entry(1, i, data=cmd(i))], None, True)
        acked.append(i)
    p.write_current_peers(11, [P1, P2])


def test_every_failing_step_of_a_running_node_keeps_what_was_acknowledged(tmp_path) -> None:
    def start(d, fio: FaultyFileIO):
        return open_disk_state(d, [P1], False, KV({"init": "1"}), segment_size=300,
                               max_wal_files=1, file_io=fio)

    probe = FaultyFileIO()
    ds = start(tmp_path / "probe", probe)
    probe.calls.clear()
    run_node(ds, KV({"init": "1"}), [])
    calls = list(probe.calls)
    ds.persistence.close()
    assert len(ds.wal.segments) > 1 and probe.calls_to("unlink")  # cuts and a purge happened
    for i in range(len(calls)):
        d = tmp_path / f"run{i}"
        fio = FaultyFileIO()
        ds = start(d, fio)
        fio.add(rule_for(calls, i))
        acked: list[int] = []
        try:
            run_node(ds, KV({"init": "1"}), acked)
        except StorageError as exc:
            assert caused_by_injection(exc), f"step {i} {calls[i]}: {exc!r}"
        assert fio.fired(), f"step {i} {calls[i]} was not reached"
        ds.persistence.close()
        kv = KV()
        again = open_disk_state(d, [P1], False, kv)  # never unopenable
        try:
            snap_index = again.snapshot.metadata.index
            by_index = {e.index: e for e in again.entries}
            for index in acked:  # every acknowledged entry is there (or in the snapshot)
                assert index <= snap_index or by_index[index].data == cmd(index), (i, calls[i])
            want = {"init": "1"} | {f"k{j}": f"v{j}" for j in range(2, snap_index + 1)}
            assert kv.data == want  # the snapshot restored is the one that was taken
            assert leftovers(d) == [], f"step {i} {calls[i]}"
        finally:
            again.persistence.close()


def test_a_failed_marker_of_a_received_snapshot_is_not_accepted(tmp_path) -> None:
    fio = FaultyFileIO()
    ds = open_disk_state(tmp_path, [P1, P2], False, KV(), file_io=fio)
    crc = write_fsm_snapshot_file(KV({"leader": "state"}).snapshot(), tmp_path / "fsm-snap", 40,
                                  file_io=fio)
    snap = Snapshot(SnapshotMetadata(ConfState([11, 22]), 40, 2), encode_snapshot_token(40, crc))
    fio.add(Fault("write", path="*.wal", error=errno.ENOSPC))
    with pytest.raises(WALIOError):
        ds.persistence.save_ready(HardState(2, 0, 40), [Entry(2, 41)], snap, True)
    with pytest.raises(WALPoisonedError):
        ds.persistence.save_ready(HardState(2, 0, 41), [Entry(2, 41)], None, True)
    ds.persistence.close()
    kv = KV()
    again = open_disk_state(tmp_path, [P1, P2], False, kv)
    # The .snap was written first, but without its WAL marker nothing refers to it.
    assert again.snapshot.is_empty() and again.entries == () and kv.restores == 0
    again.persistence.close()


def test_disk_persistence_does_everything_through_its_seam(tmp_path) -> None:
    fio = FaultyFileIO()
    kv = KV({"init": "1"})
    ds = open_disk_state(tmp_path, [P1], False, kv, segment_size=300, file_io=fio)
    p = ds.persistence
    assert p.file_io is fio and p.wal.file_io is fio and p.snapshotter.file_io is fio
    run_node(ds, kv, [])
    sink = KV()
    assert p.restore_snapshot_state(sink, p.snapshotter.load_newest_available(
        p.valid_snapshot_markers())) == 8  # type: ignore[arg-type]
    assert sink.data == kv.data and sink.data["k8"] == "v8"
    reader, size, _ = p.open_fsm_payload(8)
    with reader:
        assert len(reader.read()) == size
    assert len(p.read_fsm_payload(8)) == size
    p.close()
    touched = {os.path.relpath(c.path, tmp_path).split(os.sep)[0] for c in fio.calls
               if c.path.startswith(str(tmp_path))}
    assert {"wal", "snap", "fsm-snap", "trio-raft-peers.bin"} <= touched
    for suffix in (".wal", ".snap", ".fsm", "trio-raft-peers.bin"):
        assert any(c.op == "write" and suffix in c.path for c in fio.calls), suffix


def test_disk_persistence_refuses_two_seams(tmp_path) -> None:
    ds = open_disk_state(tmp_path, [P1], False, KV(), file_io=FaultyFileIO())
    try:
        with pytest.raises(ValueError, match="share one file_io"):
            DiskPersistence(str(tmp_path), ds.wal, Snapshotter(tmp_path / "snap"))
    finally:
        ds.persistence.close()
