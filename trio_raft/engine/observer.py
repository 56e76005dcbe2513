"""The engine's observer seam and counters: what an application (its metrics) learns as it
happens, and what it can read at any time.

* :class:`EngineObserver` (``OpenConfig.observer``): called by the engine, on its trio thread,
  when something worth a histogram happens: a WAL write (and fsync) finished, a proposal was
  committed and applied, and (a :class:`StageObserver`) a stage of a write or a read ended
  (``stages.py`` names them; an observer without a ``stage`` method of its own, like
  :class:`NullObserver`, turns that timing off). Calls must be quick and must not raise (an
  exception is logged and the observer is called again next time: a broken metric never stops
  the engine).
  :class:`NullObserver` does nothing; subclass it to observe some events only.
  ``trio_raft.metrics`` implements one.
* :class:`EngineCounters`: monotonic counts the run loop keeps (snapshots sent and received);
  ``Engine.counters()`` returns them with the others (:class:`CounterValues`: leader changes
  come from ``status.py``, snapshots written and installed from their owners).
"""

from __future__ import annotations

import logging
from typing import Protocol, runtime_checkable

import attrs

logger = logging.getLogger(__name__)


@runtime_checkable
class EngineObserver(Protocol):
    """See the module docstring. Every method is called on the engine's trio thread."""

    def wal_write(self, seconds: float) -> None:
        """One Ready's WAL write (entries and hard state, fsynced when raft required it) took
        ``seconds``: the fsync latency a client's write pays (group commit)."""

    def proposal(self, seconds: float) -> None:
        """A proposal made on this engine was committed and applied ``seconds`` after it was
        submitted (``propose``, ``propose_admin``, ``propose_nowait``)."""



@runtime_checkable
class StageObserver(EngineObserver, Protocol):
    """An :class:`EngineObserver` that also takes the stage timings (``stages.py``). The
    engine looks for the ``stage`` method at open: an observer without one is not told, and
    nothing is timed."""

    def stage(self, stage: str, seconds: float, ended: float) -> None:
        """A stage of this node's part of a write or a read took ``seconds`` and ended at the
        ``time.perf_counter()`` instant ``ended`` (``stage`` is one of ``stages.STAGES``;
        ``stages.py`` says where each starts and ends)."""


class NullObserver:
    """An observer that ignores everything (the default)."""

    def wal_write(self, seconds: float) -> None:
        pass

    def proposal(self, seconds: float) -> None:
        pass

    def stage(self, stage: str, seconds: float, ended: float) -> None:
        pass


class SafeObserver:
    """Wraps an observer so that an exception it raises is logged, never propagated."""

    def __init__(self, inner: EngineObserver) -> None:
        self.inner = inner

    def wal_write(self, seconds: float) -> None:
        try:
            self.inner.wal_write(seconds)
        except Exception:
            logger.exception("engine observer failed (wal_write)")

    def proposal(self, seconds: float) -> None:
        try:
            self.inner.proposal(seconds)
        except Exception:
            logger.exception("engine observer failed (proposal)")

    def stage(self, stage: str, seconds: float, ended: float) -> None:
        try:
            self.inner.stage(stage, seconds, ended)  # type: ignore[attr-defined]
        except Exception:
            logger.exception("engine observer failed (stage)")


def safe_observer(observer: EngineObserver | None) -> EngineObserver:
    return NullObserver() if observer is None else SafeObserver(observer)


@attrs.define
class EngineCounters:
    """Counts the run loop keeps (trio thread)."""

    #: Snapshots this node streamed to a follower to the end.
    snapshots_sent: int = 0
    #: Snapshots (``MsgSnap`` with their payload) this node received from a leader.
    snapshots_received: int = 0


@attrs.frozen
class CounterValues:
    """``Engine.counters()``: every count since the engine opened."""

    leader_changes: int = 0
    snapshots_written: int = 0
    snapshots_installed: int = 0
    snapshots_sent: int = 0
    snapshots_received: int = 0
