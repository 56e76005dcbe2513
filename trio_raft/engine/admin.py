"""Membership changes and leadership transfer, on the run loop (``docs/api.md``).

``AdminHandler.handle`` takes an :class:`AdminRequest` from the inbox and checks it: this node is
leader, ``prev_index`` equals the configuration index (callers fence their change on the
configuration they saw), no other change is pending (one at a time, Raft thesis §4.1), and the
per-operation preconditions (a promoted learner is caught up in the leader's view). It then
hands raft a single-step configuration change carrying the request id (``contexts.py``); the
caller is answered when the change applies (``applier.py``) with its index, the configuration
index to pass as ``prev_index`` next time.

A transfer (Raft thesis §3.10) is started here and answered at once with the chosen target; the
caller then waits for the outcome with :func:`wait_for_transfer`.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from trio_raft.core.errors import RaftError as CoreRaftError
from trio_raft.core.messages import NONE, ConfChange, ConfChangeType, StateType
from trio_raft.core.rawnode import RawNode
from trio_raft.core.storage import MemoryStorage
from trio_raft.engine.contexts import ConfContext, encode_conf_context
from trio_raft.engine.membership import Membership
from trio_raft.engine.requests import AdminAction, AdminRequest
from trio_raft.engine.types import State, Status
from trio_raft.engine.waiters import WaiterTable
from trio_raft.errors import (
    ConfigIndexMismatchError,
    LeadershipTransferAbortedError,
    LeadershipTransferConfChangePendingError,
    LeadershipTransferInProgressError,
    LeadershipTransferNoHealthyTargetError,
    LeadershipTransferNotLeaderError,
    LeadershipTransferRejectedError,
    LeadershipTransferTargetError,
    LeadershipTransferTargetNotCaughtUpError,
    MembershipChangePendingError,
    NotLeaderError,
    PromoteLearnerNoProgressError,
    PromoteLearnerNotCaughtUpError,
    PromoteLearnerNotLearnerError,
    TooManyPendingConfigsError,
)

MAX_PENDING_CONFIGS = 64
TRANSFER_POLL_INTERVAL = 0.010

_CHANGE_KIND = {
    AdminAction.ADD_VOTER: ConfChangeType.ADD_NODE,
    AdminAction.ADD_LEARNER: ConfChangeType.ADD_LEARNER_NODE,
    AdminAction.PROMOTE_LEARNER: ConfChangeType.ADD_NODE,
    AdminAction.REMOVE_SERVER: ConfChangeType.REMOVE_NODE,
}


class AdminHandler:
    """See the module docstring."""

    def __init__(self, *, node: RawNode, membership: Membership, storage: MemoryStorage,
                 pending: WaiterTable, applied: Callable[[], int]) -> None:
        self._node = node
        self._membership = membership
        self._storage = storage
        self._pending = pending
        self._applied = applied

    def handle(self, req: AdminRequest) -> None:
        w = req.waiter
        if w.done:
            return
        try:
            if req.action is AdminAction.TRANSFER:
                w.resolve(self._start_transfer(req))
                self._pending.discard(req.request_id, w)
                return
            self._propose_change(req)
        except Exception as exc:
            self._pending.discard(req.request_id, w)
            w.fail(exc)

    def _propose_change(self, req: AdminRequest) -> None:
        node, m = self._node, self._membership
        if node.raft.state is not StateType.LEADER:
            raise NotLeaderError()
        if req.prev_index and req.prev_index != m.config_index:
            raise ConfigIndexMismatchError(f"got {req.prev_index} want {m.config_index}")
        m.reconcile_fence(self._applied(), self._storage)
        if m.fence:
            raise MembershipChangePendingError()
        peer = m.admin_peer(req)
        if req.action is AdminAction.PROMOTE_LEARNER:
            self._check_promote(req, peer.node_id)
        ctx = encode_conf_context(ConfContext(req.request_id, peer.node_id, peer.id, peer.address))
        if len(self._pending) > MAX_PENDING_CONFIGS:
            raise TooManyPendingConfigsError()
        last = max(self._storage.last_index(), node.raft.log.last_index())
        try:
            node.propose_conf_change(ConfChange(_CHANGE_KIND[req.action], peer.node_id, ctx))
        except CoreRaftError as exc:
            raise MembershipChangePendingError(str(exc)) from exc
        m.fence = last + 1

    def _check_promote(self, req: AdminRequest, node_id: int) -> None:
        if node_id not in self._membership.conf_state.learners:
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
        if not req.targets:
            raise LeadershipTransferTargetError()
        r = node.raft
        if r.state is not StateType.LEADER:
            raise LeadershipTransferNotLeaderError()
        self._membership.reconcile_fence(self._applied(), self._storage)
        if self._membership.fence:
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
                last_err = self._ineligible(target, req.max_lag)
                if last_err is not None:
                    continue
            node.transfer_leader(target)
            if r.lead_transferee == target:
                return target
            last_err = LeadershipTransferRejectedError()
        raise last_err or LeadershipTransferNoHealthyTargetError()

    def _ineligible(self, target: int, max_lag: int) -> Exception | None:
        """Why ``target`` may not receive leadership (None: it may)."""
        r = self._node.raft
        pr = r.prs.progress.get(target)
        if pr is None:
            return LeadershipTransferNoHealthyTargetError(f"{target:x} has no progress")
        if pr.is_learner:
            return LeadershipTransferNoHealthyTargetError(f"{target:x} is learner")
        if not pr.recent_active:
            return LeadershipTransferNoHealthyTargetError(f"{target:x} is not recently active")
        if pr.match < max(0, r.log.last_index() - max_lag):
            return LeadershipTransferTargetNotCaughtUpError(
                f"{target:x} match={pr.match} last={r.log.last_index()}"
            )
        return None


async def wait_for_transfer(target: int, status: Callable[[], Status],
                            leader_node_id: Callable[[], int],
                            check_open: Callable[[], None]) -> None:
    """Return once ``target`` leads; LeadershipTransferAbortedError when another node became
    leader or the transfer ended (raft aborts it after an election timeout)."""
    seen = False
    while True:
        check_open()
        st = status()
        if st.state is not State.LEADER:
            leader = leader_node_id()
            if leader == target:
                return
            if leader != NONE:
                raise LeadershipTransferAbortedError(f"leader is now {leader:x}")
        elif st.lead_transferee == target:
            seen = True
        elif seen and st.lead_transferee == NONE:
            raise LeadershipTransferAbortedError("timed out")
        await trio.sleep(TRANSFER_POLL_INTERVAL)
