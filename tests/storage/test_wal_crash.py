"""kill -9 a WAL writer at random moments; every acknowledged entry must survive."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys

import pytest

from trio_raft.storage.wal import WAL

from .wal_crash_writer import expected_data

WRITER = os.path.join(os.path.dirname(__file__), "wal_crash_writer.py")
KILLS = int(os.environ.get("TRIO_RAFT_CRASH_KILLS", "60"))


def check_wal(wal_dir: str, acked: int) -> None:
    """Reopen (repairing a torn tail) and check every entry."""
    with WAL.open(wal_dir, segment_size=64 << 10) as w:
        c = w.read_all()
    indexes = [e.index for e in c.entries]
    assert indexes == list(range(1, len(indexes) + 1)), "entries are not contiguous from 1"
    assert len(indexes) >= acked, f"acknowledged index {acked} lost (have {len(indexes)})"
    for e in c.entries:
        assert e.data == expected_data(e.index), f"entry {e.index} has wrong data"
    assert c.metadata == b"crash-test"


@pytest.mark.slow
def test_kill_9_never_loses_acknowledged_entries(tmp_path) -> None:
    wal_dir = str(tmp_path / "wal")
    rng = random.Random(0xC0FFEE)
    acked = 0
    kills = 0
    for round_no in range(KILLS):
        proc = subprocess.Popen(
            [sys.executable, WRITER, wal_dir, str(round_no), str(64 << 10)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if line != b"ready\n":
                proc.wait()
                pytest.fail(f"writer failed to start: {line!r} {proc.stderr.read()!r}")  # type: ignore[union-attr]
            for _ in range(rng.randint(0, 12)):
                line = proc.stdout.readline()
                if not line:
                    proc.wait()
                    pytest.fail(f"writer died: {proc.stderr.read()!r}")  # type: ignore[union-attr]
                acked = max(acked, int(line))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            proc.stdout.close()  # type: ignore[union-attr]
            proc.stderr.close()  # type: ignore[union-attr]
        assert proc.returncode == -signal.SIGKILL
        kills += 1
        check_wal(wal_dir, acked)
    assert kills >= 50 or KILLS < 50
    assert acked > 0
    segments = [n for n in os.listdir(wal_dir) if n.endswith(".wal")]
    assert len(segments) > 1  # the run crossed segment cuts
