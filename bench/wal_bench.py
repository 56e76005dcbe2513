"""WAL throughput benchmark: prints JSON lines, asserts nothing.

* ``fsync``: how many ``write(4 KiB) + fdatasync`` rounds per second the disk sustains.
* ``wal_save``: entries/s and MB/s of ``WAL.save`` with 100-byte and 4 KiB entries in batches of
  1, 64 and 1024 (one write and one fsync per batch), next to ``batch x fsync rate``, the ceiling
  group commit could reach if it were never CPU-bound.

Usage: ``python bench/wal_bench.py [--dir DIR] [--seconds-per-case 3.5]`` (about 30 s in total).
Run it on the disk the data dir will live on: ``--dir`` picks where the temporary WAL goes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

from trio_raft.core.messages import Entry, HardState
from trio_raft.storage.fileutil import datasync
from trio_raft.storage.wal import WAL


def fsync_rate(directory: str, seconds: float) -> float:
    path = os.path.join(directory, "fsync-probe")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    block = os.urandom(4096)
    n = 0
    start = time.perf_counter()
    try:
        while time.perf_counter() - start < seconds:
            os.write(fd, block)
            datasync(fd)
            n += 1
    finally:
        os.close(fd)
        os.unlink(path)
    return n / (time.perf_counter() - start)


def save_rate(directory: str, entry_bytes: int, batch: int, seconds: float) -> dict[str, float]:
    wal_dir = tempfile.mkdtemp(prefix="wal-", dir=directory)
    shutil.rmtree(wal_dir)
    payload = os.urandom(entry_bytes)
    index = 0
    batches = 0
    with WAL.create(wal_dir) as wal:
        start = time.perf_counter()
        while True:
            ents = [Entry(1, index + i + 1, data=payload) for i in range(batch)]
            index += batch
            wal.save(HardState(1, 1, index - batch), ents)
            batches += 1
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
        segments = len(wal.segments)
    shutil.rmtree(wal_dir)
    return {
        "entries_per_s": index / elapsed,
        "mb_per_s": index * entry_bytes / elapsed / 1e6,
        "batches_per_s": batches / elapsed,
        "seconds": elapsed,
        "entries": index,
        "segments": segments,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=None, help="directory for the temporary WAL")
    ap.add_argument("--seconds-per-case", type=float, default=3.5)
    args = ap.parse_args()
    base = tempfile.mkdtemp(prefix="trio-raft-wal-bench-", dir=args.dir)
    try:
        rate = fsync_rate(base, min(3.0, args.seconds_per_case))
        print(json.dumps({"bench": "fsync", "fsyncs_per_s": round(rate, 1),
                          "dir": base}), flush=True)
        for entry_bytes in (100, 4096):
            for batch in (1, 64, 1024):
                r = save_rate(base, entry_bytes, batch, args.seconds_per_case)
                print(json.dumps({
                    "bench": "wal_save",
                    "entry_bytes": entry_bytes,
                    "batch": batch,
                    "entries_per_s": round(r["entries_per_s"], 1),
                    "mb_per_s": round(r["mb_per_s"], 2),
                    "fsyncs_per_s": round(r["batches_per_s"], 1),
                    "batch_x_fsync_rate": round(batch * rate, 1),
                    "entries": r["entries"],
                    "segments": r["segments"],
                    "seconds": round(r["seconds"], 2),
                }), flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
