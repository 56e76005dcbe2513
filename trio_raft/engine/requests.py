"""Requests callers put in the run loop's inbox (see ``inbox.py``).

Each carries the id the engine matches the outcome by (inside the log entry for proposals and
membership changes, inside the ReadIndex context for reads) and the :class:`Waiter` to settle.
"""

from __future__ import annotations

import enum

import attrs

from trio_raft.engine.waiters import Waiter


@attrs.frozen(eq=False)
class ProposeRequest:
    request_id: int
    data: bytes
    waiter: Waiter
    #: Admitted while the envelope cutover barrier is up (``Engine.propose_admin``).
    admin: bool = False
    #: Built above the envelope cutover: ``data`` is the plaintext, wrapped when the request
    #: is admitted (``EnvelopeGate.wrap_admitted``).
    seal: bool = False


@attrs.frozen(eq=False)
class ReadRequest:
    request_id: int
    waiter: Waiter
    #: ``linearizable_read`` waits until the read index is applied; ``verify_leader`` does not.
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
    #: (None: no eligibility gates, as ``transfer_leadership`` / ``..._to_server``).
    targets: tuple[int, ...] = ()
    max_lag: int | None = None


Request = ProposeRequest | ReadRequest | AdminRequest
