"""The WAL on a genuinely full file system: a 2 MiB tmpfs mounted for the test (needs root).

Skipped, with the reason, only where mounting is not permitted.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from trio_raft.core.messages import Entry, HardState
from trio_raft.errors import WALIOError, WALPoisonedError
from trio_raft.storage.wal import WAL

SEGMENT_SIZE = 256 << 10
FILLER = 256 << 10


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8); not permitted here")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(mnt)],
                          capture_output=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {proc.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def entry(i: int) -> Entry:
    return Entry(1, i, data=bytes([i % 251]) * 3000)


def test_wal_on_a_full_filesystem(small_fs: Path) -> None:
    (small_fs / "filler").write_bytes(b"\xff" * FILLER)  # freed later to make room again
    wal_dir = small_fs / "wal"
    w = WAL.create(wal_dir, b"full", segment_size=SEGMENT_SIZE)
    acked: list[Entry] = []
    attempted: list[Entry] = []
    with pytest.raises(WALIOError) as info:
        for _ in range(1000):  # 2 MiB cannot hold 1000 x 24 KB
            last = acked[-1].index if acked else 0
            attempted = [entry(i) for i in range(last + 1, last + 9)]
            w.save(HardState(1, 1, last), attempted)
            acked += attempted
    err = info.value
    assert err.errno == errno.ENOSPC and isinstance(err.__cause__, OSError)
    assert err.path.startswith(str(wal_dir)) and err.op in ("write", "create")
    assert len(acked) > 40  # the disk did take a good part of it
    with pytest.raises(WALPoisonedError):
        w.save(HardState(1, 1, 0), [entry(len(acked) + 1)])
    w.close()
    assert not [n for n in os.listdir(wal_dir) if n.endswith(".tmp")]

    # Still full: the reopen repairs a torn tail (truncating needs no space) and finds every
    # acknowledged entry, plus at most whole entries of the batch that failed.
    with WAL.open(wal_dir, segment_size=SEGMENT_SIZE) as again:
        got = list(again.read_all().entries)
    assert got[: len(acked)] == acked
    assert got[len(acked):] == attempted[: len(got) - len(acked)]

    # Room again: the WAL appends where it left off.
    (small_fs / "filler").unlink()
    with WAL.open(wal_dir, segment_size=SEGMENT_SIZE) as again:
        again.save(HardState(1, 1, len(got)), [entry(len(got) + 1)])
    with WAL.open(wal_dir, segment_size=SEGMENT_SIZE) as again:
        assert list(again.read_all().entries) == [*got, entry(len(got) + 1)]
