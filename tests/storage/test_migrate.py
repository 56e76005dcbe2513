"""migrate_fsm_store and rename_noreplace."""

from __future__ import annotations

import errno
import json
import os
import sys

import pytest

from trio_raft.core.messages import ConfState
from trio_raft.errors import MigrationDestinationExistsError, StorageError
from trio_raft.storage import migrate as mig
from trio_raft.storage import open_disk_state
from trio_raft.storage.fileio import fallback_rename_noreplace, native_rename_noreplace
from trio_raft.storage.peers import PersistedPeer, load_persisted_peers
from trio_raft.storage.recovery import RecoveryKind
from trio_raft.testing.faults import Fault, FaultyFileIO

from .helpers import KV

PEERS = [PersistedPeer(30, "n3", "h:3"), PersistedPeer(10, "n1", "h:1"),
         PersistedPeer(20, "n2", "h:2", "learner")]


def make_store(tmp_path, data: dict[str, str]) -> str:
    store = tmp_path / "store"
    store.mkdir()
    (store / mig.PAYLOAD_FILE_NAME).write_bytes(json.dumps(data).encode())
    return str(store)


def test_migrate_and_open(tmp_path) -> None:
    store = make_store(tmp_path, {"a": "1", "b": "2"})
    dest = tmp_path / "raft"
    stats = mig.migrate_fsm_store(store, dest, PEERS)
    assert stats == mig.MigrationStats(snapshot_bytes=len(json.dumps({"a": "1", "b": "2"})),
                                       peers=3)
    assert not os.path.exists(str(dest) + ".migrating")
    assert [n for n in os.listdir(store) if n != mig.PAYLOAD_FILE_NAME] == []  # spool gone
    peers = load_persisted_peers(dest)
    assert peers is not None and peers.index == 1 and not peers.seed_active
    kv = KV()
    ds = open_disk_state(dest, [], False, kv)
    assert ds.kind is RecoveryKind.RESTART
    assert kv.data == {"a": "1", "b": "2"} and ds.applied_index == 1
    assert ds.conf_state == ConfState(voters=[30, 10], learners=[20])  # given order
    assert ds.hard_state.commit == 1 and ds.hard_state.term == 1
    assert os.listdir(dest / "fsm-snap") == []  # inline payload, no .fsm
    ds.persistence.close()


def test_migrate_custom_store(tmp_path) -> None:
    class Store:
        closed = False

        def snapshot(self):
            return KV({"x": "y"}).snapshot()

        def close(self) -> None:
            Store.closed = True

    (tmp_path / "s").mkdir()
    stats = mig.migrate_fsm_store(str(tmp_path / "s"), tmp_path / "d", PEERS[:1],
                                  open_store=lambda p: Store())
    assert Store.closed and stats.peers == 1


def test_migrate_validation(tmp_path) -> None:
    store = make_store(tmp_path, {})
    with pytest.raises(ValueError):
        mig.migrate_fsm_store("", tmp_path / "d", PEERS)
    with pytest.raises(ValueError):
        mig.migrate_fsm_store(store, "", PEERS)
    with pytest.raises(ValueError):
        mig.migrate_fsm_store(store, tmp_path / "d", [])
    (tmp_path / "exists").mkdir()
    with pytest.raises(MigrationDestinationExistsError, match="destination already exists"):
        mig.migrate_fsm_store(store, tmp_path / "exists", PEERS)
    (tmp_path / "d2.migrating").mkdir()
    with pytest.raises(StorageError, match="already exists"):
        mig.migrate_fsm_store(store, tmp_path / "d2", PEERS)
    with pytest.raises(StorageError, match="no state machine payload"):
        mig.migrate_fsm_store(str(tmp_path / "nowhere"), tmp_path / "d3", PEERS)
    # an inline payload must not look like a snapshot descriptor
    (tmp_path / "store" / mig.PAYLOAD_FILE_NAME).write_bytes(b"TRSD not a descriptor")
    with pytest.raises(StorageError, match="descriptor magic"):
        mig.migrate_fsm_store(store, tmp_path / "d4", PEERS)
    assert not (tmp_path / "d4").exists() and not (tmp_path / "d4.migrating").exists()


def test_migrate_removes_temp_dir_on_failure(tmp_path) -> None:
    store = make_store(tmp_path, {})
    # Someone else creates the destination between the check and the final rename.
    fio = FaultyFileIO([Fault("rename_noreplace", error=errno.EEXIST)])
    with pytest.raises(MigrationDestinationExistsError):
        mig.migrate_fsm_store(store, tmp_path / "d", PEERS, file_io=fio)
    assert fio.fired()
    assert not (tmp_path / "d.migrating").exists() and not (tmp_path / "d").exists()


def test_rename_noreplace(tmp_path) -> None:
    (tmp_path / "a").mkdir()
    mig.rename_noreplace(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "b").is_dir() and not (tmp_path / "a").exists()
    (tmp_path / "c").mkdir()
    with pytest.raises(MigrationDestinationExistsError):
        mig.rename_noreplace(tmp_path / "c", tmp_path / "b")
    (tmp_path / "f").write_bytes(b"1")
    (tmp_path / "g").write_bytes(b"2")
    with pytest.raises(MigrationDestinationExistsError):
        mig.rename_noreplace(tmp_path / "f", tmp_path / "g")
    assert (tmp_path / "g").read_bytes() == b"2"
    os.symlink(tmp_path / "missing", tmp_path / "dangling")
    with pytest.raises(MigrationDestinationExistsError):
        mig.rename_noreplace(tmp_path / "f", tmp_path / "dangling")


def test_rename_noreplace_fallback(tmp_path) -> None:
    (tmp_path / "a").mkdir()
    fallback_rename_noreplace(str(tmp_path / "a"), str(tmp_path / "b"))
    assert (tmp_path / "b").is_dir()
    (tmp_path / "c").mkdir()
    with pytest.raises(FileExistsError):
        fallback_rename_noreplace(str(tmp_path / "c"), str(tmp_path / "b"))
    assert (tmp_path / "c").is_dir()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux-only")
def test_native_path_used_on_linux(tmp_path) -> None:
    (tmp_path / "a").mkdir()
    assert native_rename_noreplace(str(tmp_path / "a"), str(tmp_path / "b")) is True
    (tmp_path / "c").mkdir()
    with pytest.raises(FileExistsError):
        native_rename_noreplace(str(tmp_path / "c"), str(tmp_path / "b"))
