"""Tuning the interpreter's cyclic garbage collector for a process that runs an engine.

Every proposal allocates a few dozen short-lived objects the collector tracks (the request and
its waiter, log entries, messages, trio's task bookkeeping). With the interpreter's default
young-generation threshold (700 allocations), a collection runs every few proposals and walks
every object still in flight; what survives is promoted, so the older generations fill with
objects that die soon after and full collections walk them all again. Measured in the leader
of ``bench/engine_bench.py`` at 1,024 proposals in flight, that was about a tenth of the
process's time (docs/operations.md, "Garbage collection", with the figures).

:func:`tune_gc` raises the young threshold, so most of those objects are freed by reference
counting before a collection ever sees them, and freezes what the process holds once it has
started (modules, classes, configuration: ``gc.freeze``), so full collections stop walking it.
Nothing is turned off: cycles are still collected, later.

It changes the whole process, so the engine never calls it: the application does, once, when it
has started (``kvnode serve`` does by default, ``--gc-threshold``).

:func:`watch_gc` times the collections (a ``gc.callbacks`` hook, installed once per process,
two clock reads per collection) so that :mod:`trio_raft.metrics` can export how much of the
process's time they take (``trio_raft_gc_seconds_total``): the figure that tells an operator
whether the tuning is needed, or working.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from typing import Any

from trio_raft.errors import ConfigError

logger = logging.getLogger(__name__)

#: The young-generation threshold :func:`tune_gc` sets unless told otherwise (the interpreter's
#: own is 700).
GC_THRESHOLD = 50_000
#: The two older generations' thresholds it sets with it: a middle-generation collection every
#: 20 young ones, a full one every 10 of those (still subject to the interpreter's own rule
#: that a full collection waits until a quarter of the old objects are new).
OLDER_THRESHOLDS = (20, 10)


def tune_gc(threshold: int = GC_THRESHOLD, *, freeze: bool = True) -> tuple[int, int, int]:
    """Set the collector's thresholds to ``(threshold, *OLDER_THRESHOLDS)`` and, with
    ``freeze``, collect once and move every object alive now out of the collector's reach
    (``gc.freeze``). Returns the thresholds it replaced: ``gc.set_threshold(*previous)`` puts
    them back (``gc.unfreeze`` undoes the freeze).

    Process-wide: call it from the application, once, after start-up. A ``threshold`` that is
    not a positive integer is refused (:class:`~trio_raft.errors.ConfigError`)."""
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
        raise ConfigError(f"gc threshold must be a positive integer, not {threshold!r}")
    previous = gc.get_threshold()
    gc.set_threshold(threshold, *OLDER_THRESHOLDS)
    frozen = 0
    if freeze:
        gc.collect()
        gc.freeze()
        frozen = gc.get_freeze_count()
    logger.info("gc thresholds %s (were %s); %d objects frozen",
                (threshold, *OLDER_THRESHOLDS), previous, frozen)
    return previous


class _Timer:
    """Collections and seconds spent in them, per generation, since :func:`watch_gc`."""

    def __init__(self) -> None:
        self.collections = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        # Collections never overlap (the interpreter runs one at a time, under its lock), so
        # one start instant is enough.
        if phase == "start":
            self._started = time.perf_counter()
            return
        generation = info.get("generation", 2)
        if 0 <= generation < 3:
            self.collections[generation] += 1
            self.seconds[generation] += time.perf_counter() - self._started


_timer: _Timer | None = None
_timer_lock = threading.Lock()


def watch_gc() -> None:
    """Start timing the process's collections (idempotent)."""
    global _timer
    with _timer_lock:
        if _timer is None:
            _timer = _Timer()
            gc.callbacks.append(_timer)


def gc_times() -> tuple[tuple[int, float], ...]:
    """Per generation (0, 1, 2): (collections, seconds spent in them) since :func:`watch_gc`
    was first called; zeros before."""
    timer = _timer
    if timer is None:
        return ((0, 0.0), (0, 0.0), (0, 0.0))
    return tuple(zip(list(timer.collections), list(timer.seconds)))
