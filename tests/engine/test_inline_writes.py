"""Small WAL writes on the run loop's own thread while the disk is fast, worker threads when it
is not (trio_raft/engine/diskio.py ``InlineWrites``, trio_raft/engine/persist.py): the policy's
back-off, and a ``LogWriter`` over real files whose disk turns slow and fast again."""

from __future__ import annotations

import logging
import threading

import pytest
import trio
import trio.testing

from tests.engine.kv import KV
from trio_raft.core.messages import Entry, HardState, Ready
from trio_raft.engine.diskio import DiskRunner, InlineWrites
from trio_raft.engine.persist import IDLE_RUNNABLE, LogWriter
from trio_raft.storage import open_disk_state
from trio_raft.storage.fileio import OSFileIO
from trio_raft.storage.recovery import PersistedPeer


class TimedFileIO(OSFileIO):
    """The real seam, recording which thread each WAL sync ran on."""

    __slots__ = ("sync_threads",)

    def __init__(self) -> None:
        self.sync_threads: list[int] = []

    def _synced(self, fd: int) -> None:
        self.sync_threads.append(threading.get_ident())

    def fdatasync(self, fd: int) -> None:
        super().fdatasync(fd)
        self._synced(fd)

    def fsync(self, fd: int) -> None:
        super().fsync(fd)
        self._synced(fd)


def test_policy_backs_off_from_slow_writes_doubling_up_to_the_limit(caplog):
    p = InlineWrites(limit=0.010, max_bytes=100, first_backoff=1.0, max_backoff=4.0)
    assert p.allows(100, 0.0)
    assert not p.allows(101, 0.0)  # large writes always go to a worker thread
    assert not InlineWrites(limit=0).allows(1, 0.0)  # 0: never inline
    p.record(True, 0.005, 0.0)
    assert p.allows(10, 0.0) and p.slow_writes == 0
    with caplog.at_level(logging.INFO, logger="trio_raft.engine.diskio"):
        p.record(True, 0.020, 10.0)  # a slow inline write: worker threads for 1 s
    assert "small writes go to worker threads for 1 s" in caplog.text
    assert not p.allows(10, 10.5)
    assert p.allows(10, 11.0)
    p.record(True, 0.020, 11.0)  # again: 2 s
    assert not p.allows(10, 12.9) and p.allows(10, 13.0)
    p.record(True, 0.020, 13.0)  # 4 s
    p.record(True, 0.020, 17.0)  # still 4 s: the maximum
    assert not p.allows(10, 20.9) and p.allows(10, 21.0)
    p.record(True, 0.001, 21.0)  # a fast inline write: the back-off starts over
    p.record(False, 0.020, 30.0)  # a slow write in a worker thread backs off too ...
    assert not p.allows(10, 30.9) and p.allows(10, 31.0)
    p.record(False, 0.020, 31.0)  # ... without growing the back-off
    assert not p.allows(10, 31.9) and p.allows(10, 32.0)
    p.record(False, 0.001, 40.0)
    assert p.allows(10, 40.0)
    assert p.slow_writes == 6


def ready(index: int, data: bytes = b"x" * 100) -> Ready:
    return Ready(hard_state=HardState(1, 1, index - 1), entries=(Entry(1, index, data=data),),
                 must_sync=True)


@pytest.fixture
def still_clock() -> trio.testing.MockClock:
    """Virtual time that moves only when the test jumps it (the back-off is on trio's clock)."""
    return trio.testing.MockClock()


async def test_log_writer_writes_on_its_thread_until_the_disk_is_slow(
        tmp_path, still_clock: trio.testing.MockClock):
    clock = still_clock
    fio = TimedFileIO()
    ds = open_disk_state(str(tmp_path / "d"), [PersistedPeer(1, "n1", "")], True, KV(),
                         file_io=fio)
    # Whether a write counts as slow must not depend on the machine's load: the limit is set
    # far above any real write, or (``slow``) below every real one.
    fast, slow = 60.0, 1e-9
    policy = InlineWrites(limit=fast, max_bytes=1000, first_backoff=5.0)
    waits: list[float] = []
    writer = LogWriter(disk=ds.persistence, storage=ds.storage, io=DiskRunner(False),
                       observer=waits.append, inline=policy)
    here = threading.get_ident()
    index = ds.storage.last_index() + 1

    async def write(data: bytes = b"x" * 100) -> int:
        """One Ready; returns the thread its sync ran on."""
        nonlocal index
        before = len(fio.sync_threads)
        await writer.persist(ready(index, data))
        assert ds.storage.last_index() == index
        index += 1
        assert len(fio.sync_threads) == before + 1
        return fio.sync_threads[-1]

    assert await write() == here
    assert await write(b"y" * 1001) != here  # larger than max_bytes
    assert await write() == here
    policy.limit = slow
    assert await write() == here  # the slow write itself was inline ...
    policy.limit = fast
    assert await write() != here  # ... the next ones are not, for the back-off
    clock.jump(4.9)
    assert await write() != here
    clock.jump(0.2)
    policy.limit = slow
    assert await write() == here  # the back-off is over, and the disk is still slow
    policy.limit = fast
    clock.jump(9.9)  # so the back-off doubled
    assert await write() != here
    clock.jump(0.2)
    assert await write() == here
    policy.limit = slow
    assert await write() == here  # a fast inline write started the back-off over
    policy.limit = fast
    clock.jump(5.1)
    assert await write() == here
    policy.limit = slow
    assert await write(b"y" * 1001) != here  # a slow write in a worker thread ...
    policy.limit = fast
    assert await write() != here  # ... sends the small ones there too
    assert policy.slow_writes == 4
    clock.jump(5.1)
    assert await write() == here
    for waiting, inline in ((IDLE_RUNNABLE, True), (IDLE_RUNNABLE + 1, False)):
        async with trio.open_nursery() as nursery:
            go = trio.Event()
            for _ in range(waiting):
                nursery.start_soon(go.wait)
            await trio.testing.wait_all_tasks_blocked()
            go.set()  # ``waiting`` tasks ready to run when the write comes
            assert (await write() == here) is inline
    assert await write() == here
    assert len(waits) == index - (ds.storage.first_index())  # every write observed
    last = index - 1
    ds.persistence.close()
    # everything written inline is durable: a restart reads it back
    again = open_disk_state(str(tmp_path / "d"), [], False, KV())
    try:
        assert again.storage.last_index() == last
        assert again.hard_state.commit == last - 1
    finally:
        again.persistence.close()
