"""open_disk_state: every recovery branch, and DiskPersistence's per-Ready operations."""

from __future__ import annotations

import json
import os

import pytest

from trio_raft.core.messages import ConfState, Entry, HardState, Snapshot, SnapshotMetadata
from trio_raft.errors import (
    FSMSnapshotFileCRCError,
    FSMSnapshotNotFoundError,
    FSMSnapshotTokenCRCError,
    NoPeersConfiguredError,
    SnapshotFileError,
    WALCorruptError,
)
from trio_raft.storage import open_disk_state
from trio_raft.storage import wal_records as rec
from trio_raft.storage.cluster_id import load_cluster_id
from trio_raft.storage.descriptor import descriptor_of, payload_ref
from trio_raft.storage.fsm_snapshot import fsm_snapshot_path
from trio_raft.storage.peers import PersistedPeer, load_persisted_peers
from trio_raft.storage.recovery import RecoveryKind
from trio_raft.storage.snapshots import Snapshotter, snap_name

from .helpers import KV, flip_bit, truncate

P1 = PersistedPeer(11, "n1", "h:1")
P2 = PersistedPeer(22, "n2", "h:2")
P3 = PersistedPeer(33, "n3", "h:3", "learner")


def cmd(i: int) -> bytes:
    return b"k%d=v%d" % (i, i)


def bootstrap(d, kv: KV | None = None, **kw):
    return open_disk_state(d, [P1], False, kv or KV({"init": "1"}), **kw)


def append_committed(ds, kv: KV, lo: int, hi: int, term: int = 1) -> None:
    """Persist entries lo..hi as committed and apply them, like the engine would."""
    es = [Entry(term, i, data=cmd(i)) for i in range(lo, hi + 1)]
    hs = HardState(term, 11, hi)
    ds.persistence.save_ready(hs, es, None, True)
    ds.storage.append(es)
    ds.storage.set_hard_state(hs)
    for e in es:
        kv.apply(e.data)


def test_fresh_single_peer_bootstraps(tmp_path) -> None:
    d = tmp_path / "data"
    kv = KV({"init": "1"})
    ds = open_disk_state(d, [P1], False, kv)
    assert ds.kind is RecoveryKind.BOOTSTRAP
    assert ds.hard_state == HardState(term=1, commit=1)
    meta = ds.snapshot.metadata
    assert (meta.index, meta.term, meta.conf_state) == (1, 1, ConfState([11]))
    assert payload_ref(ds.snapshot.data)[0] == 1
    assert os.path.exists(fsm_snapshot_path(d / "fsm-snap", 1))
    assert kv.handles[0].closed
    assert ds.applied_index == 1 and ds.entries == ()
    assert ds.storage.first_index() == 2 and ds.storage.last_index() == 1
    assert ds.storage.initial_state() == (HardState(term=1, commit=1), ConfState([11]))
    peers = load_persisted_peers(d)
    assert peers is not None and peers.index == 1 and peers.seed_active
    assert ds.persisted_peers == peers
    assert sorted(os.listdir(d)) == ["fsm-snap", "snap", "trio-raft-cluster-id.bin",
                                     "trio-raft-peers.bin", "wal"]
    # a single voter chooses the cluster id at bootstrap; the snapshot carries it and the
    # member list
    desc = descriptor_of(ds.snapshot.data)
    assert desc is not None and desc.cluster_id == ds.cluster_id == load_cluster_id(d)
    assert [(m.node_id, m.id, m.address) for m in desc.members] == [(11, "n1", "h:1")]
    ds.persistence.close()


def test_fresh_bootstrap_flag_with_several_peers(tmp_path) -> None:
    ds = open_disk_state(tmp_path, [P3, P2, P1], True, KV())
    assert ds.kind is RecoveryKind.BOOTSTRAP
    assert ds.conf_state == ConfState(voters=[11, 22], learners=[33])
    ds.persistence.close()


def test_fresh_joiner(tmp_path) -> None:
    kv = KV()
    ds = open_disk_state(tmp_path, [P1, P2], False, kv)
    assert ds.kind is RecoveryKind.JOIN
    assert ds.snapshot.is_empty() and ds.hard_state.is_empty() and ds.applied_index == 0
    assert ds.conf_state == ConfState()
    assert kv.handles == [] and kv.restores == 0
    ds.persistence.close()
    ds = open_disk_state(tmp_path, [P1, P2], False, kv)  # restart of an empty joiner
    assert ds.kind is RecoveryKind.RESTART and ds.snapshot.is_empty()
    ds.persistence.close()


