"""Where the engine's blocking file I/O runs.

Storage (``trio_raft.storage``) is synchronous. The engine runs every storage call through one
:class:`DiskRunner`: in a worker thread (``trio.to_thread``) normally, or on the trio thread when
``OpenConfig.blocking_io`` is set. The second mode keeps multi-node tests deterministic under
``trio.testing.MockClock(autojump_threshold=0)``: with worker threads an autojumping clock races
ahead while a thread fsyncs. Both modes use real files and real fsync.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

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
