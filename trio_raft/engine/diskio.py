"""Where the engine's blocking file I/O runs.

Storage (``trio_raft.storage``) is synchronous. The engine runs every storage call through one
:class:`DiskRunner`: in a worker thread (``trio.to_thread``) normally, or on the trio thread when
``OpenConfig.blocking_io`` is set. The second mode keeps multi-node tests deterministic under
``trio.testing.MockClock(autojump_threshold=0)``: with worker threads an autojumping clock races
ahead while a thread fsyncs. Both modes use real files and real fsync.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import attrs
import trio

T = TypeVar("T")


class DiskRunner:
    """Runs blocking storage calls for the engine (see the module docstring)."""

    __slots__ = ("blocking",)

    def __init__(self, blocking: bool) -> None:
        self.blocking = blocking

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        if self.blocking:
            await trio.lowlevel.checkpoint()
            return fn(*args)
        return await trio.to_thread.run_sync(fn, *args)

    async def run_timed(self, fn: Callable[..., T], *args: object) -> tuple[T, Timing]:
        """Like :meth:`run`, and also when: see :class:`Timing`."""
        called = time.perf_counter()
        if self.blocking:
            await trio.lowlevel.checkpoint()
            began = time.perf_counter()
            result = fn(*args)
            ended = time.perf_counter()
            return result, Timing(called, began, ended, ended)

        def timed() -> tuple[T, float, float]:
            t0 = time.perf_counter()
            value = fn(*args)
            return value, t0, time.perf_counter()

        result, began, ended = await trio.to_thread.run_sync(timed)
        return result, Timing(called, began, ended, time.perf_counter())


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
