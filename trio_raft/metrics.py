"""Prometheus metrics for trio_raft engines (the optional ``metrics`` extra: prometheus-client).

Usage::

    from prometheus_client import CollectorRegistry
    from trio_raft.metrics import RaftMetrics

    metrics = RaftMetrics(CollectorRegistry())          # or RaftMetrics(): a registry of its own
    node = metrics.engine("n1")                          # one per engine; the ``node`` label
    config = trio_raft.OpenConfig(..., observer=node)   # histograms fed as events happen
    async with trio_raft.open_engine(config) as engine:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(node.run, engine)         # state copied every second
            ...

Theory of operation. prometheus-client is imported when a :class:`RaftMetrics` is built
(:class:`~trio_raft.errors.MetricsUnavailableError` with the install line when it is missing),
never by ``import trio_raft``. A :class:`RaftMetrics` registers its histograms and one collector
in the registry it is given; each engine gets an :class:`EngineMetrics` under its own ``node``
label value, so several engines in one process share one registry without colliding (a second
``RaftMetrics`` in the same registry, or a second engine with the same name, is refused).
Histograms (proposal latency, WAL write + fsync, stages) are fed by the engine's observer calls
(``OpenConfig.observer``, ``trio_raft/engine/observer.py``). Everything else is copied from the
engine by :meth:`EngineMetrics.refresh` on the trio thread (``run`` calls it every
``interval`` seconds): the scrape, in the HTTP server's thread, only reads those copies and
never touches the engine.

Metrics (``trio_raft_`` prefix; label ``node``, plus the ones named):

=====================================  =========  ===========================================
name                                   type       meaning
=====================================  =========  ===========================================
``state{state}``                       gauge      1 for the current state
``is_leader``, ``term``                gauge
``commit_index``, ``applied_index``    gauge
``last_snapshot_index``                gauge
``last_leader_contact_seconds``        gauge      since the leader was last heard from; 0 on
                                                  the leader, -1 unknown
``leader_changes_total``               counter    new leaders seen
``peer_match_index{peer}``             gauge      leader only: what each peer holds
``peer_lag_entries{peer}``             gauge      leader only: last index - match
``snapshots_total{event}``             counter    ``written``, ``installed``, ``sent``,
                                                  ``received``
``dispatch_drops_total``               counter    messages dropped on a full peer lane
``dispatch_errors_total{code}``        counter    failed sends by gRPC code
``step_queue_full_total``              counter    inbound messages refused, queue full
``lane_streams_opened_total{lane}``    counter    raft streams opened to peers, ``lane`` =
                                                  ``replication`` or ``priority`` (more than
                                                  one per peer: reconnects)
``lane_messages_total{lane}``          counter    raft messages sent on each lane's stream
``native_connections_total``           counter    peer connections served on the trio
                                                  thread (native lanes, docs/transport.md
                                                  3.8; 0 with TLS or ``--no-native-lanes``)
``open_seconds``                       gauge      opening, replay included (cold start)
``open_snapshot_restored``,            gauge      1 when the snapshot was restored / skipped
``open_snapshot_skipped``                         at open
``open_entries_replayed``              gauge      entries applied at open
``envelope_on``                        gauge      1 when the raft envelope is on
``envelope_active_key_id``             gauge      the data key in use (0: none)
``envelope_cutover_index``             gauge      the cutover index (0: none)
``envelope_operations_total``          counter    ``op`` = ``wrap``, ``unwrap`` (entries),
``{op,result}``                                   ``payload_seal``, ``payload_open``
                                                  (snapshot payloads), ``payload``;
                                                  ``result`` = ``ok`` or ``failed``
``gc_collections_total{generation}``   counter    the process's garbage collections (no
                                                  ``node`` label: one process, every engine)
``gc_seconds_total{generation}``       counter    seconds the process spent in them
                                                  (``trio_raft.gctune.watch_gc``)
``gc_threshold{generation}``           gauge      the collector's thresholds now
                                                  (``trio_raft.tune_gc`` raises the first)
``proposal_seconds``                   histogram  propose until committed and applied
``wal_sync_seconds``                   histogram  one Ready's WAL write + fsync
``stage_seconds{stage}``               histogram  one stage of a write or a read on this node
                                                  (``trio_raft/engine/stages.py`` names them)
=====================================  =========  ===========================================
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import trio

from trio_raft.engine.engine import Engine
from trio_raft.engine.stages import STAGES
from trio_raft.engine.types import State
from trio_raft.errors import MetricsUnavailableError
from trio_raft.gctune import gc_times, watch_gc

#: Latency buckets (seconds) of the proposal and WAL histograms.
BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.006, 0.008, 0.012, 0.016, 0.025, 0.05, 0.1, 0.25,
           0.5, 1.0, 2.5, 5.0)
#: Buckets of the stage histogram: most stages take tens to hundreds of microseconds.
STAGE_BUCKETS = (0.00002, 0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016,
                 0.05, 0.25, 1.0)
_STATES = [s.value for s in State]
_SNAPSHOT_EVENTS = ("written", "installed", "sent", "received")


def _prometheus() -> tuple[ModuleType, ModuleType]:
    try:
        import prometheus_client
        import prometheus_client.core
    except ImportError as exc:
        raise MetricsUnavailableError() from exc
    return prometheus_client, prometheus_client.core


class RaftMetrics:
    """The metrics of one or more engines in one registry (see the module docstring)."""

    def __init__(self, registry: Any = None, *, namespace: str = "trio_raft",
                 label: str = "node") -> None:
        prom, _core = _prometheus()
        self.registry = registry if registry is not None else prom.CollectorRegistry()
        self.namespace = namespace
        self.label = label
        self._lock = threading.Lock()
        self._engines: dict[str, EngineMetrics] = {}
        self.proposal_seconds = prom.Histogram(
            f"{namespace}_proposal_seconds", "propose until committed and applied on this node",
            [label], buckets=BUCKETS, registry=self.registry)
        self.wal_sync_seconds = prom.Histogram(
            f"{namespace}_wal_sync_seconds", "one Ready's WAL write and fsync (group commit)",
            [label], buckets=BUCKETS, registry=self.registry)
        self.stage_seconds = prom.Histogram(
            f"{namespace}_stage_seconds", "one stage of a write or a read on this node",
            [label, "stage"], buckets=STAGE_BUCKETS, registry=self.registry)
        watch_gc()
        self._collector = _Collector(self)
        self.registry.register(self._collector)

    def engine(self, name: str) -> EngineMetrics:
        """The metrics of the engine called ``name`` (its ``node`` label value)."""
        with self._lock:
            if name in self._engines:
                raise ValueError(f"an engine called {name!r} is already registered")
            em = EngineMetrics(self, name)
            self._engines[name] = em
            return em

    def remove(self, name: str) -> None:
        """Stop exporting the engine called ``name``."""
        with self._lock:
            self._engines.pop(name, None)
        for h in (self.proposal_seconds, self.wal_sync_seconds):
            with contextlib.suppress(KeyError):
                h.remove(name)
        for stage in STAGES:
            with contextlib.suppress(KeyError):
                self.stage_seconds.remove(name, stage)

    def close(self) -> None:
        """Unregister everything from the registry."""
        for name in list(self._engines):
            self.remove(name)
        for c in (self._collector, self.proposal_seconds, self.wal_sync_seconds,
                  self.stage_seconds):
            self.registry.unregister(c)

    def _snapshots(self) -> list[tuple[str, dict[str, Any]]]:
        """Every engine's copied values (engines not refreshed yet are left out)."""
        with self._lock:
            return [(name, em.values) for name, em in self._engines.items() if em.values]


