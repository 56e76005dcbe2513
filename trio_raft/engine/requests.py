"""Requests callers put in the run loop's inbox."""

from __future__ import annotations

import enum

import attrs

from trio_raft.engine.waiters import Waiter


@attrs.frozen(eq=False)
class ProposeRequest:
    request_id: int
    data: bytes
    waiter: Waiter
    admin: bool = False


@attrs.frozen(eq=False)
class ReadRequest:
    request_id: int
    waiter: Waiter
    wait_applied: bool


class AdminAction(enum.Enum):
    ADD_VOTER = "add_voter"
    ADD_LEARNER = "add_learner"
    PROMOTE_LEARNER = "promote_learner"
    REMOVE_SERVER = "remove_server"
    TRANSFER = "transfer"


@attrs.frozen(eq=False)
class AdminRequest:
    request_id: int
    action: AdminAction
    waiter: Waiter
    id: str = ""
    address: str = ""
    prev_index: int = 0
    min_applied_index: int = 0
    skip_min_applied_check: bool = False
    #: Transfer only: candidate targets (node ids) in order, and the allowed match lag
    #: (None: no eligibility gates, as TransferLeadership / TransferLeadershipToServer).
    targets: tuple[int, ...] = ()
    max_lag: int | None = None
