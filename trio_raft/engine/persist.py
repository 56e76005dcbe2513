"""Writing each Ready's log changes to disk, and mirroring them into raft's log storage.

``LogWriter.persist`` takes the part of a Ready that must be durable before anything that
depends on it happens (Raft paper §5.3, Figure 2 "persistent state"): entries and hard state
go to the WAL in one write, fsynced when raft requires it (``Ready.must_sync``), so every
proposal drained in one turn of the run loop shares one fsync (group commit). Only once the
write returned are the entries appended to the in-memory ``MemoryStorage`` raft reads from.

A hard state that only moves the commit index needs no fsync (the commit index is recomputed
from a quorum after a restart): it is written on the trio thread when no other writer holds the
WAL, skipping a worker-thread round trip that would cost more than the write. Small Readys are
written (and fsynced) on the trio thread too while the disk is fast and the thread is idle
(``diskio.InlineWrites``); everything else goes to a worker thread. A leader's appends leave
before its own write (``loop.py``, Raft thesis §10.2.1), and on an idle lane they are on the
wire before the write starts (``dispatch.py``, direct writes), so its fsync overlaps the
followers' instead of costing the two hand-offs of a worker thread (docs/benchmarks.md,
"Direct writes").
"""

from __future__ import annotations

import time
from collections.abc import Callable

import trio

from trio_raft.core.messages import Ready
from trio_raft.core.storage import MemoryStorage
from trio_raft.engine import stages
from trio_raft.engine.diskio import DiskRunner, InlineWrites
from trio_raft.storage.recovery import DiskPersistence

#: Tasks ready to run beside the loop on a node that is otherwise idle: a follower's inbound
#: consumer and the sender of its last answer, or a leader's two sender tasks.
IDLE_RUNNABLE = 2


class LogWriter:
    """See the module docstring."""

    def __init__(self, *, disk: DiskPersistence, storage: MemoryStorage, io: DiskRunner,
                 observer: Callable[[float], None] | None = None,
                 stage: stages.StageSink | None = None,
                 test_delay: Callable[[], float] | None = None,
                 inline: InlineWrites | None = None) -> None:
        self._disk = disk
        #: When a write may run on the trio thread (None: never).
        self.inline = inline
        self._storage = storage
        self._io = io
        #: Called with the seconds each WAL write (and fsync) took.
        self._observer = observer
        #: Told of the ``wal`` and ``wal_handoff`` stages (None: not timed).
        self._stage = stage
        #: Tests only: seconds to wait before each WAL write (a slow disk).
        self._test_delay = test_delay

    async def persist(self, rd: Ready) -> None:
        """Make ``rd``'s entries, hard state and snapshot marker durable (the snapshot's
        payload and ``.snap`` file are installed before, by the applier)."""
        hs = rd.hard_state
        if (
            hs is not None
            and not rd.entries
            and rd.snapshot is None
            and not rd.must_sync
            and self._disk.try_save_state(hs)
        ):
            self._storage.set_hard_state(hs)
            return
        if not (rd.entries or hs is not None or rd.snapshot is not None):
            return
        if self._test_delay is not None:
            delay = self._test_delay()
            if delay > 0:
                await trio.sleep(delay)
        if not (rd.snapshot is None and await self._write_inline(rd)):
            _, t = await self._io.run_timed(
                self._disk.save_ready, hs, rd.entries, rd.snapshot, rd.must_sync)
            if self.inline is not None and rd.snapshot is None:
                self.inline.record(False, t.inside, trio.current_time())
            self._observed(t.resumed - t.called, t.inside, t.handoff, t.ended, t.resumed)
        if rd.entries:
            self._storage.append(rd.entries)
        if hs is not None:
            self._storage.set_hard_state(hs)

    async def _write_inline(self, rd: Ready) -> bool:
        """Write ``rd`` on this thread when the policy allows it and no other writer holds the
        WAL; returns whether it did.

        Only when at most :data:`IDLE_RUNNABLE` other tasks are ready to run: under load the
        trio thread has work to do during the fsync, which a worker thread lets it do. Then a
        checkpoint: tasks woken so far (sender tasks given messages just before) run before this
        thread spends the fsync here."""
        policy = self.inline
        if policy is None or self._io.blocking:
            return False
        now = trio.current_time()
        if not policy.allows(sum(len(e.data) for e in rd.entries), now):
            return False
        if trio.lowlevel.current_statistics().tasks_runnable > IDLE_RUNNABLE:
            return False
        await trio.lowlevel.checkpoint()
        began = time.perf_counter()
        if not self._disk.try_save_ready(rd.hard_state, rd.entries, rd.must_sync):
            return False
        ended = time.perf_counter()
        policy.record(True, ended - began, now)
        self._observed(ended - began, ended - began, 0.0, ended, ended)
        return True

    def _observed(self, total: float, inside: float, handoff: float, ended: float,
                  resumed: float) -> None:
        if self._observer is not None:
            self._observer(total)
        if self._stage is not None:
            self._stage(stages.WAL, inside, ended)
            self._stage(stages.WAL_HANDOFF, handoff, resumed)