def test_fresh_without_peers(tmp_path) -> None:
    with pytest.raises(NoPeersConfiguredError):
        open_disk_state(tmp_path, [], True, KV())


def test_restart_restores_fsm_and_replays_wal(tmp_path) -> None:
    kv = KV({"init": "1"})
    ds = bootstrap(tmp_path, kv)
    append_committed(ds, kv, 2, 30)
    ds.persistence.close()
    kv2 = KV()
    ds = bootstrap(tmp_path, kv2)
    assert ds.kind is RecoveryKind.RESTART
    assert kv2.data == {"init": "1"} and kv2.restores == 1  # from the .fsm file
    assert ds.applied_index == 1
    assert [e.index for e in ds.entries] == list(range(2, 31))
    assert ds.hard_state == HardState(1, 11, 30)
    assert ds.storage.last_index() == 30 and ds.storage.term(30) == 1
    assert ds.storage.entries(2, 4) == list(ds.entries[:2])
    ds.persistence.close()


def local_snapshot(ds, kv: KV, index: int) -> Snapshot:
    token = ds.persistence.write_fsm_snapshot(kv.snapshot(), index)
    snap = ds.persistence.save_local_snapshot(index, ds.storage.term(index),
                                              ds.storage.snapshot().metadata.conf_state, token)
    ds.storage.create_snapshot(index, None, token)
    ds.storage.compact(index)
    ds.persistence.purge()
    return snap


def test_restart_from_local_snapshot_with_purge(tmp_path) -> None:
    kv = KV({"init": "1"})
    ds = bootstrap(tmp_path, kv, segment_size=4096)
    for k in range(1, 7):
        append_committed(ds, kv, 2 + (k - 1) * 50, 1 + k * 50)
        local_snapshot(ds, kv, 1 + k * 50 - 10)
    append_committed(ds, kv, 302, 310)
    ds.persistence.close()
    # pre-write retention keeps one restorable, WAL-valid snapshot; then the new one is added
    assert [f.index for f in Snapshotter(tmp_path / "snap").files()] == [241, 291]
    assert len(os.listdir(tmp_path / "fsm-snap")) == 2
    assert len([n for n in os.listdir(tmp_path / "wal") if n.endswith(".wal")]) <= 6
    kv2 = KV()
    ds = bootstrap(tmp_path, kv2, segment_size=4096)
    assert ds.snapshot.metadata.index == 291
    assert ds.applied_index == 291
    assert [e.index for e in ds.entries] == list(range(292, 311))
    for e in ds.entries:
        kv2.apply(e.data)
    assert kv2.data == kv.data
    ds.persistence.close()


def test_newest_snap_corrupt_falls_back_to_older(tmp_path, caplog) -> None:
    kv = KV({"init": "1"})
    ds = bootstrap(tmp_path, kv)
    append_committed(ds, kv, 2, 20)
    local_snapshot(ds, kv, 10)
    append_committed(ds, kv, 21, 30)
    local_snapshot(ds, kv, 25)
    ds.persistence.close()
    flip_bit(tmp_path / "snap" / snap_name(1, 25), 12)
    kv2 = KV()
    ds = bootstrap(tmp_path, kv2)
    assert ds.snapshot.metadata.index == 10
    assert [e.index for e in ds.entries] == list(range(11, 31))
    assert "skipping unusable snapshot file" in caplog.text
    ds.persistence.close()


def _bootstrapped_with_snapshot(tmp_path) -> tuple[str, int]:
    kv = KV({"init": "1"})
    ds = bootstrap(tmp_path, kv)
    append_committed(ds, kv, 2, 20)
    snap = local_snapshot(ds, kv, 15)
    ds.persistence.close()
    return fsm_snapshot_path(tmp_path / "fsm-snap", 15), payload_ref(snap.data)[1]


def test_restart_missing_fsm_file(tmp_path) -> None:
    path, _ = _bootstrapped_with_snapshot(tmp_path)
    os.unlink(path)
    with pytest.raises(FSMSnapshotNotFoundError):
        bootstrap(tmp_path)


def test_restart_corrupt_fsm_file(tmp_path) -> None:
    path, _ = _bootstrapped_with_snapshot(tmp_path)
    flip_bit(path, 3)
    with pytest.raises(FSMSnapshotFileCRCError):
        bootstrap(tmp_path)


def test_restart_truncated_fsm_footer(tmp_path) -> None:
    path, _ = _bootstrapped_with_snapshot(tmp_path)
    truncate(path, os.path.getsize(path) - 2)
    with pytest.raises(FSMSnapshotTokenCRCError):
        bootstrap(tmp_path)


