"""kill -9 a WAL writer at random moments; every acknowledged entry must survive."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys

import pytest

from trio_raft.storage.wal import WAL

from .wal_crash_writer import expected_data

WRITER = "tests.storage.wal_crash_writer"
#: The repository root: the writer runs from there, as a module of the tests package.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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
    live: int | None = None  # a writer that has not been reported dead yet
    with open(tmp_path / "writer.stderr", "wb") as err:
        server = subprocess.Popen([sys.executable, "-m", WRITER, "serve"], cwd=ROOT,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
    assert server.stdin is not None and server.stdout is not None

    def fail(what: str, line: bytes) -> None:
        server.kill()
        server.wait()
        pytest.fail(f"{what}: {line!r}; stderr: {(tmp_path / 'writer.stderr').read_bytes()!r}")

    try:
        line = server.stdout.readline()
        if line != b"serving\n":
            fail("writer server failed to start", line)
        for round_no in range(KILLS):
            server.stdin.write(f"run {wal_dir} {round_no} {64 << 10}\n".encode())
            server.stdin.flush()
            line = server.stdout.readline()
            if not line.startswith(b"ready "):
                fail("writer failed to start", line)
            live = int(line.split()[1])
            for _ in range(rng.randint(0, 12)):
                line = server.stdout.readline()
                if not line.strip().isdigit():
                    fail("writer died", line)
                acked = max(acked, int(line))
            os.kill(live, signal.SIGKILL)
            # Acknowledgements written before the kill landed still count; then the server
            # reports how the writer ended.
            while not (line := server.stdout.readline()).startswith(b"exited "):
                if not line.strip().isdigit():
                    fail("unexpected output", line)
                acked = max(acked, int(line))
            status = int(line.split()[1])
            live = None
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
            kills += 1
            check_wal(wal_dir, acked)
    finally:
        if live is not None:  # never leave a writer running behind a failed test
            with contextlib.suppress(ProcessLookupError):
                os.kill(live, signal.SIGKILL)
        server.stdin.close()
        server.wait()
        server.stdout.close()
    assert server.returncode == 0
    assert kills >= 50 or KILLS < 50
    assert acked > 0
    segments = [n for n in os.listdir(wal_dir) if n.endswith(".wal")]
    assert len(segments) > 1  # the run crossed segment cuts
