"""Preparing a data dir from a backup, and rewriting a survivor's membership after a lost
quorum (docs/operations.md: restore, recovery from lost quorum).

:func:`restore_backup` builds a data dir from which an engine opened with the same id and peers
starts a **new cluster** holding exactly the backup's data: ``fsm-snap/<index>.fsm`` (the
payload), ``snap/<term>-<index>.snap`` (conf state: the given peers; data: a descriptor with the
peers' addresses and, with a single voter, a new cluster id), a WAL with the snapshot marker and
hard state (backup term, commit = backup index), the peers file and the cluster id file. Every
member of the new cluster is restored from the same file with the same peers; with several
voters their first leader chooses the cluster id (``trio_raft/engine/identity.py``). It is
built under ``<data_dir>.restoring`` and renamed into place, so a failure leaves no data dir
(only an empty one it found). It refuses a data dir that holds anything
(:class:`~trio_raft.errors.DataDirNotEmptyError`) and a damaged backup
(:class:`~trio_raft.errors.BackupFileError`, checked whole before anything is written).

:func:`recover_cluster` is the unsafe way out of a lost quorum (like etcd's
``--force-new-cluster``): on a *stopped* member (the WAL directory lock refuses a running one),
every entry the member holds is kept and declared committed, and configuration changes are
appended that leave exactly the given peers (a subset of the current members, this one
included) as voters; the data dir gets a new cluster id. When the engine opens it, it applies
those changes, elects itself when it is the only voter, and writes a snapshot with the new
membership and id. Entries a lost majority committed but this member never received are gone:
docs/operations.md says when not to use it.

Every file access goes through the :class:`~trio_raft.storage.fileio.FileIO` given as
``file_io`` (the real one by default).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import attrs

from trio_raft.core.errors import ConfChangeError
from trio_raft.core.messages import (
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    EntryType,
    HardState,
    Snapshot,
    SnapshotMetadata,
)
from trio_raft.errors import DataDirNotEmptyError, RecoveryError, SnapshotFileError
from trio_raft.storage import descriptor as desc
from trio_raft.storage.backup import BackupInfo, BackupPayload, read_backup_info, verify_backup
from trio_raft.storage.cluster_id import new_cluster_id, save_cluster_id
from trio_raft.storage.fileio import DIR_MODE, OS_FILE_IO, FileIO
from trio_raft.storage.fileutil import (
    fsync_dir,
    io_errors,
    is_dir,
    lexists,
    listdir_if_exists,
    make_dirs,
    remove_tree,
)
from trio_raft.storage.fsm_snapshot import encode_snapshot_token, write_fsm_snapshot_file
from trio_raft.storage.migrate import rename_noreplace
from trio_raft.storage.peers import (
    LEARNER,
    VOTER,
    PersistedPeer,
    load_persisted_peers,
    save_persisted_peers,
    write_current_persisted_peers,
)
from trio_raft.storage.recovery import (
    FSM_DIR,
    SNAP_DIR,
    WAL_DIR,
    boot_conf_state,
    snapshot_members,
)
from trio_raft.storage.sealing import PayloadCipher, require_cipher
from trio_raft.storage.snapshots import Snapshotter
from trio_raft.storage.wal import WAL

log = logging.getLogger(__name__)

RESTORING_SUFFIX = ".restoring"


def restore_backup(backup_path: str | os.PathLike[str], data_dir: str | os.PathLike[str],
                   peers: Sequence[PersistedPeer], *,
                   file_io: FileIO = OS_FILE_IO,
                   cipher: PayloadCipher | None = None) -> BackupInfo:
    """Prepare ``data_dir`` (absent or empty) from the backup at ``backup_path`` for a new
    cluster of ``peers``; returns what the backup holds. See the module docstring.

    A sealed backup needs ``cipher`` (opened with the cluster's KEK, holding the key the
    payload is sealed under: the caller installs the backup's key ring first, e.g. with
    ``trio_raft.engine.envelope_gate.adopt_envelope``): every chunk is verified before
    anything is written, the payload is kept sealed in ``fsm-snap/``, and the snapshot
    descriptor carries the key ring, the cutover and the sealed key id, so the restored node
    has every key it needs."""
    backup_path, dest = os.fspath(backup_path), os.path.abspath(os.fspath(data_dir))
    if not peers or not any(p.suffrage != LEARNER for p in peers):
        raise ValueError("restore: at least one voter is required")
    if any(p.node_id <= 0 or not p.id or not p.address for p in peers) or \
            len({p.node_id for p in peers}) != len(peers):
        raise ValueError("restore: every peer needs a distinct node id, an id and an address")
    if lexists(dest, file_io=file_io) and (
            not is_dir(dest, file_io=file_io) or listdir_if_exists(dest, file_io=file_io)):
        raise DataDirNotEmptyError(f"{dest}: restore needs an empty data dir")
    info = read_backup_info(backup_path, file_io=file_io)
    if info.sealed:
        require_cipher(cipher, info.envelope.sealed_key_id, backup_path)
    info = verify_backup(backup_path, file_io=file_io, cipher=cipher)
    tmp = dest + RESTORING_SUFFIX
    remove_tree(tmp, file_io=file_io)  # a failed earlier attempt
    parent = os.path.dirname(dest)
    make_dirs(parent, file_io=file_io)
    voters = [p for p in peers if p.suffrage != LEARNER]
    cluster_id = new_cluster_id() if len(voters) == 1 else ""
    try:
        with io_errors("mkdir", tmp):
            file_io.mkdir(tmp, DIR_MODE)
        crc = write_fsm_snapshot_file(BackupPayload(backup_path, file_io),
                                      os.path.join(tmp, FSM_DIR), info.index, file_io=file_io)
        data = desc.encode_descriptor(desc.SnapshotDescriptor(
            encode_snapshot_token(info.index, crc), cluster_id, snapshot_members(peers),
            envelope=info.envelope))
        snap = Snapshot(SnapshotMetadata(boot_conf_state(peers), info.index, info.term), data)
        Snapshotter(os.path.join(tmp, SNAP_DIR), file_io=file_io).save(snap)
        with WAL.create(os.path.join(tmp, WAL_DIR), file_io=file_io) as wal:
            wal.save_snapshot(snap.metadata, HardState(term=info.term, commit=info.index))
        save_persisted_peers(tmp, info.index, peers, file_io=file_io)
        if cluster_id:
            save_cluster_id(tmp, cluster_id, file_io=file_io)
        fsync_dir(tmp, file_io=file_io)
        if lexists(dest, file_io=file_io):
            with io_errors("rmdir", dest):
                file_io.rmdir(dest)  # empty (checked); the rename below must not replace
        rename_noreplace(tmp, dest, file_io=file_io)
        fsync_dir(parent, file_io=file_io)
    except BaseException:
        try:
            remove_tree(tmp, file_io=file_io)
        except Exception as exc:  # the original error matters more
            log.warning("restore: removing %s failed: %s", tmp, exc)
        raise
    log.info("restored %s into %s: index %d term %d, %d payload bytes, %d peer(s)",
             backup_path, dest, info.index, info.term, info.payload_bytes, len(peers))
    return info


# -- recovery from a lost quorum ---------------------------------------------------------------


@attrs.frozen
class RecoveryInfo:
    """What :func:`recover_cluster` did."""

    #: Index of the last entry the member held (all of them are kept and now committed).
    last_index: int
    #: The commit index the member had recorded before.
    previous_commit: int
    #: Members removed from the configuration (node ids).
    removed: tuple[int, ...]
    #: Learners made voters (node ids).
    promoted: tuple[int, ...]
    #: Index of the last configuration change appended.
    config_index: int
    cluster_id: str


def _apply(cs: ConfState, cc: ConfChange) -> ConfState:
    voters, learners = set(cs.voters), set(cs.learners)
    nid = cc.node_id
    if cc.type is ConfChangeType.ADD_NODE:
        voters.add(nid)
        learners.discard(nid)
    elif cc.type is ConfChangeType.ADD_LEARNER_NODE:
        if nid not in voters:
            learners.add(nid)
    elif cc.type is ConfChangeType.REMOVE_NODE:
        voters.discard(nid)
        learners.discard(nid)
    return ConfState(voters=sorted(voters), learners=sorted(learners))


def recover_cluster(data_dir: str | os.PathLike[str], peers: Sequence[PersistedPeer], *,
                    local_id: str = "", file_io: FileIO = OS_FILE_IO) -> RecoveryInfo:
    """Rewrite the membership of the stopped member at ``data_dir`` (``local_id``, checked to
    be among ``peers`` when given) to ``peers`` (voters, all current members), keeping every
    entry it holds; see the module docstring. Raises WALLockedError while the member runs,
    RecoveryError for peers that cannot be used (nothing is changed then)."""
    data_dir = os.fspath(data_dir)
    if not peers:
        raise RecoveryError("recover: at least one peer is required")
    if local_id and local_id not in {p.id for p in peers}:
        raise RecoveryError(f"recover: this member ({local_id}) must be one of the peers")
    with WAL.open(os.path.join(data_dir, WAL_DIR), file_io=file_io) as wal:
        valid = wal.valid_snapshot_entries()
        snap = Snapshotter(os.path.join(data_dir, SNAP_DIR),
                           file_io=file_io).load_newest_available(valid)
        if snap is None and valid:
            raise SnapshotFileError(f"{data_dir}: no usable .snap for the WAL's snapshots")
        meta = snap.metadata if snap is not None else SnapshotMetadata()
        contents = wal.read_all(meta.index, meta.term)
        cs = meta.conf_state
        if cs.is_joint():
            raise RecoveryError("recover: joint configurations are not supported")
        for ent in contents.entries:
            if ent.type is EntryType.CONF_CHANGE_V2:
                raise RecoveryError(f"recover: entry {ent.index} is a joint configuration change")
            if ent.type is EntryType.CONF_CHANGE:
                try:
                    cs = _apply(cs, ConfChange.decode(ent.data))
                except ConfChangeError as exc:
                    raise RecoveryError(f"recover: entry {ent.index}: {exc}") from None
        members = set(cs.voters) | set(cs.learners)
        wanted = {p.node_id for p in peers}
        strangers = sorted(wanted - members)
        if strangers:
            raise RecoveryError(
                f"recover: {strangers} are not members; recover to the surviving members, "
                "then add new ones as learners")
        removed = tuple(sorted(members - wanted))
        promoted = tuple(sorted(wanted & set(cs.learners)))
        last = contents.entries[-1] if contents.entries else None
        last_index = last.index if last is not None else meta.index
        term = max(contents.hard_state.term, last.term if last is not None else meta.term, 1)
        changes = [ConfChange(ConfChangeType.ADD_NODE, nid) for nid in promoted]
        changes += [ConfChange(ConfChangeType.REMOVE_NODE, nid) for nid in removed]
        entries = [Entry(term, last_index + 1 + i, EntryType.CONF_CHANGE, cc.encode())
                   for i, cc in enumerate(changes)]
        new_last = last_index + len(entries)
        hs = contents.hard_state
        vote = hs.vote if hs.term == term else 0
        cluster_id = new_cluster_id()
        # The peers file keeps every member's address (the changes are applied one by one at
        # the next open, each configuration in between must be reachable on paper); the
        # given addresses win for the survivors.
        pf = load_persisted_peers(data_dir, file_io=file_io)
        book = {p.node_id: p for p in (pf.peers if pf is not None else ())}
        given = {p.node_id: p for p in peers}
        for nid in members:
            if nid in given:
                p = given[nid]
                book[nid] = PersistedPeer(nid, p.id, p.address,
                                          LEARNER if nid in cs.learners else VOTER)
        wal.save(HardState(term, vote, new_last), entries, sync=True)
        write_current_persisted_peers(data_dir, pf.index if pf is not None else meta.index,
                                      list(book.values()), file_io=file_io)
        save_cluster_id(data_dir, cluster_id, file_io=file_io)
    log.warning("recovered %s as a new cluster %s: %d entries kept (commit was %d), removed "
                "%s, promoted %s", data_dir, cluster_id, last_index, hs.commit, removed,
                promoted)
    return RecoveryInfo(last_index, hs.commit, removed, promoted,
                        new_last if entries else 0, cluster_id)