class EngineMetrics:
    """One engine's metrics: its observer (pass it as ``OpenConfig.observer``) and the copy of
    its state the collector exports."""

    def __init__(self, parent: RaftMetrics, name: str) -> None:
        self.name = name
        self._parent = parent
        self._proposal = parent.proposal_seconds.labels(name)
        self._wal = parent.wal_sync_seconds.labels(name)
        self._stages = {stage: parent.stage_seconds.labels(name, stage) for stage in STAGES}
        #: The exported values (replaced whole by :meth:`refresh`; read by the collector).
        self.values: dict[str, Any] = {}
        self._engine: Engine | None = None

    # -- the observer (the engine's trio thread) -----------------------------------------------
    def wal_write(self, seconds: float) -> None:
        self._wal.observe(seconds)

    def proposal(self, seconds: float) -> None:
        self._proposal.observe(seconds)

    def stage(self, stage: str, seconds: float, ended: float) -> None:
        h = self._stages.get(stage)
        if h is not None:
            h.observe(seconds)

    # -- engine state ---------------------------------------------------------------------------
    def attach(self, engine: Engine) -> None:
        self._engine = engine
        self.refresh()

    def refresh(self) -> None:
        """Copy the engine's state (call on its trio thread)."""
        engine = self._engine
        if engine is None:
            return
        st = engine.status()
        counts = engine.counters()
        report = engine.open_report()
        peers: dict[str, tuple[int, int]] = {}
        if st.state is State.LEADER:
            last = st.last_log_index
            peers = {pid: (p.match, max(0, last - p.match))
                     for pid, p in engine.replication().items()}
        self.values = {
            "state": st.state.value,
            "term": st.term,
            "commit_index": st.commit_index,
            "applied_index": engine.applied_index(),
            "last_snapshot_index": st.last_snapshot_index,
            "is_leader": int(st.state is State.LEADER),
            "last_leader_contact_seconds": st.last_contact,
            "leader_changes": counts.leader_changes,
            "snapshots": {"written": counts.snapshots_written,
                          "installed": counts.snapshots_installed,
                          "sent": counts.snapshots_sent,
                          "received": counts.snapshots_received},
            "peers": peers,
            "dispatch_drops": engine.dispatch_drop_count(),
            "dispatch_errors": engine.dispatch_error_counts_by_code(),
            "step_queue_full": engine.step_queue_full_count(),
            "open_seconds": report.seconds,
            "open_snapshot_restored": int(report.restored),
            "open_snapshot_skipped": int(report.skipped),
            "open_entries_replayed": report.entries_replayed,
            **_envelope_values(engine),
            **_lane_values(engine.transport_stats()),
        }

    async def run(self, engine: Engine | None = None, interval: float = 1.0) -> None:
        """Keep the copy fresh: attach ``engine`` (when given) and refresh every ``interval``
        seconds until cancelled."""
        if engine is not None:
            self.attach(engine)
        while True:
            self.refresh()
            await trio.sleep(interval)


