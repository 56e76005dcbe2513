"""The node's view of cluster membership: who the members are, where they live, and the fence.

Owns, for the run loop (nothing here does I/O; ``applier.py`` persists what changes):

* ``peers``: node id -> :class:`Peer` (id, address, suffrage) for every member this node knows
  of, including itself;
* ``conf_state``: raft's voters and learners as of the newest configuration applied here;
* ``config_index``: the log index of that configuration (the ``prev_index`` callers pass to
  fence membership changes, ``docs/api.md``);
* ``fence``: the index of a configuration change appended to the log but not yet applied, or 0.
  Raft allows one pending change at a time (Raft thesis §4.1); the fence refuses a second
  change, and a leadership transfer, until the first one applies.

Invariants: ``peers`` holds exactly the members of ``conf_state`` (plus, before the first
configuration arrives, the configured peers); ``config_index`` only grows; ``fence`` is either 0
or above the applied index.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from trio_raft.core.messages import (
    NONE,
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    EntryType,
)
from trio_raft.core.storage import MemoryStorage
from trio_raft.engine.config import derive_node_id
from trio_raft.engine.contexts import ConfContext, decode_conf_context
from trio_raft.engine.requests import AdminAction, AdminRequest
from trio_raft.engine.types import (
    SUFFRAGE_LEARNER,
    SUFFRAGE_VOTER,
    Configuration,
    LeaderInfo,
    Peer,
    Server,
)
from trio_raft.errors import (
    JoinedAsVoterError,
    LeadershipTransferNotReadyError,
    LeadershipTransferTargetError,
    PeerAddressRequiredError,
    PeerIDRequiredError,
    TransportPeerUnknownError,
)
from trio_raft.storage.descriptor import SnapshotMember
from trio_raft.storage.peers import PersistedPeer

_join_role_violation_total = 0


def join_role_violation_count() -> int:
    """Process-wide count of nodes started with ``join_as_learner`` that were added as voters
    (each stopped with JoinedAsVoterError)."""
    return _join_role_violation_total


def to_persisted(peers: Sequence[Peer]) -> list[PersistedPeer]:
    return [
        PersistedPeer(p.node_id, p.id, p.address, p.suffrage or SUFFRAGE_VOTER) for p in peers
    ]


def peers_for_conf_state(peers: dict[int, Peer], cs: ConfState,
                         replicated: Sequence[SnapshotMember] = ()) -> list[Peer]:
    """The members of ``cs``, voters then learners, with what ``peers`` knows of each.

    ``replicated`` are the members a snapshot carries (its descriptor): their id and address
    win over ``peers``, as a configuration change's context does (``plan_change``); ``peers``
    fills in what the snapshot does not say. How this node reaches a member differently is the
    transport's business (an application pins its own addresses there)."""
    known = {m.node_id: m for m in replicated}
    out: list[Peer] = []
    for suffrage, ids in ((SUFFRAGE_VOTER, cs.voters), (SUFFRAGE_LEARNER, cs.learners)):
        for nid in ids:
            p = peers.get(nid, Peer(str(nid), "", nid))
            r = known.get(nid)
            ident = r.id if r is not None and r.id else p.id
            address = r.address if r is not None and r.address else p.address
            out.append(Peer(ident, address, nid, suffrage))
    return out


@attrs.frozen
class Change:
    """What applying one configuration change entry does to membership."""

    index: int
    kind: ConfChangeType
    node_id: int
    conf_state: ConfState
    members: tuple[Peer, ...]
    #: The engine's context of the request that proposed it (None when foreign or absent).
    context: ConfContext | None

    def member(self, node_id: int) -> Peer | None:
        return next((p for p in self.members if p.node_id == node_id), None)


