"""Membership changes and leadership transfer (spec c.1-c.4).

Public coroutines build an :class:`AdminRequest`; the run loop checks it (leader, configuration
index fence, pending-change fence, per-operation preconditions) and hands a single-step
configuration change to raft. The caller's result is the index of the applied change, which is
the configuration index to pass as ``prev_index`` next time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import trio

from trio_raft.core.errors import RaftError as CoreRaftError
from trio_raft.core.messages import NONE, ConfChange, ConfChangeType, EntryType, StateType
from trio_raft.engine.config import derive_node_id
from trio_raft.engine.contexts import ConfContext, encode_conf_context
from trio_raft.engine.requests import AdminAction, AdminRequest
from trio_raft.engine.state import EngineState
from trio_raft.engine.types import Peer, State, TransferTarget
from trio_raft.engine.waiters import Waiter
from trio_raft.errors import (
    ConfigIndexMismatchError,
    LeadershipTransferAbortedError,
    LeadershipTransferConfChangePendingError,
    LeadershipTransferInProgressError,
    LeadershipTransferNoHealthyTargetError,
    LeadershipTransferNotLeaderError,
    LeadershipTransferNotReadyError,
    LeadershipTransferRejectedError,
    LeadershipTransferTargetError,
    LeadershipTransferTargetNotCaughtUpError,
    MembershipChangePendingError,
    NotLeaderError,
    PeerAddressRequiredError,
    PeerIDRequiredError,
    PromoteLearnerMinAppliedZeroError,
    PromoteLearnerNoProgressError,
    PromoteLearnerNotCaughtUpError,
    PromoteLearnerNotLearnerError,
    TooManyPendingConfigsError,
    TransportPeerUnknownError,
)

MAX_PENDING_CONFIGS = 64
TRANSFER_POLL_INTERVAL = 0.010


class AdminMixin(EngineState):
    # -- public API --------------------------------------------------------------------
    async def add_voter(self, id: str, address: str, prev_index: int = 0) -> int:
        return int(await self._admin(AdminAction.ADD_VOTER, id=id, address=address,
                                     prev_index=prev_index))

    async def add_learner(self, id: str, address: str, prev_index: int = 0) -> int:
        return int(await self._admin(AdminAction.ADD_LEARNER, id=id, address=address,
                                     prev_index=prev_index))

    async def promote_learner(
        self,
        id: str,
        prev_index: int = 0,
        min_applied_index: int = 0,
        skip_min_applied_check: bool = False,
    ) -> int:
        if not id:
            raise PeerIDRequiredError()
        if min_applied_index == 0 and not skip_min_applied_check:
            raise PromoteLearnerMinAppliedZeroError()
        return int(await self._admin(AdminAction.PROMOTE_LEARNER, id=id, prev_index=prev_index,
                                     min_applied_index=min_applied_index,
                                     skip_min_applied_check=skip_min_applied_check))

    async def remove_server(self, id: str, prev_index: int = 0) -> int:
        return int(await self._admin(AdminAction.REMOVE_SERVER, id=id, prev_index=prev_index))

    async def transfer_leadership(self) -> None:
        """Hand leadership to the first other server of the configuration."""
        servers = self._configuration().servers
        if not servers:
            raise LeadershipTransferNotReadyError("empty configuration")
        target = next((s for s in servers if s.id != self._local_id), None)
        if target is None:
            raise LeadershipTransferNotReadyError("no other server")
        await self._transfer([self._resolve_server(target.id, target.address)], None)

    async def transfer_leadership_to_server(self, id: str, address: str = "") -> None:
        await self._transfer([self._resolve_server(id, address)], None)

    async def transfer_leadership_to_server_if_eligible(
        self, candidates: Sequence[TransferTarget], max_lag: int
    ) -> None:
        """Transfer to the first candidate that is a recently active voter whose match index
        lags the leader's last index by at most ``max_lag``."""
        targets = [self._resolve_server(c.id, c.address) for c in candidates]
        await self._transfer(targets, max(0, max_lag))

    # -- caller side -------------------------------------------------------------------
    async def _admin(self, action: AdminAction, **kw: Any) -> Any:
        await trio.lowlevel.checkpoint_if_cancelled()
        self._raise_if_closed()
        w = Waiter()
        rid = self._next_request_id()
        self._submit(AdminRequest(rid, action, w, **kw))
        try:
            return await w.wait()
        finally:
            self._pending_admin.discard(rid, w)

    def _resolve_server(self, id: str, address: str) -> int:
        if (id and id == self._local_id) or (address and address == self._cfg.local_address):
            raise LeadershipTransferTargetError("target is this node")
        if not self._configuration().servers:
            raise LeadershipTransferNotReadyError("empty configuration")
        for p in self._peers.values():
            if (not id or p.id == id) and (not address or p.address == address):
                if p.node_id == self._node_id:
                    raise LeadershipTransferTargetError("target is this node")
                return int(p.node_id)
        raise TransportPeerUnknownError(f"id={id!r}" if id else f"address={address!r}")

    async def _transfer(self, targets: list[int], max_lag: int | None) -> None:
        target = int(
            await self._admin(AdminAction.TRANSFER, targets=tuple(targets), max_lag=max_lag)
        )
        if target == NONE:
            raise LeadershipTransferTargetError()
        seen = False
        while True:
            self._raise_if_closed()
            st = self._status
            if st.state is not State.LEADER:
                leader_nid = self._leader_node_id()
                if leader_nid == target:
                    return
                if leader_nid != NONE:
                    raise LeadershipTransferAbortedError(f"leader is now {leader_nid:x}")
            elif st.lead_transferee == target:
                seen = True
            elif seen and st.lead_transferee == NONE:
                raise LeadershipTransferAbortedError("timed out")
            await trio.sleep(TRANSFER_POLL_INTERVAL)

    def _leader_node_id(self) -> int:
        return int(self._node.raft.lead) if self._node is not None else NONE

    # -- loop side ---------------------------------------------------------------------
    def _handle_admin(self, req: AdminRequest) -> None:
        w = req.waiter
        if w.done:
            return
        try:
            if req.action is AdminAction.TRANSFER:
                w.resolve(self._start_transfer(req))
                self._pending_admin.discard(req.request_id, w)
                return
            self._propose_membership_change(req)
        except Exception as exc:
            self._pending_admin.discard(req.request_id, w)
            w.fail(exc)

    def _reconcile_fence(self) -> None:
        fence = self._fence
        if not fence:
            return
        if self._applied >= fence:
            self._fence = 0
            return
        st = self._storage
        if fence < st.first_index():
            self._fence = 0
            return
        if fence <= st.last_index():
            ent = st.entries(fence, fence + 1)[0]
            if ent.type is EntryType.NORMAL:
                self._fence = 0

    def _propose_membership_change(self, req: AdminRequest) -> None:
        node = self._node
        assert node is not None
        if node.raft.state is not StateType.LEADER:
            raise NotLeaderError()
        if req.prev_index and req.prev_index != self._config_index:
            raise ConfigIndexMismatchError(f"got {req.prev_index} want {self._config_index}")
        self._reconcile_fence()
        if self._fence:
            raise MembershipChangePendingError()
        peer = self._admin_peer(req)
        kind = {
            AdminAction.ADD_VOTER: ConfChangeType.ADD_NODE,
            AdminAction.ADD_LEARNER: ConfChangeType.ADD_LEARNER_NODE,
            AdminAction.PROMOTE_LEARNER: ConfChangeType.ADD_NODE,
            AdminAction.REMOVE_SERVER: ConfChangeType.REMOVE_NODE,
        }[req.action]
        if req.action is AdminAction.PROMOTE_LEARNER:
            self._check_promote(req, peer.node_id)
        ctx = encode_conf_context(ConfContext(req.request_id, peer.node_id, peer.id, peer.address))
        if len(self._pending_admin) > MAX_PENDING_CONFIGS:
            raise TooManyPendingConfigsError()
        last = self._storage.last_index()
        last = max(last, node.raft.log.last_index())
        try:
            node.propose_conf_change(ConfChange(kind, peer.node_id, ctx))
        except CoreRaftError as exc:
            raise MembershipChangePendingError(str(exc)) from exc
        self._fence = last + 1

    def _admin_peer(self, req: AdminRequest) -> Peer:
        if req.action in (AdminAction.ADD_VOTER, AdminAction.ADD_LEARNER):
            for p in self._peers.values():
                if (not req.id or p.id == req.id) and (not req.address or p.address == req.address):
                    return p if p.address or not req.address else Peer(p.id, req.address,
                                                                       p.node_id)
            if not req.id:
                raise PeerIDRequiredError()
            if not req.address:
                raise PeerAddressRequiredError(f"id={req.id!r}")
            return Peer(req.id, req.address, derive_node_id(req.id))
        if not req.id:
            raise PeerIDRequiredError()
        for p in self._peers.values():
            if p.id == req.id:
                return p
        if req.id == self._local_id:
            return Peer(self._local_id, self._cfg.local_address, self._node_id)
        for s in self._configuration().servers:
            if s.id == req.id:
                return Peer(s.id, s.address, derive_node_id(s.id))
        raise TransportPeerUnknownError(f"id={req.id!r}")

    def _check_promote(self, req: AdminRequest, node_id: int) -> None:
        assert self._node is not None
        if node_id not in self._conf_state.learners:
            raise PromoteLearnerNotLearnerError(f"id={req.id!r}")
        if req.skip_min_applied_check:
            return
        pr = self._node.raft.prs.progress.get(node_id)
        if pr is None:
            raise PromoteLearnerNoProgressError(f"id={req.id!r}")
        if pr.match < req.min_applied_index:
            raise PromoteLearnerNotCaughtUpError(
                f"id={req.id!r} match={pr.match} want>={req.min_applied_index}"
            )

    def _start_transfer(self, req: AdminRequest) -> int:
        node = self._node
        assert node is not None
        if not req.targets:
            raise LeadershipTransferTargetError()
        r = node.raft
        if r.state is not StateType.LEADER:
            raise LeadershipTransferNotLeaderError()
        self._reconcile_fence()
        if self._fence:
            raise LeadershipTransferConfChangePendingError()
        last_err: Exception | None = None
        for target in req.targets:
            if r.lead_transferee == target:
                return target
            if r.lead_transferee != NONE:
                raise LeadershipTransferInProgressError(
                    f"active target={r.lead_transferee} requested target={target}"
                )
            if req.max_lag is not None:
                pr = r.prs.progress.get(target)
                if pr is None:
                    last_err = LeadershipTransferNoHealthyTargetError(f"{target:x} has no progress")
                    continue
                if pr.is_learner:
                    last_err = LeadershipTransferNoHealthyTargetError(f"{target:x} is learner")
                    continue
                if not pr.recent_active:
                    last_err = LeadershipTransferNoHealthyTargetError(
                        f"{target:x} is not recently active"
                    )
                    continue
                if pr.match < max(0, r.log.last_index() - req.max_lag):
                    last_err = LeadershipTransferTargetNotCaughtUpError(
                        f"{target:x} match={pr.match} last={r.log.last_index()}"
                    )
                    continue
            node.transfer_leader(target)
            if r.lead_transferee == target:
                return target
            last_err = LeadershipTransferRejectedError()
        raise last_err or LeadershipTransferNoHealthyTargetError()