def _gc_families(ns: str, gauge: Any, counter: Any) -> Iterator[Any]:
    """The process's collector: collections, seconds in them, thresholds (per generation)."""
    collections = counter(f"{ns}_gc_collections", "garbage collections of this process",
                          labels=["generation"])
    seconds = counter(f"{ns}_gc_seconds", "seconds this process spent collecting garbage",
                      labels=["generation"])
    for generation, (count, spent) in enumerate(gc_times()):
        collections.add_metric([str(generation)], float(count))
        seconds.add_metric([str(generation)], spent)
    threshold = gauge(f"{ns}_gc_threshold", "the garbage collector's thresholds",
                      labels=["generation"])
    for generation, value in enumerate(gc.get_threshold()):
        threshold.add_metric([str(generation)], float(value))
    yield from (collections, seconds, threshold)


class _Collector:
    """Turns every engine's copied values into samples, at scrape time."""

    def __init__(self, parent: RaftMetrics) -> None:
        self._parent = parent

    def describe(self) -> list[Any]:
        return list(self._families([]))

    def collect(self) -> Iterator[Any]:
        return self._families(self._parent._snapshots())

    def _families(self, engines: list[tuple[str, dict[str, Any]]]) -> Iterator[Any]:
        _prom, core = _prometheus()
        ns, lbl = self._parent.namespace, self._parent.label
        gauge, counter = core.GaugeMetricFamily, core.CounterMetricFamily
        yield from _gc_families(ns, gauge, counter)
        state = gauge(f"{ns}_state", "1 for the node's current raft state",
                      labels=[lbl, "state"])
        for name, v in engines:
            for s in _STATES:
                state.add_metric([name, s], 1.0 if v.get("state") == s else 0.0)
        yield state
        for key, doc in (("term", "current raft term"),
                         ("commit_index", "highest committed log index"),
                         ("applied_index", "highest applied log index"),
                         ("last_snapshot_index", "index of the newest snapshot"),
                         ("is_leader", "1 when this node is the leader"),
                         ("last_leader_contact_seconds",
                          "seconds since the leader was last heard from (0 leader, -1 unknown)"),
                         ("open_seconds", "seconds opening took, replay included"),
                         ("open_snapshot_restored", "1 when the snapshot was restored at open"),
                         ("open_snapshot_skipped",
                          "1 when the state machine's store held the snapshot at open"),
                         ("open_entries_replayed", "entries applied while opening"),
                         ("envelope_on", "1 when the raft envelope is on (entries and "
                                         "snapshots sealed)"),
                         ("envelope_active_key_id", "the data key new entries and snapshots "
                                                    "are sealed with (0: none)"),
                         ("envelope_cutover_index", "the envelope cutover index (0: none)")):
            g = gauge(f"{ns}_{key}", doc, labels=[lbl])
            for name, v in engines:
                g.add_metric([name], float(v.get(key, 0)))
            yield g
        for key, doc in (("leader_changes", "new leaders seen by this node"),
                         ("dispatch_drops", "raft messages dropped on a full peer lane"),
                         ("step_queue_full", "inbound raft messages refused, queue full"),
                         ("native_connections", "peer connections served on the trio thread "
                                                "(native lanes)")):
            c = counter(f"{ns}_{key}", doc, labels=[lbl])
            for name, v in engines:
                c.add_metric([name], float(v.get(key, 0)))
            yield c
        snaps = counter(f"{ns}_snapshots", "snapshots written, installed, sent and received",
                        labels=[lbl, "event"])
        errors = counter(f"{ns}_dispatch_errors", "failed raft sends by gRPC code",
                         labels=[lbl, "code"])
        match = gauge(f"{ns}_peer_match_index", "leader only: the log index each peer holds",
                      labels=[lbl, "peer"])
        lag = gauge(f"{ns}_peer_lag_entries", "leader only: entries each peer lacks",
                    labels=[lbl, "peer"])
        for name, v in engines:
            for event in _SNAPSHOT_EVENTS:
                snaps.add_metric([name, event], float(v.get("snapshots", {}).get(event, 0)))
            for code, n in sorted(v.get("dispatch_errors", {}).items()):
                errors.add_metric([name, code], float(n))
            for peer, (m, behind) in sorted(v.get("peers", {}).items()):
                match.add_metric([name, peer], float(m))
                lag.add_metric([name, peer], float(behind))
        yield from (snaps, errors, match, lag)
        opened = counter(f"{ns}_lane_streams_opened", "raft streams opened to peers, by lane",
                         labels=[lbl, "lane"])
        sent = counter(f"{ns}_lane_messages", "raft messages sent on each lane's stream",
                       labels=[lbl, "lane"])
        for name, v in engines:
            for lane, (opens, messages) in sorted(v.get("lanes", {}).items()):
                opened.add_metric([name, lane], float(opens))
                sent.add_metric([name, lane], float(messages))
        yield from (opened, sent)
        envelope = counter(f"{ns}_envelope_operations",
                           "raft envelope operations: entry wraps and unwraps, snapshot "
                           "payloads sealed and opened, by result", labels=[lbl, "op", "result"])
        for name, v in engines:
            for (op, result), n in sorted(v.get("envelope_ops", {}).items()):
                envelope.add_metric([name, op, result], float(n))
        yield envelope


