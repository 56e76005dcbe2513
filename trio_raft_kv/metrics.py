"""Prometheus metrics of a kvnode (``--metrics-listen HOST:PORT``, text exposition).

Request-path metrics (proposals, their latency, reads, WAL syncs) are prometheus-client objects
updated where the work happens. Engine state (role, term, indexes, dispatch counters) is copied
from the engine by a trio task every ``interval`` seconds into a plain dict, and a collector
turns that dict into samples at scrape time: the HTTP server thread never touches the engine.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import trio
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

import trio_raft

STATES = [s.value for s in trio_raft.State]
_LATENCY_BUCKETS = (0.001, 0.002, 0.004, 0.006, 0.008, 0.012, 0.016, 0.025, 0.05, 0.1, 0.25,
                    0.5, 1.0, 2.5, 5.0)


class _EngineCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def collect(self) -> Iterator[Any]:
        snap = self._m.snapshot
        node = self._m.node_id
        state = GaugeMetricFamily("kvnode_raft_state", "1 for the node's current raft state",
                                  labels=["node", "state"])
        for s in STATES:
            state.add_metric([node, s], 1.0 if snap.get("state") == s else 0.0)
        yield state
        for name, key, doc in (
            ("kvnode_raft_term", "term", "current raft term"),
            ("kvnode_raft_commit_index", "commit_index", "highest committed log index"),
            ("kvnode_raft_applied_index", "applied_index", "highest applied log index"),
            ("kvnode_raft_last_snapshot_index", "last_snapshot_index", "newest snapshot index"),
            ("kvnode_raft_is_leader", "is_leader", "1 when this node is the leader"),
            ("kvnode_raft_lease_valid", "lease_valid", "1 when lease reads are served locally"),
            ("kvnode_kv_keys", "keys", "keys in the local state machine"),
        ):
            g = GaugeMetricFamily(name, doc, labels=["node"])
            g.add_metric([node], float(snap.get(key, 0)))
            yield g
        for name, key, doc in (
            ("kvnode_raft_dispatch_drops", "dispatch_drops",
             "raft messages dropped because a peer lane was full"),
            ("kvnode_raft_step_queue_full", "step_queue_full",
             "inbound raft messages refused because the step queue was full"),
            ("kvnode_snapshots_taken", "snapshots_taken", "state machine snapshots taken"),
            ("kvnode_snapshots_restored", "snapshots_restored",
             "state machine snapshots restored (restart or catch-up from the leader)"),
        ):
            c = CounterMetricFamily(name, doc, labels=["node"])
            c.add_metric([node], float(snap.get(key, 0)))
            yield c
        by_code = CounterMetricFamily("kvnode_raft_dispatch_errors",
                                      "raft message sends that failed, by gRPC code",
                                      labels=["node", "code"])
        for code, n in sorted(snap.get("dispatch_errors", {}).items()):
            by_code.add_metric([node, code], float(n))
        yield by_code


class Metrics:
    """All kvnode metrics, in a registry of their own."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=True)
        self.snapshot: dict[str, Any] = {}
        self.proposals = Counter("kvnode_proposals", "proposals by outcome",
                                 ["node", "outcome"], registry=self.registry)
        self.proposal_latency = Histogram(
            "kvnode_proposal_latency_seconds", "propose() until committed and applied",
            ["node"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.reads = Counter("kvnode_reads", "Get requests by read mode", ["node", "mode"],
                             registry=self.registry)
        self.wal_sync = Histogram(
            "kvnode_wal_sync_seconds", "WAL write + fsync of one Ready (group commit)",
            ["node"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_EngineCollector(self))
        # The hot path's children, resolved once (``labels()`` costs a lookup under a lock).
        self._proposals_ok = self.proposals.labels(node_id, "ok")
        self._proposal_latency = self.proposal_latency.labels(node_id)
        self._wal_sync = self.wal_sync.labels(node_id)
        self._server: Any = None
        self._thread: threading.Thread | None = None

    # -- request path ----------------------------------------------------------------------
    def proposal_done(self, seconds: float) -> None:
        self._proposals_ok.inc()
        self._proposal_latency.observe(seconds)

    def proposal_failed(self, error: str) -> None:
        self.proposals.labels(self.node_id, error).inc()

    def read(self, mode: str) -> None:
        self.reads.labels(self.node_id, mode).inc()

    def observe_wal_sync(self, seconds: float) -> None:
        self._wal_sync.observe(seconds)

    # -- engine state ----------------------------------------------------------------------
    def refresh(self, engine: trio_raft.Engine, fsm: Any) -> None:
        st = engine.status()
        self.snapshot = {
            "state": st.state.value,
            "term": st.term,
            "commit_index": st.commit_index,
            "applied_index": engine.applied_index(),
            "last_snapshot_index": st.last_snapshot_index,
            "is_leader": int(st.state is trio_raft.State.LEADER),
            "lease_valid": int(engine.lease_valid()),
            "keys": len(fsm.data),
            "dispatch_drops": engine.dispatch_drop_count(),
            "step_queue_full": engine.step_queue_full_count(),
            "dispatch_errors": engine.dispatch_error_counts_by_code(),
            "snapshots_taken": fsm.snapshots_taken,
            "snapshots_restored": fsm.snapshots_restored,
        }

    async def refresh_forever(self, engine: trio_raft.Engine, fsm: Any,
                              interval: float = 0.5) -> None:
        while True:
            self.refresh(engine, fsm)
            await trio.sleep(interval)

    # -- exposition ------------------------------------------------------------------------
    def start_server(self, host: str, port: int) -> int:
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        self._server, self._thread = server, thread
        return int(server.server_address[1])

    def stop_server(self) -> None:
        if self._server is not None:
            with contextlib.suppress(Exception):
                self._server.shutdown()
                self._server.server_close()
            self._server = None