class Membership:
    """See the module docstring."""

    def __init__(self, *, node_id: int, local_id: str, local_address: str,
                 peers: Sequence[Peer], conf_state: ConfState, config_index: int, fence: int,
                 join_as_learner: bool) -> None:
        self.node_id = node_id
        self.local_id = local_id
        self.local_address = local_address
        self.peers: dict[int, Peer] = {p.node_id: p for p in peers}
        self.conf_state = conf_state
        self.config_index = config_index
        self.fence = fence
        #: ``join_as_learner`` and no configuration received yet (``config.py``).
        self.awaiting_learner_role = join_as_learner and not (
            conf_state.voters or conf_state.learners)

    # -- views -------------------------------------------------------------------------------
    def configuration(self) -> Configuration:
        servers: list[Server] = []
        cs = self.conf_state
        for nid, suffrage in [*((n, SUFFRAGE_VOTER) for n in cs.voters),
                              *((n, SUFFRAGE_LEARNER) for n in cs.learners)]:
            p = self.peers.get(nid)
            servers.append(Server(p.id if p else str(nid), p.address if p else "", suffrage))
        return Configuration(tuple(servers))

    def leader_info(self, lead: int) -> LeaderInfo:
        if lead == NONE:
            return LeaderInfo()
        p = self.peers.get(lead)
        if p is None:
            return LeaderInfo(str(lead), "")
        return LeaderInfo(p.id, p.address)

    def members(self) -> tuple[Peer, ...]:
        """The members of the current configuration, with their addresses."""
        return tuple(peers_for_conf_state(self.peers, self.conf_state))

    def remote_peers(self) -> list[Peer]:
        return [p for p in self.peers.values() if p.node_id != self.node_id]

    def voter_count(self) -> int:
        return len(self.conf_state.voters)

    def is_voter(self, node_id: int) -> bool:
        return node_id in self.conf_state.voters

    # -- the fence ---------------------------------------------------------------------------
    def note_appended(self, entries: Sequence[Entry]) -> None:
        """Raise the fence over configuration changes just written to the log."""
        for e in entries:
            if e.type is not EntryType.NORMAL:
                self.fence = max(self.fence, e.index)

    def note_applied(self, applied: int) -> None:
        if self.fence and applied >= self.fence:
            self.fence = 0

    def reconcile_fence(self, applied: int, storage: MemoryStorage) -> None:
        """Drop a fence whose entry is gone (compacted, or overwritten by a new leader's
        normal entry) or applied."""
        fence = self.fence
        if not fence:
            return
        if applied >= fence or fence < storage.first_index():
            self.fence = 0
            return
        if fence <= storage.last_index():
            ent = storage.entries(fence, fence + 1)[0]
            if ent.type is EntryType.NORMAL:
                self.fence = 0

    # -- changes -----------------------------------------------------------------------------
    def plan_change(self, index: int, cc: ConfChange, cs: ConfState) -> Change:
        """The membership after applying ``cc`` at ``index`` (raft's new ``cs``); raises
        PeerAddressRequiredError when a member would have no address. Changes nothing."""
        peers = dict(self.peers)
        ctx = decode_conf_context(cc.context) if cc.context else None
        if ctx is not None and ctx.node_id not in (NONE, cc.node_id) and cc.node_id != NONE:
            ctx = None
        nid = cc.node_id
        if cc.type in (ConfChangeType.ADD_NODE, ConfChangeType.ADD_LEARNER_NODE,
                       ConfChangeType.UPDATE_NODE):
            if ctx is not None and (ctx.id or ctx.address):
                old = peers.get(nid)
                peers[nid] = Peer(ctx.id or (old.id if old else str(nid)),
                                  ctx.address or (old.address if old else ""), nid)
            elif nid not in peers:
                peers[nid] = Peer(str(nid), "", nid)
        elif cc.type is ConfChangeType.REMOVE_NODE:
            peers.pop(nid, None)
        members = peers_for_conf_state(peers, cs)
        self.require_addresses(members)
        return Change(index, cc.type, nid, cs, tuple(members), ctx)

    def require_addresses(self, members: Sequence[Peer]) -> None:
        for p in members:
            if not p.address and p.node_id != self.node_id:
                raise PeerAddressRequiredError(f"conf state node id={p.node_id}")

    def commit(self, index: int, cs: ConfState, members: Sequence[Peer]) -> None:
        """Adopt a configuration (applied at ``index``, or installed from a snapshot)."""
        self.peers = {p.node_id: p for p in members}
        self.conf_state = cs
        self.config_index = max(self.config_index, index)

    def check_join_role(self, cs: ConfState) -> None:
        """Before a configuration is adopted: a node joining as a learner refuses to become a
        voter without having been a learner (JoinedAsVoterError, fatal)."""
        global _join_role_violation_total
        if not self.awaiting_learner_role:
            return
        if self.node_id in cs.voters:
            _join_role_violation_total += 1
            raise JoinedAsVoterError(
                f"node {self.local_id} joined with join_as_learner but the configuration "
                f"lists it as a voter: remove it and add it back as a learner")
        if self.node_id in cs.learners:
            self.awaiting_learner_role = False

    # -- resolving the peers named in admin calls ---------------------------------------------
    def admin_peer(self, req: AdminRequest) -> Peer:
        """The member (or the new member) an add/promote/remove request is about."""
        if req.action in (AdminAction.ADD_VOTER, AdminAction.ADD_LEARNER):
            for p in self.peers.values():
                if (not req.id or p.id == req.id) and (not req.address or p.address == req.address):
                    if p.address or not req.address:
                        return p
                    return Peer(p.id, req.address, p.node_id)
            if not req.id:
                raise PeerIDRequiredError()
            if not req.address:
                raise PeerAddressRequiredError(f"id={req.id!r}")
            return Peer(req.id, req.address, derive_node_id(req.id))
        if not req.id:
            raise PeerIDRequiredError()
        for p in self.peers.values():
            if p.id == req.id:
                return p
        if req.id == self.local_id:
            return Peer(self.local_id, self.local_address, self.node_id)
        for s in self.configuration().servers:
            if s.id == req.id:
                return Peer(s.id, s.address, derive_node_id(s.id))
        raise TransportPeerUnknownError(f"id={req.id!r}")

    def transfer_target(self, id: str, address: str) -> int:
        """The node id of a transfer target named by id and/or address."""
        if (id and id == self.local_id) or (address and address == self.local_address):
            raise LeadershipTransferTargetError("target is this node")
        if not self.configuration().servers:
            raise LeadershipTransferNotReadyError("empty configuration")
        for p in self.peers.values():
            if (not id or p.id == id) and (not address or p.address == address):
                if p.node_id == self.node_id:
                    raise LeadershipTransferTargetError("target is this node")
                return int(p.node_id)
        raise TransportPeerUnknownError(f"id={id!r}" if id else f"address={address!r}")