#: (op, result) -> the CipherCounts field it is exported from.
_ENVELOPE_OPS = {("wrap", "ok"): "wraps", ("wrap", "failed"): "wrap_failures",
                 ("unwrap", "ok"): "unwraps", ("unwrap", "failed"): "unwrap_failures",
                 ("payload_seal", "ok"): "payloads_sealed",
                 ("payload_open", "ok"): "payloads_opened",
                 ("payload", "failed"): "payload_failures"}


def _lane_values(stats: dict[str, Any]) -> dict[str, Any]:
    """The lanes' counters from a transport's ``stats()`` (none for a transport without)."""
    if "stream_opens" not in stats:
        return {}
    return {"lanes": {"replication": (stats["stream_opens"], stats["stream_messages"]),
                      "priority": (stats["priority_opens"], stats["priority_messages"])},
            "native_connections": stats.get("native_connections", 0)}


def _envelope_values(engine: Engine) -> dict[str, Any]:
    """The envelope's gauges and the cipher's counts (docs/envelope.md)."""
    env = engine.envelope_status()
    counts = env.counts
    return {"envelope_on": int(env.on), "envelope_active_key_id": env.active_key_id,
            "envelope_cutover_index": env.cutover_index or 0,
            "envelope_ops": {k: getattr(counts, f) for k, f in _ENVELOPE_OPS.items()}}
