"""Engine configuration: OpenConfig, its defaults, peer normalisation and validation
(``docs/api.md``, opening an engine)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import attrs

from trio_raft.engine.observer import EngineObserver
from trio_raft.engine.types import SUFFRAGE_VOTER, Peer, StateMachine
from trio_raft.errors import (
    ConfigError,
    DataDirRequiredError,
    JoinAsLearnerBootstrapError,
    LocalPeerMissingError,
    NodeIDRequiredError,
    NoPeersConfiguredError,
    PeerAddressRequiredError,
    PeerFormatInvalidError,
    PeerIDRequiredError,
    PeerNodeIDConflictError,
    StateMachineUnsetError,
)
from trio_raft.node_ids import derive_node_id
from trio_raft.storage.fileio import FileIO
from trio_raft.transport.base import Transport

DEFAULT_TICK_INTERVAL = 0.010
DEFAULT_HEARTBEAT_TICK = 10
DEFAULT_ELECTION_TICK = 100
DEFAULT_MAX_SIZE_PER_MSG = 1 << 20
DEFAULT_MAX_INFLIGHT_MSG = 1024
DEFAULT_SNAPSHOT_EVERY = 10_000
LEASE_SAFETY_MARGIN = 0.300

__all__ = ["OpenConfig", "derive_node_id", "lease_duration", "normalize_peers", "parse_peers",
           "validate", "with_defaults"]


def parse_peers(text: str) -> list[Peer]:
    """Parse ``"n1=host:port,n2=host:port"`` into peers (node ids derived)."""
    peers: list[Peer] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        if "=" not in item:
            raise PeerFormatInvalidError(f"{item!r}")
        pid, _, addr = item.partition("=")
        pid, addr = pid.strip(), addr.strip()
        if not pid or not addr:
            raise PeerFormatInvalidError(f"{item!r}")
        peers.append(Peer(id=pid, address=addr, node_id=derive_node_id(pid)))
    return peers


@attrs.frozen
class OpenConfig:
    local_id: str = ""
    local_address: str = ""
    data_dir: str | os.PathLike[str] = ""
    peers: Sequence[Peer] = ()
    bootstrap: bool = False
    state_machine: StateMachine | None = None
    #: None: no network for a single voter; with several peers the engine builds a
    #: GRPCTransport serving on ``local_address``. Otherwise any Transport implementation.
    transport: Transport | None = None
    node_id: int = 0
    bootstrap_seed: Sequence[Peer] = ()
    tick_interval: float = DEFAULT_TICK_INTERVAL
    heartbeat_tick: int = DEFAULT_HEARTBEAT_TICK
    election_tick: int = DEFAULT_ELECTION_TICK
    max_size_per_msg: int = DEFAULT_MAX_SIZE_PER_MSG
    max_inflight_msg: int = DEFAULT_MAX_INFLIGHT_MSG
    snapshot_every: int = DEFAULT_SNAPSHOT_EVERY
    raft_cipher: Any = None
    raft_cutover_index: Callable[[], int] | None = None
    #: This node joins an existing cluster and must be added as a learner first: it never
    #: bootstraps (``bootstrap=True`` is refused), starts empty even with one peer listed, and
    #: stops with JoinedAsVoterError if the first configuration it receives lists it as a
    #: voter. No effect once it has received a configuration (a restart after joining).
    join_as_learner: bool = False
    pre_vote: bool = True
    #: Seed for the core's election-timeout RNG (None: from the OS).
    rng_seed: int | None = None
    #: Run file I/O on the trio thread instead of worker threads. Real files and real fsync
    #: either way; this keeps multi-node tests under ``MockClock`` deterministic (with worker
    #: threads, an autojumping clock races ahead while a thread fsyncs).
    blocking_io: bool = False
    #: Entries kept in the log behind a periodic snapshot so slightly lagging followers catch
    #: up from the log instead of a snapshot.
    snapshot_catchup_entries: int = 5_000
    #: Send a leader's appends before its own WAL write completes; the leader then counts
    #: itself toward the commit quorum only once its write is durable (Raft thesis §10.2.1).
    parallel_leader_write: bool = True
    #: Seconds a leader holds an append that only carries a new commit index (no entries);
    #: an append to the same peer leaving first carries the commit instead and the held one is
    #: dropped. Followers learn of commits up to this much later; 0 sends at once.
    commit_broadcast_delay: float = 0.002
    #: Told of WAL writes and proposals as they complete (``observer.py``; metrics use it).
    observer: EngineObserver | None = None
    #: Tests only: seconds to wait before each WAL write, re-read every time (a slow disk).
    test_persist_delay: Callable[[], float] | None = None
    #: The seam every file operation of storage goes through (``docs/storage.md``); None: the
    #: real file system. Tests pass ``trio_raft.testing.faults.FaultyFileIO`` to inject disk
    #: faults.
    file_io: FileIO | None = None


def with_defaults(cfg: OpenConfig) -> OpenConfig:
    """Derive the identity (``node_id`` from ``local_id`` or the other way round) and give
    ``tick_interval``, ``heartbeat_tick``, ``election_tick``, ``max_size_per_msg`` and
    ``max_inflight_msg`` their defaults when they are 0 or less; ``snapshot_every`` below 1
    becomes 1. Every other field is taken as given (``validate`` refuses what is invalid)."""
    node_id = cfg.node_id or derive_node_id(cfg.local_id)
    local_id = cfg.local_id or (str(cfg.node_id) if cfg.node_id else "")
    return attrs.evolve(
        cfg,
        node_id=node_id,
        local_id=local_id,
        tick_interval=cfg.tick_interval if cfg.tick_interval > 0 else DEFAULT_TICK_INTERVAL,
        heartbeat_tick=cfg.heartbeat_tick if cfg.heartbeat_tick > 0 else DEFAULT_HEARTBEAT_TICK,
        election_tick=cfg.election_tick if cfg.election_tick > 0 else DEFAULT_ELECTION_TICK,
        max_size_per_msg=cfg.max_size_per_msg
        if cfg.max_size_per_msg > 0
        else DEFAULT_MAX_SIZE_PER_MSG,
        max_inflight_msg=cfg.max_inflight_msg
        if cfg.max_inflight_msg > 0
        else DEFAULT_MAX_INFLIGHT_MSG,
        snapshot_every=max(1, cfg.snapshot_every),
    )


def validate(cfg: OpenConfig) -> None:
    """Refuse an unusable configuration (after ``with_defaults``), the first problem found."""
    if cfg.node_id == 0:
        raise NodeIDRequiredError()
    if not cfg.data_dir:
        raise DataDirRequiredError()
    if cfg.state_machine is None:
        raise StateMachineUnsetError()
    if cfg.election_tick <= cfg.heartbeat_tick:
        raise ConfigError("election tick must be greater than heartbeat tick")
    if cfg.join_as_learner and cfg.bootstrap:
        raise JoinAsLearnerBootstrapError()
    if cfg.snapshot_catchup_entries < 0:
        raise ConfigError("snapshot_catchup_entries must not be negative")
    if cfg.commit_broadcast_delay < 0:
        raise ConfigError("commit_broadcast_delay must not be negative")


def lease_duration(cfg: OpenConfig) -> float:
    tick = cfg.tick_interval if cfg.tick_interval > 0 else DEFAULT_TICK_INTERVAL
    et = cfg.election_tick if cfg.election_tick > 0 else DEFAULT_ELECTION_TICK
    return max(0.0, et * tick - LEASE_SAFETY_MARGIN)


def _normalize_one(p: Peer, *, persisted: bool) -> Peer:
    if persisted:
        pid = p.id or p.address or (str(p.node_id) if p.node_id else "")
        if not pid:
            raise PeerIDRequiredError()
        nid = p.node_id or derive_node_id(pid)
        return Peer(pid, p.address, nid, p.suffrage or SUFFRAGE_VOTER)
    if not p.id and not p.node_id:
        raise PeerIDRequiredError()
    if not p.address:
        raise PeerAddressRequiredError(f"id={p.id!r}")
    pid = p.id or p.address
    nid = p.node_id or derive_node_id(pid)
    return Peer(pid, p.address, nid, p.suffrage or SUFFRAGE_VOTER)


def normalize_peers(
    local: Peer,
    peers: Sequence[Peer],
    *,
    allow_incomplete: bool,
    allow_self_bootstrap: bool,
) -> list[Peer]:
    """The configured peer list as the engine uses it: ids and addresses normalised, the local
    node merged in (its own entry must agree with ``local``), conflicting ids refused, sorted
    by node id so every node derives the same order."""
    if not peers:
        if not (allow_incomplete or allow_self_bootstrap):
            raise NoPeersConfiguredError()
        if not local.id:
            raise PeerIDRequiredError()
        if not local.address:
            raise PeerAddressRequiredError("local peer")
        peers = [local]
    out = [_normalize_one(p, persisted=allow_incomplete) for p in peers]
    idx = next((i for i, p in enumerate(out) if local.node_id and p.node_id == local.node_id),
               None)
    if idx is None:
        idx = next((i for i, p in enumerate(out) if local.id and p.id == local.id), None)
    if idx is None:
        idx = next(
            (i for i, p in enumerate(out) if local.address and p.address == local.address), None
        )
    if idx is None:
        raise LocalPeerMissingError(f"id={local.id!r}")
    cur = out[idx]
    out[idx] = Peer(
        local.id or cur.id,
        local.address or cur.address,
        local.node_id or cur.node_id,
        cur.suffrage or SUFFRAGE_VOTER,
    )
    by_nid: dict[int, str] = {}
    ids: set[str] = set()
    for p in out:
        other = by_nid.get(p.node_id)
        if other is not None and other != p.id:
            raise PeerNodeIDConflictError(f"{other!r} and {p.id!r} map to {p.node_id}")
        if p.id in ids:
            raise PeerNodeIDConflictError(f"duplicate peer id {p.id!r}")
        by_nid[p.node_id] = p.id
        ids.add(p.id)
    out.sort(key=lambda p: p.node_id)
    return out


