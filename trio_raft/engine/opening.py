"""Opening an engine's durable state: which peers, which data, which configuration.

``open_state`` runs before any task exists (in a worker thread: it does file I/O), so every
configuration and storage error is raised by ``open_engine`` itself. In order:

1. the peers: the configured ``peers``, unless the data dir already has a peers file (then that
   file wins: membership changes recorded since the first start are newer than the command
   line); a ``bootstrap_seed`` must equal the one recorded at the first start;
2. the configuration is validated (``config.validate``) and the peers normalised (ids derived,
   the local node merged in, conflicts refused, sorted by node id);
3. the data dir is opened or initialised (``trio_raft.storage.recovery.open_disk_state``:
   restart, bootstrap or join) and the state machine restored from the newest snapshot, unless
   its own store holds it already (the cold-start skip, ``coldstart.py``: then the commit index
   is raised to the store's index, which the log holds and which was committed);
4. the snapshot's membership is checked against the peers (a data dir of another cluster is
   refused with ClusterMismatchError) and the peers' suffrage taken from it;
5. the peers file is rewritten for the recovered index; the fence is raised over configuration
   changes in the log that are not applied yet; the envelope cutover file is read.

The envelope at a restart: before the state machine is restored, the keys the recovered
snapshot carries are installed into ``raft_cipher`` and, when the data dir has no cutover file,
the snapshot's cutover is recorded (``envelope_gate.adopt_envelope``); a sealed payload is then
opened with ``raft_cipher`` (without one: SealedSnapshotKeyError naming the file).
"""

from __future__ import annotations

import logging
import os

import attrs

from trio_raft.core.messages import ConfState, EntryType, Snapshot
from trio_raft.core.storage import MemoryStorage
from trio_raft.engine.coldstart import ColdStart, OpenReport
from trio_raft.engine.config import OpenConfig, normalize_peers, validate
from trio_raft.engine.envelope_gate import adopt_envelope
from trio_raft.engine.identity import ClusterIdentity
from trio_raft.engine.membership import to_persisted
from trio_raft.engine.types import SUFFRAGE_LEARNER, SUFFRAGE_VOTER, Peer
from trio_raft.errors import ClusterMismatchError
from trio_raft.storage.cutover import load_cutover, save_cutover
from trio_raft.storage.descriptor import envelope_of
from trio_raft.storage.fileio import OS_FILE_IO
from trio_raft.storage.peers import PersistedPeer, load_persisted_peers, save_persisted_peers
from trio_raft.storage.recovery import DiskPersistence, open_disk_state

logger = logging.getLogger(__name__)


@attrs.frozen(eq=False)
class OpenedState:
    disk: DiskPersistence
    storage: MemoryStorage
    peers: tuple[Peer, ...]
    conf_state: ConfState
    config_index: int
    applied: int
    fence: int
    #: The envelope cutover recorded on this node (None: none recorded).
    cutover: int | None
    #: The node's cluster id and the rules for acquiring one (``identity.py``).
    identity: ClusterIdentity
    #: Entries up to this index are in the state machine's store already (cold-start skip).
    fsm_index: int
    #: What opening did (``seconds`` is filled in by ``open_engine``).
    report: OpenReport


def _from_persisted(pp: PersistedPeer) -> Peer:
    return Peer(pp.id, pp.address, pp.node_id, pp.suffrage)


def validate_conf_state(cs: ConfState, peers: list[Peer]) -> None:
    """The snapshot's membership must match the peers: the same voters (in node id order)
    and the same learners."""
    if cs.is_joint():
        raise ClusterMismatchError("joint consensus state is not supported")
    voters = [p.node_id for p in peers if p.suffrage != SUFFRAGE_LEARNER]
    if len(voters) != len(cs.voters):
        raise ClusterMismatchError(f"expected {len(voters)} voters got {len(cs.voters)}")
    for i, (want, got) in enumerate(zip(voters, sorted(cs.voters))):
        if want != got:
            raise ClusterMismatchError(f"voter[{i}]={got} expected {want}")
    learners = {p.node_id for p in peers if p.suffrage == SUFFRAGE_LEARNER}
    if len(learners) != len(cs.learners):
        raise ClusterMismatchError(f"expected {len(learners)} learners got {len(cs.learners)}")
    for nid in cs.learners:
        if nid not in learners:
            raise ClusterMismatchError(f"learner {nid} not present in peers")


