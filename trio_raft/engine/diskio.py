"""Where the engine's blocking file I/O runs.

Storage (``trio_raft.storage``) is synchronous. The engine runs every storage call through one
:class:`DiskRunner`: in a worker thread (``trio.to_thread``) normally, or on the trio thread when
``OpenConfig.blocking_io`` is set. The second mode keeps multi-node tests deterministic under
``trio.testing.MockClock(autojump_threshold=0)``: with worker threads an autojumping clock races
ahead while a thread fsyncs. Both modes use real files and real fsync.

Small WAL writes on a fast disk are the exception (:class:`InlineWrites`): a write and fsync of
a few hundred bytes takes ~0.1-0.4 ms on a local SSD, less than the two thread hand-offs around
it (trio -> worker -> trio, ~0.4 ms on a loaded 2-core machine, ``stages.WAL_HANDOFF``), so the
run loop does it on its own thread (the GIL is released during the fsync, so the transport's
thread keeps running) when hardly any other trio task is ready to run (``persist.py``: under
load the worker thread lets the trio thread work during the fsync). A slow disk must not stall the
trio thread (heartbeats, elections, every other task) for long: the first write that takes
longer than ``limit`` sends the writes back to worker threads for ``backoff`` seconds
(doubling each time it happens again, up to ``max_backoff``), and so does a write in a worker
thread that takes that long. So a stalling disk costs the trio thread at most one slow write
per back-off period.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import attrs
import trio

T = TypeVar("T")

logger = logging.getLogger(__name__)


class DiskRunner:
    """Runs blocking storage calls for the engine (see the module docstring)."""

    __slots__ = ("_now", "blocking")

    def __init__(self, blocking: bool, *, clock: Callable[[], float] = time.perf_counter
                 ) -> None:
        self.blocking = blocking
        #: Where :meth:`run_timed` reads its instants (a test gives a clock it controls).
        self._now = clock

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        if self.blocking:
            await trio.lowlevel.checkpoint()
            return fn(*args)
        return await trio.to_thread.run_sync(fn, *args)

    async def run_timed(self, fn: Callable[..., T], *args: object) -> tuple[T, Timing]:
        """Like :meth:`run`, and also when: see :class:`Timing`."""
        now = self._now
        called = now()
        if self.blocking:
            await trio.lowlevel.checkpoint()
            began = now()
            result = fn(*args)
            ended = now()
            return result, Timing(called, began, ended, ended)

        def timed() -> tuple[T, float, float]:
            t0 = now()
            value = fn(*args)
            return value, t0, now()

        result, began, ended = await trio.to_thread.run_sync(timed)
        return result, Timing(called, began, ended, now())


@attrs.frozen(slots=True)
class Timing:
    """``time.perf_counter()`` instants of one :meth:`DiskRunner.run_timed` call: the caller
    called, the function began and ended (in its thread), the caller resumed."""

    called: float
    began: float
    ended: float
    resumed: float

    @property
    def inside(self) -> float:
        """Seconds the function ran."""
        return self.ended - self.began

    @property
    def handoff(self) -> float:
        """Seconds the caller waited beyond that: the thread hand-offs."""
        return max(0.0, (self.resumed - self.called) - self.inside)


class InlineWrites:
    """Whether the next WAL write may run on the trio thread (see the module docstring).

    ``limit`` (seconds): the longest write that keeps writes inline; 0 never writes inline.
    ``max_bytes``: larger writes always go to a worker thread (their cost grows with their
    size, and under load the trio thread has other work to do meanwhile). Times are trio clock
    instants (``now``), so the back-off follows ``MockClock`` in tests.
    """

    __slots__ = ("_backoff", "_until", "first_backoff", "limit", "max_backoff", "max_bytes",
                 "slow_writes")

    def __init__(self, limit: float = 0.010, max_bytes: int = 64 << 10,
                 first_backoff: float = 1.0, max_backoff: float = 60.0) -> None:
        self.limit = limit
        self.max_bytes = max_bytes
        self.first_backoff = first_backoff
        self.max_backoff = max_backoff
        self._backoff = first_backoff
        self._until = float("-inf")
        #: Writes that took longer than ``limit`` (inline or not).
        self.slow_writes = 0

    def allows(self, nbytes: int, now: float) -> bool:
        return self.limit > 0 and nbytes <= self.max_bytes and now >= self._until

    def record(self, inline: bool, seconds: float, now: float) -> None:
        """A WAL write (on the trio thread when ``inline``) took ``seconds``."""
        if seconds <= self.limit:
            if inline:
                self._backoff = self.first_backoff
            return
        self.slow_writes += 1
        if self.slow_writes == 1 or self.slow_writes % 100 == 0:
            logger.info("WAL write took %.1f ms: small writes go to worker threads for %.0f s "
                        "(%d slow writes so far)", seconds * 1000, self._backoff,
                        self.slow_writes)
        self._until = max(self._until, now + self._backoff)
        if inline:
            self._backoff = min(self._backoff * 2, self.max_backoff)
