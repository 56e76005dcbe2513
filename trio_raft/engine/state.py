"""The attributes every part of the engine shares, declared once for the type checker.

``Engine`` is assembled from mixins split by concern (run loop, apply, membership); this base
names the state they share and the few methods one mixin calls on another.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import trio

from trio_raft.core.messages import ConfState, Message
from trio_raft.core.rawnode import RawNode
from trio_raft.engine.callbacks import CallbackRegistry
from trio_raft.engine.config import OpenConfig
from trio_raft.engine.dispatch import Dispatcher
from trio_raft.engine.lease import QuorumAckTracker
from trio_raft.engine.requests import AdminRequest
from trio_raft.engine.types import Configuration, Peer, Status
from trio_raft.engine.waiters import WaiterTable


class EngineState:
    _cfg: OpenConfig
    _node_id: int
    _local_id: str
    _fsm: Any
    _transport: Any
    _owns_transport: bool
    _nursery: trio.Nursery | None
    _node: RawNode | None
    _disk: Any
    _storage: Any
    _peers: dict[int, Peer]
    _config_index: int
    _applied: int
    _conf_state: ConfState
    _fence: int
    _request_ids: int
    _requests: deque[Any]
    _priority_in: deque[Message]
    _bulk_in: deque[Message]
    _reports: deque[tuple[int, bool]]
    _loop_calls: deque[Callable[[], None]]
    _ticks: int
    _wake_event: trio.Event
    _bulk_capacity: int
    _step_queue_full: int
    _pending_proposals: WaiterTable
    _pending_reads: WaiterTable
    _pending_admin: WaiterTable
    _status: Status
    _lead_transferee: int
    _last_contact_at: float | None
    _last_contact_from: int
    _acks: QuorumAckTracker
    _lease_probe_at: float
    _single_node_ack: float | None
    _on_acquired: CallbackRegistry
    _on_lost: CallbackRegistry
    _dispatcher: Dispatcher
    _started: trio.Event
    _done: trio.Event
    _close_requested: bool
    _closed: bool
    _run_error: BaseException | None
    _remove_self: bool
    _snapshot_in_flight: bool
    _join_alarm_fired: bool
    _snapshot_lock: trio.Lock

    # Implemented by the mixins; declared here so each mixin type-checks on its own.
    async def _io(self, fn: Callable[..., Any], *args: Any) -> Any:
        raise NotImplementedError

    def _fail(self, exc: BaseException) -> None:
        raise NotImplementedError

    def _wake(self) -> None:
        raise NotImplementedError

    def _submit(self, req: Any) -> None:
        raise NotImplementedError

    def _next_request_id(self) -> int:
        raise NotImplementedError

    def _raise_if_closed(self) -> None:
        raise NotImplementedError

    def _configuration(self) -> Configuration:
        raise NotImplementedError

    def _upsert_transport_peer(self, p: Peer) -> None:
        raise NotImplementedError

    def _check_join_alarm(self, cs: ConfState) -> None:
        raise NotImplementedError

    def _handle_admin(self, req: AdminRequest) -> None:
        raise NotImplementedError