def open_state(cfg: OpenConfig) -> OpenedState:
    """See the module docstring; the caller closes ``OpenedState.disk``."""
    peers: list[Peer] = list(cfg.peers)
    file_io = cfg.file_io or OS_FILE_IO
    persisted = load_persisted_peers(cfg.data_dir, file_io=file_io) if cfg.data_dir else None
    if persisted is not None:
        if persisted.seed_active and cfg.bootstrap_seed:
            local = Peer(cfg.local_id, cfg.local_address, cfg.node_id)
            want = normalize_peers(local, cfg.bootstrap_seed, allow_incomplete=False,
                                   allow_self_bootstrap=cfg.bootstrap)
            have = [_from_persisted(p) for p in persisted.seed]
            if [(p.node_id, p.id) for p in want] != [(p.node_id, p.id) for p in have]:
                raise ClusterMismatchError("bootstrap seed differs from persisted seed")
        peers = [_from_persisted(p) for p in persisted.peers]
    if cfg.bootstrap and not peers and cfg.local_address and cfg.local_id:
        peers = [Peer(cfg.local_id, cfg.local_address, cfg.node_id)]
    validate(cfg)
    local = Peer(cfg.local_id, cfg.local_address, cfg.node_id)
    peers = normalize_peers(
        local, peers, allow_incomplete=persisted is not None, allow_self_bootstrap=cfg.bootstrap
    )
    identity = ClusterIdentity(data_dir=os.fspath(cfg.data_dir), file_io=file_io,
                               cluster_id=None, state_machine=cfg.state_machine)
    cold = ColdStart(cfg.state_machine, identity)

    def before_restore(snap: Snapshot) -> None:
        env = envelope_of(snap.data)
        where = f"the snapshot at index {snap.metadata.index} in {cfg.data_dir}"
        adopt_envelope(cfg.raft_cipher, env, where=where, activate=False)
        if env.cutover_index is not None and load_cutover(
                os.fspath(cfg.data_dir), file_io=file_io) is None:
            save_cutover(os.fspath(cfg.data_dir), env.cutover_index, file_io=file_io)
            logger.info("raft envelope cutover %d taken from %s", env.cutover_index, where)

    disk = open_disk_state(cfg.data_dir, to_persisted(peers), cfg.bootstrap, cfg.state_machine,
                           join=cfg.join_as_learner, file_io=file_io, restore_policy=cold,
                           cipher=cfg.raft_cipher, before_restore=before_restore)
    try:
        identity.cluster_id = disk.cluster_id
        identity.tell_state_machine()
        snap = disk.snapshot
        cs = snap.metadata.conf_state
        snap_index = snap.metadata.index
        if peers and snap_index > 0 and cs.voters and (
            persisted is None or persisted.index <= snap_index
        ):
            validate_conf_state(cs, peers)
        if snap_index > 0:
            voters, learners = set(cs.voters), set(cs.learners)
            peers = [
                attrs.evolve(
                    p,
                    suffrage=SUFFRAGE_LEARNER if p.node_id in learners else SUFFRAGE_VOTER,
                )
                if p.node_id in voters or p.node_id in learners
                else p
                for p in peers
            ]
        pindex = max(snap_index, persisted.index if persisted is not None else 0)
        save_persisted_peers(cfg.data_dir, pindex, to_persisted(peers),
                             seed=to_persisted(peers) if persisted is None else None,
                             file_io=file_io)
        fence = 0
        for e in disk.entries:
            if e.index > disk.applied_index and e.type is not EntryType.NORMAL:
                fence = e.index
        cutover = load_cutover(disk.data_dir, file_io=file_io)
        hs = disk.storage.initial_state()[0]
        if cold.fsm_index > hs.commit:
            # The store applied it, so it was committed; the log holds it (checked).
            disk.storage.set_hard_state(attrs.evolve(hs, commit=cold.fsm_index))
        commit = max(hs.commit, cold.fsm_index)
        report = OpenReport(
            kind=disk.kind.value, snapshot_index=snap_index, restored=disk.restored,
            skipped=cold.skipped, store_index=cold.store_index,
            entries_replayed=max(0, commit - max(snap_index, cold.fsm_index)),
            entries_skipped=max(0, min(cold.fsm_index, commit) - snap_index),
            cluster_id=identity.cluster_id or "")
        return OpenedState(
            disk=disk.persistence,
            storage=disk.storage,
            peers=tuple(peers),
            conf_state=cs,
            config_index=snap_index,
            applied=disk.applied_index,
            fence=fence,
            cutover=cutover,
            identity=identity,
            fsm_index=cold.fsm_index,
            report=report,
        )
    except BaseException:
        disk.persistence.close()
        raise
