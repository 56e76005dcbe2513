"""Crash-test child: append fsynced batches to a WAL forever, acknowledging each on stdout.

Usage: python wal_crash_writer.py WAL_DIR SEED SEGMENT_SIZE

It opens (or creates) the WAL, continues after the last entry it finds, and after every
``save`` that returned (entries are fsynced) prints the batch's last index on its own line. The
parent kills it with SIGKILL at arbitrary moments. Entry data is a pure function of the index
(see ``expected_data``) so the parent can check every byte it reads back.
"""

from __future__ import annotations

import os
import random
import sys
import types

# Runnable as a plain script from the repository checkout. The package __init__ files import the
# whole engine; this child needs only the WAL, and it is started 60 times per test run, so the
# two packages are registered as bare namespace modules (their __init__ is not executed).
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, _ROOT)
if __name__ == "__main__":
    for _name, _sub in (("trio_raft", "trio_raft"), ("trio_raft.storage", "trio_raft/storage")):
        _pkg = types.ModuleType(_name)
        _pkg.__path__ = [os.path.join(_ROOT, _sub)]
        sys.modules[_name] = _pkg

from trio_raft.core.messages import Entry, HardState  # noqa: E402
from trio_raft.storage.wal import WAL, wal_exists  # noqa: E402


def expected_data(index: int) -> bytes:
    size = (index * 7919) % 1500
    unit = b"%d;" % index
    return (unit * (size // len(unit) + 1))[:size]


def main() -> None:
    wal_dir, seed, segment_size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(seed)
    if wal_exists(wal_dir):
        wal = WAL.open(wal_dir, segment_size=segment_size)
        contents = wal.read_all()
        last = contents.entries[-1].index if contents.entries else 0
    else:
        wal = WAL.create(wal_dir, b"crash-test", segment_size=segment_size)
        last = 0
    out = sys.stdout
    out.write("ready\n")
    out.flush()
    while True:
        n = rng.choice((1, 1, 3, 16, 64, 200))
        batch = [Entry(1, i, data=expected_data(i)) for i in range(last + 1, last + n + 1)]
        wal.save(HardState(1, 1, last), batch)
        last += n
        out.write(f"{last}\n")
        out.flush()


if __name__ == "__main__":
    main()
