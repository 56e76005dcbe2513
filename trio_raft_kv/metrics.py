"""Prometheus metrics of a kvnode (``--metrics-listen HOST:PORT``, text exposition).

The engine's metrics (``trio_raft_*``: state, term, indexes, leader changes, peers' lag,
proposal and WAL sync latency, snapshots, the cold start) come from :mod:`trio_raft.metrics`,
registered in this node's registry under ``node=<id>``. This module adds what only the KV
service knows: proposals by outcome, reads by mode, and the keys in the store. Engine state and
the key count are copied by a trio task every ``interval`` seconds; the HTTP server thread only
reads those copies.
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
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

import trio_raft
from trio_raft.metrics import EngineMetrics, RaftMetrics


class _KVCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def describe(self) -> Iterator[Any]:
        yield GaugeMetricFamily("kvnode_kv_keys", "keys in the local store", labels=["node"])

    def collect(self) -> Iterator[Any]:
        g = GaugeMetricFamily("kvnode_kv_keys", "keys in the local store", labels=["node"])
        g.add_metric([self._m.node_id], float(self._m.keys))
        yield g


class Metrics:
    """All metrics of one kvnode, in a registry of their own."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=True)
        self.raft = RaftMetrics(self.registry)
        #: The engine's observer and state (pass it as ``OpenConfig.observer``).
        self.engine: EngineMetrics = self.raft.engine(node_id)
        self.proposals = Counter("kvnode_proposals", "proposals by outcome",
                                 ["node", "outcome"], registry=self.registry)
        self.reads = Counter("kvnode_reads", "Get requests by read mode", ["node", "mode"],
                             registry=self.registry)
        self.keys = 0
        self.registry.register(_KVCollector(self))
        # The hot path's child, resolved once (``labels()`` costs a lookup under a lock).
        self._proposals_ok = self.proposals.labels(node_id, "ok")
        self._server: Any = None
        self._thread: threading.Thread | None = None

    # -- request path ----------------------------------------------------------------------
    def proposal_done(self, seconds: float) -> None:
        """A write was applied (its latency is the engine's ``trio_raft_proposal_seconds``)."""
        self._proposals_ok.inc()

    def proposal_failed(self, error: str) -> None:
        self.proposals.labels(self.node_id, error).inc()

    def read(self, mode: str) -> None:
        self.reads.labels(self.node_id, mode).inc()

    # -- engine state ----------------------------------------------------------------------
    def refresh(self, engine: trio_raft.Engine, fsm: Any) -> None:
        """Copy the engine's state and the key count (the trio thread)."""
        self.engine.attach(engine)  # (the same engine again: a refresh)
        self.keys = fsm.key_count()

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
