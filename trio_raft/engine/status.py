"""The cached, published view of the node: Status, leader, configuration, and the leader
edges (callbacks, failing waiters when leadership is lost). Refreshed by the run loop after
every Ready, read lock-free by the public accessors."""

from __future__ import annotations

from collections.abc import Callable

import trio

from trio_raft.core.messages import NONE, StateType
from trio_raft.engine.state import EngineState
from trio_raft.engine.types import (
    SUFFRAGE_LEARNER,
    Configuration,
    LeaderInfo,
    Server,
    State,
    Status,
)
from trio_raft.errors import LeadershipLostError


class StatusMixin(EngineState):
    def _refresh_status(self) -> None:
        node = self._node
        assert node is not None
        r = node.raft
        prev = self._status.state
        if self._closed:
            state = State.SHUTDOWN
        elif r.state is StateType.LEADER:
            state = State.LEADER
        elif r.state is StateType.FOLLOWER:
            state = State.FOLLOWER
        else:
            state = State.CANDIDATE
        now = trio.current_time()
        if state is State.LEADER:
            contact = 0.0
        elif (
            state is not State.FOLLOWER
            or self._last_contact_at is None
            or (r.lead != NONE and self._last_contact_from != r.lead)
        ):
            contact = -1.0
        else:
            contact = max(0.0, now - self._last_contact_at)
        log = r.log
        self._lead_transferee = r.lead_transferee
        self._status = Status(
            state=state,
            leader=self._leader_info(r.lead),
            term=r.term,
            commit_index=log.committed,
            applied_index=self._applied,
            last_log_index=self._storage.last_index(),
            last_snapshot_index=self._storage.snapshot().metadata.index,
            fsm_pending=max(0, log.committed - self._applied),
            num_peers=sum(1 for nid in self._peers if nid != self._node_id),
            last_contact=contact,
            configuration_index=self._config_index,
            lead_transferee=r.lead_transferee,
            pending_conf_change=self._fence != 0,
        )
        if state is State.LEADER and len(self._conf_state.voters) <= 1:
            self._single_node_ack = now
        else:
            self._single_node_ack = None
        if prev is not State.LEADER and state is State.LEADER:
            self._on_acquired.fire()
        elif prev is State.LEADER and state is not State.LEADER:
            self._on_leadership_lost(LeadershipLostError)
            self._acks.reset()
            self._on_lost.fire()

    def _on_leadership_lost(self, factory: Callable[[], BaseException]) -> None:
        self._pending_proposals.fail_all(factory)
        self._pending_reads.fail_all(factory)
        self._pending_admin.fail_all(factory)

    def _leader_info(self, lead: int) -> LeaderInfo:
        if lead == NONE:
            return LeaderInfo()
        p = self._peers.get(lead)
        if p is None:
            return LeaderInfo(str(lead), "")
        return LeaderInfo(p.id, p.address)

    def _configuration(self) -> Configuration:
        servers: list[Server] = []
        cs = self._conf_state
        for nid in cs.voters:
            p = self._peers.get(nid)
            servers.append(Server(p.id if p else str(nid), p.address if p else "", "voter"))
        for nid in cs.learners:
            p = self._peers.get(nid)
            servers.append(
                Server(p.id if p else str(nid), p.address if p else "", SUFFRAGE_LEARNER)
            )
        return Configuration(tuple(servers))
