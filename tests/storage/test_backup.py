"""Backup files, export from a stopped data dir, restore into an empty data dir, and recovery
of a survivor's membership (trio_raft/storage/backup.py, restore.py)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from trio_raft.core.messages import (
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    EntryType,
    HardState,
)
from trio_raft.errors import (
    BackupFileError,
    DataDirNotEmptyError,
    RecoveryError,
    StorageIOError,
    WALLockedError,
)
from trio_raft.storage import backup as bk
from trio_raft.storage import open_disk_state
from trio_raft.storage.cluster_id import load_cluster_id
from trio_raft.storage.descriptor import LEARNER, SnapshotMember, descriptor_of
from trio_raft.storage.peers import PersistedPeer, load_persisted_peers
from trio_raft.storage.recovery import RecoveryKind
from trio_raft.storage.restore import recover_cluster, restore_backup
from trio_raft.storage.wal import WAL
from trio_raft.testing.faults import Fault, FaultyFileIO

from .helpers import KV, BytesSnapshot

MEMBERS = (SnapshotMember(11, "n1", "h:1"), SnapshotMember(22, "n2", "h:2"),
           SnapshotMember(33, "n3", "h:3", LEARNER))
P1, P2, P3 = (PersistedPeer(11, "n1", "h:1"), PersistedPeer(22, "n2", "h:2"),
              PersistedPeer(33, "n3", "h:3"))


def make_backup(path: Path, payload: bytes = b'{"a": "1"}') -> bk.BackupInfo:
    info = bk.BackupInfo(40, 3, "abc", MEMBERS)
    return bk.write_backup(path, info, BytesSnapshot(payload))


def test_write_read_verify(tmp_path: Path) -> None:
    path = tmp_path / "b.bak"
    written = make_backup(path)
    assert written.payload_bytes == 10 and written.file_bytes == path.stat().st_size
    assert [p.name for p in tmp_path.iterdir()] == ["b.bak"]  # no temporary file left
    info = bk.verify_backup(path)
    assert info == written
    assert info.conf_state == ConfState([11, 22], [33])
    assert path.read_bytes()[:5] == b"TRBK\x01"


def test_every_damage_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "b.bak"
    make_backup(path)
    raw = path.read_bytes()
    bad = tmp_path / "bad.bak"
    for i in range(len(raw)):
        damaged = bytearray(raw)
        damaged[i] ^= 0x10
        bad.write_bytes(bytes(damaged))
        with pytest.raises(BackupFileError):
            bk.verify_backup(bad)
    for n in range(len(raw)):
        bad.write_bytes(raw[:n])
        with pytest.raises(BackupFileError):
            bk.verify_backup(bad)
    bad.write_bytes(raw + b"\x00")
    with pytest.raises(BackupFileError):
        bk.verify_backup(bad)


def test_a_failed_write_leaves_nothing(tmp_path: Path) -> None:
    fio = FaultyFileIO([Fault("fsync", path="*.tmp-*", error=errno.EIO)])
    with pytest.raises(StorageIOError):
        bk.write_backup(tmp_path / "b.bak", bk.BackupInfo(5, 1), BytesSnapshot(b"x"),
                        file_io=fio)
    assert fio.fired() and list(tmp_path.iterdir()) == []


def test_restore_into_an_empty_data_dir(tmp_path: Path) -> None:
    path = tmp_path / "b.bak"
    make_backup(path, b'{"k": "v"}')
    dest = tmp_path / "data"
    dest.mkdir()  # an empty directory is fine
    info = restore_backup(path, dest, [P1, P2])
    assert info.index == 40 and not (tmp_path / "data.restoring").exists()
    assert load_cluster_id(dest) is None  # two voters: their first leader chooses it
    kv = KV()
    ds = open_disk_state(dest, [], False, kv)
    try:
        assert ds.kind is RecoveryKind.RESTART and kv.data == {"k": "v"}
        meta = ds.snapshot.metadata
        assert (meta.index, meta.term, meta.conf_state) == (40, 3, ConfState([11, 22]))
        assert ds.hard_state == HardState(term=3, commit=40)
        desc = descriptor_of(ds.snapshot.data)
        assert desc is not None and [m.id for m in desc.members] == ["n1", "n2"]
        pf = load_persisted_peers(dest)
        assert pf is not None and pf.index == 40 and not pf.seed_active
    finally:
        ds.persistence.close()
    # one voter: a new cluster id right away, never the backup's
    single = tmp_path / "single"
    restore_backup(path, single, [P1])
    cid = load_cluster_id(single)
    assert cid and cid != "abc"
    # the same file restored twice gives two clusters
    restore_backup(path, tmp_path / "single2", [P1])
    assert load_cluster_id(tmp_path / "single2") not in (None, cid)


def test_restore_refusals(tmp_path: Path) -> None:
    path = tmp_path / "b.bak"
    make_backup(path)
    full = tmp_path / "full"
    full.mkdir()
    (full / "something").write_text("x")
    with pytest.raises(DataDirNotEmptyError):
        restore_backup(path, full, [P1])
    assert os.listdir(full) == ["something"]
    raw = bytearray(path.read_bytes())
    raw[-7] ^= 1  # inside the payload length
    path.write_bytes(bytes(raw))
    with pytest.raises(BackupFileError):
        restore_backup(path, tmp_path / "d", [P1])
    assert not (tmp_path / "d").exists() and not (tmp_path / "d.restoring").exists()
    with pytest.raises(ValueError):
        restore_backup(path, tmp_path / "d", [])


def test_restore_failure_leaves_no_data_dir(tmp_path: Path) -> None:
    path = tmp_path / "b.bak"
    make_backup(path)
    fio = FaultyFileIO([Fault("fdatasync", path="*.wal", error=errno.ENOSPC)])
    with pytest.raises(StorageIOError):
        restore_backup(path, tmp_path / "d", [P1], file_io=fio)
    assert fio.fired()
    assert not (tmp_path / "d").exists() and not (tmp_path / "d.restoring").exists()


def booted(tmp_path: Path, peers: list[PersistedPeer]) -> str:
    d = str(tmp_path / "node")
    kv = KV({"boot": "1"})
    ds = open_disk_state(d, peers, True, kv)
    ds.persistence.close()
    return d


def test_export_from_a_stopped_data_dir(tmp_path: Path) -> None:
    d = booted(tmp_path, [P1])
    info = bk.export_data_dir(d, tmp_path / "x.bak")
    assert info.index == 1 and info.term == 1 and info.cluster_id == load_cluster_id(d)
    assert [(m.id, m.address) for m in info.members] == [("n1", "h:1")]
    assert bk.verify_backup(tmp_path / "x.bak") == info
    # and it restores
    restore_backup(tmp_path / "x.bak", tmp_path / "r", [P1])
    kv = KV()
    open_disk_state(tmp_path / "r", [], False, kv).persistence.close()
    assert kv.data == {"boot": "1"}
    # refused while the node runs (the WAL lock), and for a damaged payload
    with WAL.open(os.path.join(d, "wal")), pytest.raises(WALLockedError):
        bk.export_data_dir(d, tmp_path / "y.bak")
    fsm_file = next((Path(d) / "fsm-snap").iterdir())
    raw = bytearray(fsm_file.read_bytes())
    raw[0] ^= 1
    fsm_file.write_bytes(bytes(raw))
    with pytest.raises(Exception, match="CRC32C"):
        bk.export_data_dir(d, tmp_path / "z.bak")
    assert not (tmp_path / "z.bak").exists()


def _cc(index: int, term: int, kind: ConfChangeType, nid: int) -> Entry:
    return Entry(term, index, EntryType.CONF_CHANGE, ConfChange(kind, nid).encode())


def test_recover_keeps_every_entry_and_leaves_the_given_voters(tmp_path: Path) -> None:
    d = booted(tmp_path, [P1, P2, P3])
    with WAL.open(os.path.join(d, "wal")) as wal:
        entries = [Entry(2, i, data=b"set k%d v" % i) for i in range(2, 6)]
        entries.append(_cc(6, 2, ConfChangeType.ADD_LEARNER_NODE, 44))  # never committed
        wal.save(HardState(2, 11, 3), entries, sync=True)
    with pytest.raises(RecoveryError, match="not members"):
        recover_cluster(d, [P1, PersistedPeer(55, "n5", "h:5")])
    with pytest.raises(RecoveryError, match="must be one of"):
        recover_cluster(d, [P2], local_id="n1")
    with WAL.open(os.path.join(d, "wal")), pytest.raises(WALLockedError):
        recover_cluster(d, [P1])
    old_id = load_cluster_id(d)
    info = recover_cluster(d, [PersistedPeer(11, "n1", "h:9")], local_id="n1")
    assert info.last_index == 6 and info.previous_commit == 3
    assert info.removed == (22, 33, 44) and info.promoted == ()
    assert info.config_index == 9 and info.cluster_id not in (None, old_id)
    assert load_cluster_id(d) == info.cluster_id
    kv = KV()
    ds = open_disk_state(d, [], False, kv)
    try:
        assert [e.index for e in ds.entries] == list(range(2, 10))
        assert ds.hard_state.commit == 9  # everything held is committed now
        removals = [ConfChange.decode(e.data) for e in ds.entries[-3:]]
        assert [(c.type, c.node_id) for c in removals] == [
            (ConfChangeType.REMOVE_NODE, n) for n in (22, 33, 44)]
        pf = load_persisted_peers(d)
        assert pf is not None
        assert {p.node_id: p.address for p in pf.peers}[11] == "h:9"  # given address wins
        assert {22, 33} <= {p.node_id for p in pf.peers}  # kept until the removals apply
    finally:
        ds.persistence.close()
