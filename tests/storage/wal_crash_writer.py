"""Crash-test child: append fsynced batches to a WAL forever, acknowledging each on stdout.

Run from the repository root as a module of the tests package:

* ``python -m tests.storage.wal_crash_writer WAL_DIR SEED SEGMENT_SIZE`` runs one writer.
* ``python -m tests.storage.wal_crash_writer serve`` imports everything once, prints
  ``serving``, then for every ``run WAL_DIR SEED SEGMENT_SIZE`` line on stdin forks a fresh
  writer process and, once that process has died, prints ``exited <wait status>``. The crash
  test kills 60 writers per run; forking them from one warm process saves an interpreter start
  and a full package import for each.

A writer opens (or creates) the WAL, continues after the last entry it finds, prints
``ready <pid>``, and after every ``save`` that returned (entries are fsynced) prints the batch's
last index on its own line. The parent kills it with SIGKILL at arbitrary moments. Entry data is
a pure function of the index (see ``expected_data``) so the parent can check every byte it reads
back.
"""

from __future__ import annotations

import os
import random
import sys
import traceback

from trio_raft.core.messages import Entry, HardState
from trio_raft.storage.wal import WAL, wal_exists


def expected_data(index: int) -> bytes:
    size = (index * 7919) % 1500
    unit = b"%d;" % index
    return (unit * (size // len(unit) + 1))[:size]


def write_forever(wal_dir: str, seed: int, segment_size: int) -> None:
    rng = random.Random(seed)
    if wal_exists(wal_dir):
        wal = WAL.open(wal_dir, segment_size=segment_size)
        contents = wal.read_all()
        last = contents.entries[-1].index if contents.entries else 0
    else:
        wal = WAL.create(wal_dir, b"crash-test", segment_size=segment_size)
        last = 0
    out = sys.stdout
    out.write(f"ready {os.getpid()}\n")
    out.flush()
    while True:
        n = rng.choice((1, 1, 3, 16, 64, 200))
        batch = [Entry(1, i, data=expected_data(i)) for i in range(last + 1, last + n + 1)]
        wal.save(HardState(1, 1, last), batch)
        last += n
        out.write(f"{last}\n")
        out.flush()


def serve() -> None:
    """Fork one writer per ``run`` command; report how each one ended."""
    out = sys.stdout
    out.write("serving\n")
    out.flush()
    for line in sys.stdin:
        cmd, wal_dir, seed, segment_size = line.split()
        if cmd != "run":
            raise SystemExit(f"unknown command {line!r}")
        out.flush()
        pid = os.fork()
        if pid == 0:
            try:
                write_forever(wal_dir, int(seed), int(segment_size))
            except BaseException:
                traceback.print_exc()
                sys.stderr.flush()
            finally:
                os._exit(1)
        _, status = os.waitpid(pid, 0)
        out.write(f"exited {status}\n")
        out.flush()


def main() -> None:
    if sys.argv[1:] == ["serve"]:
        serve()
    else:
        write_forever(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))


if __name__ == "__main__":
    main()