def test_restart_wal_corrupt_in_middle(tmp_path) -> None:
    kv = KV()
    ds = bootstrap(tmp_path, kv)
    append_committed(ds, kv, 2, 20)
    seg = ds.wal.segments[-1].path
    ds.persistence.close()
    flip_bit(seg, os.path.getsize(seg) // 2)
    with pytest.raises(WALCorruptError, match=os.path.basename(seg)):
        bootstrap(tmp_path)


def test_restart_torn_wal_tail_loses_only_the_torn_batch(tmp_path) -> None:
    kv = KV()
    ds = bootstrap(tmp_path, kv)
    append_committed(ds, kv, 2, 20)
    seg = ds.wal.segments[-1].path
    size = os.path.getsize(seg)
    append_committed(ds, kv, 21, 25)
    ds.persistence.close()
    truncate(seg, size + rec.HEADER_SIZE + 5)
    ds = bootstrap(tmp_path, KV())
    assert ds.entries[-1].index == 20 and ds.hard_state.commit == 20
    ds.persistence.close()


def test_restart_with_all_snapshot_files_gone(tmp_path) -> None:
    kv = KV()
    ds = bootstrap(tmp_path, kv, segment_size=2048)
    append_committed(ds, kv, 2, 100)
    local_snapshot(ds, kv, 90)
    ds.persistence.close()
    for n in os.listdir(tmp_path / "snap"):
        os.unlink(tmp_path / "snap" / n)
    with pytest.raises(SnapshotFileError, match=r"no usable \.snap file"):
        bootstrap(tmp_path, segment_size=2048)


def test_restart_falls_back_to_older_snapshot_after_purge(tmp_path) -> None:
    kv = KV()
    ds = bootstrap(tmp_path, kv, segment_size=1024, max_wal_files=1)
    for k in range(1, 5):
        append_committed(ds, kv, 2 + (k - 1) * 50, 1 + k * 50)
        local_snapshot(ds, kv, 1 + k * 50)
    ds.persistence.close()
    files = Snapshotter(tmp_path / "snap").files()
    assert [f.index for f in files] == [151, 201]
    os.unlink(files[-1].path)  # the newest .snap is lost
    kv2 = KV()
    ds = bootstrap(tmp_path, kv2, segment_size=1024)
    # the WAL was purged up to the segment cut right after 151, which still holds its marker
    assert ds.wal.segments[0].index == 152
    assert ds.snapshot.metadata.index == 151
    assert [e.index for e in ds.entries] == list(range(152, 202))
    for e in ds.entries:
        kv2.apply(e.data)
    assert kv2.data == kv.data
    ds.persistence.close()


def test_stale_files_are_cleaned_at_open(tmp_path) -> None:
    ds = bootstrap(tmp_path)
    ds.persistence.close()
    fd = tmp_path / "fsm-snap"
    junk = [tmp_path / "trio-raft-snapshot-123", fd / "trio-raft-snapshot-9",
            fd / "0000000000000002-abc.fsm.tmp", fd / "0000000000000007.fsm",
            tmp_path / "snap" / "0000000000000001-0000000000000009.snap.tmp-xyz",
            tmp_path / "trio-raft-peers.bin.tmp-1"]
    for p in junk:
        p.write_bytes(b"junk")
    (tmp_path / "trio-raft-snapshot-dir").mkdir()
    ds = bootstrap(tmp_path)
    for p in [*junk, tmp_path / "trio-raft-snapshot-dir"]:
        assert not p.exists(), p
    assert os.path.exists(fsm_snapshot_path(fd, 1))
    ds.persistence.close()


def test_interrupted_bootstrap_starts_fresh(tmp_path) -> None:
    # a crash after the .fsm and .snap files but before the WAL rename
    (tmp_path / "wal.tmp").mkdir()
    (tmp_path / "wal.tmp" / "0000000000000000-0000000000000000.wal").write_bytes(b"half")
    (tmp_path / "fsm-snap").mkdir()
    (tmp_path / "fsm-snap" / "0000000000000001.fsm").write_bytes(b"old")
    kv = KV({"x": "y"})
    ds = open_disk_state(tmp_path, [P1], False, kv)
    assert ds.kind is RecoveryKind.BOOTSTRAP
    ds.persistence.close()
    kv2 = KV()
    ds = open_disk_state(tmp_path, [P1], False, kv2)
    assert kv2.data == {"x": "y"}
    ds.persistence.close()


def test_joiner_installs_snapshot_then_restarts(tmp_path) -> None:
    ds = open_disk_state(tmp_path, [P1, P2], False, KV())
    # the transport spooled a .fsm for index 50 (written like any snapshot file)
    from trio_raft.storage.fsm_snapshot import encode_snapshot_token, write_fsm_snapshot_file

    leader_kv = KV({"leader": "state"})
    crc = write_fsm_snapshot_file(leader_kv.snapshot(), tmp_path / "fsm-snap", 50)
    snap = Snapshot(SnapshotMetadata(ConfState([11, 22]), 50, 3), encode_snapshot_token(50, crc))
    hs = HardState(3, 0, 50)
    ds.persistence.save_ready(hs, [Entry(3, 51, data=cmd(51))], snap, True)
    assert [m.index for m in ds.wal.valid_snapshot_entries()] == [50]
    ds.persistence.close()
    kv = KV()
    ds = open_disk_state(tmp_path, [P1, P2], False, kv)
    assert ds.snapshot == snap and kv.data == {"leader": "state"}
    assert [e.index for e in ds.entries] == [51] and ds.hard_state == hs
    assert ds.storage.first_index() == 51
    ds.persistence.close()


def test_install_marker_is_valid_even_if_entries_write_is_torn(tmp_path) -> None:
    ds = open_disk_state(tmp_path, [P1, P2], False, KV())
    crc = __import__("trio_raft.storage.fsm_snapshot", fromlist=["x"]).write_fsm_snapshot_file(
        KV({"a": "b"}).snapshot(), tmp_path / "fsm-snap", 40)
    from trio_raft.storage.fsm_snapshot import encode_snapshot_token

    snap = Snapshot(SnapshotMetadata(ConfState([11, 22]), 40, 2), encode_snapshot_token(40, crc))
    seg = ds.wal.segments[-1].path
    ds.persistence.save_ready(HardState(2, 0, 40), [], snap, True)
    size = os.path.getsize(seg)
    ds.persistence.save_ready(HardState(2, 0, 42), [Entry(2, 41), Entry(2, 42)], None, True)
    ds.persistence.close()
    truncate(seg, size + 2 * (rec.HEADER_SIZE + 21) - 5)  # the entries batch is torn
    kv = KV()
    ds = open_disk_state(tmp_path, [P1, P2], False, kv)
    assert ds.snapshot.metadata.index == 40 and kv.data == {"a": "b"}
    assert [e.index for e in ds.entries] == [41]
    ds.persistence.close()


def test_inline_payload_restart(tmp_path) -> None:
    ds = open_disk_state(tmp_path, [P1, P2], False, KV())
    payload = json.dumps({"inline": "yes"}).encode()
    snap = Snapshot(SnapshotMetadata(ConfState([11, 22]), 7, 1), payload)
    ds.persistence.save_ready(HardState(1, 0, 7), [], snap, True)
    ds.persistence.close()
    kv = KV()
    ds = open_disk_state(tmp_path, [P1, P2], False, kv)
    assert kv.data == {"inline": "yes"} and ds.applied_index == 7
    ds.persistence.close()


def test_persistence_is_safe_across_threads(tmp_path) -> None:
    import threading

    kv = KV()
    ds = bootstrap(tmp_path, kv)
    append_committed(ds, kv, 2, 10)
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for i in range(11, 200):
                ds.persistence.save_ready(HardState(1, 11, i), [Entry(1, i)], None, False)
        except BaseException as exc:  # pragma: no cover
            errors.append(exc)

    t = threading.Thread(target=writer)
    t.start()
    for idx in (5, 8, 10):
        token = ds.persistence.write_fsm_snapshot(kv.snapshot(), idx)
        ds.persistence.save_local_snapshot(idx, 1, ConfState([11]), token)
        ds.persistence.purge()
    t.join()
    assert not errors
    ds.persistence.close()
    ds = bootstrap(tmp_path, KV())
    assert ds.snapshot.metadata.index == 10 and ds.entries[-1].index == 199
    ds.persistence.close()


def test_try_save_state_writes_a_commit_update_without_the_lock_holder(tmp_path) -> None:
    kv = KV({"init": "1"})
    ds = bootstrap(tmp_path, kv)
    append_committed(ds, kv, 2, 10)
    p = ds.persistence
    # Another writer holds the lock: nothing is written, the caller falls back to the slow path.
    with p._lock:
        assert p.try_save_state(HardState(1, 11, 12)) is False
    assert p.wal.hard_state.commit == 10
    p.save_ready(None, [Entry(1, 11), Entry(1, 12)], None, True)
    assert p.try_save_state(HardState(1, 11, 12)) is True
    p.close()
    ds = bootstrap(tmp_path, KV())
    assert ds.hard_state == HardState(1, 11, 12)
    assert ds.entries[-1].index == 12
    ds.persistence.close()
