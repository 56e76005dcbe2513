"""Restart time of one kvnode holding 10K, 100K and 1M keys (100-byte values), memory store
and SQLite store: seconds from starting the process to serving a linearizable read, and the
node's peak RSS.

For each store and size: a backup file with the keys is written (``trio_raft.storage.backup``)
and restored into an empty data dir (``restore_backup``, what ``kvnode snapshot restore``
does); the node is started once (it builds its store from the snapshot), takes a few more
writes so the log holds entries after the snapshot, and is stopped with SIGTERM. Then it is
started again, and the restart is timed: process start until a ``Get`` with the LINEARIZABLE
read mode succeeds (interpreter start-up included). The memory store restores the snapshot at
every start; the SQLite store skips it when its database holds it (the cold-start skip) and
says so in its log, which the output reports. Peak RSS is the process's ``VmHWM`` once it
served the read. Prints JSON lines; asserts nothing.

    python bench/restart_bench.py [--sizes 10000,100000,1000000] [--stores memory,sqlite]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from trio_raft import derive_node_id
from trio_raft.storage.backup import BackupInfo, write_backup
from trio_raft.storage.peers import PersistedPeer
from trio_raft.storage.restore import restore_backup
from trio_raft.testing.net import free_loopback_ports
from trio_raft_kv._proto.trio_raft.kv import v1 as pb
from trio_raft_kv.client import KVClient, KVError
from trio_raft_kv.statemachine import KVSnapshot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KVNODE = os.path.join(ROOT, "examples", "kvnode.py")
VALUE_BYTES = 100
TIMING = ["--tick-interval", "0.01", "--heartbeat-tick", "1", "--election-tick", "10"]


def make_backup(path: str, keys: int) -> int:
    data = {b"key%08d" % i: (b"%08d" % i) * (VALUE_BYTES // 8) + b"x" * (VALUE_BYTES % 8)
            for i in range(keys)}
    info = write_backup(path, BackupInfo(index=1, term=1), KVSnapshot(data, set()))
    return info.file_bytes


async def _read_until_served(address: str, deadline: float) -> None:
    client = KVClient(address, timeout=2.0)
    try:
        while True:
            try:
                await client.get("key00000000", pb.ReadMode.LINEARIZABLE)
                return
            except KVError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.005)
    finally:
        client.close()


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def serve(data_dir: str, address: str, store: str, log_path: str
          ) -> tuple[subprocess.Popen[bytes], float]:
    t0 = time.monotonic()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, KVNODE, "serve", "--id", "n1", "--listen", address, "--peers",
             f"n1={address}", "--data-dir", data_dir, "--store", store, "--log-level", "info",
             *TIMING], stdout=subprocess.DEVNULL, stderr=log, stdin=subprocess.DEVNULL,
            cwd=ROOT)
    return proc, t0


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_one(root: str, backup: str, store: str, keys: int, backup_bytes: int) -> dict[str, Any]:
    data_dir = os.path.join(root, f"{store}-{keys}")
    log_path = data_dir + ".log"
    (port,) = free_loopback_ports(1)
    address = f"127.0.0.1:{port}"
    restore_backup(backup, data_dir, [PersistedPeer(derive_node_id("n1"), "n1", address)])
    proc, t0 = serve(data_dir, address, store, log_path)
    asyncio.run(_read_until_served(address, time.monotonic() + 600))
    first = time.monotonic() - t0

    async def writes() -> None:
        async with KVClient(address) as c:
            for i in range(200):
                await c.put(f"extra{i}", b"y" * VALUE_BYTES)

    asyncio.run(writes())
    stop(proc)
    proc, t0 = serve(data_dir, address, store, log_path)
    asyncio.run(_read_until_served(address, time.monotonic() + 600))
    restart = time.monotonic() - t0
    rss = peak_rss_mb(proc.pid)
    stop(proc)
    with open(log_path, errors="replace") as f:
        opened = [line for line in f if "opened " in line]
    skipped = bool(opened) and "skipped (the state machine" in opened[-1]
    shutil.rmtree(data_dir, ignore_errors=True)
    return {"bench": "restart", "store": store, "keys": keys, "value_bytes": VALUE_BYTES,
            "backup_bytes": backup_bytes, "first_start_s": round(first, 3),
            "restart_s": round(restart, 3), "peak_rss_mb": round(rss, 1),
            "snapshot_skipped": skipped}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--stores", default="memory,sqlite")
    ap.add_argument("--dir", default=None, help="work directory (default: a temporary one)")
    args = ap.parse_args()
    root = args.dir or tempfile.mkdtemp(prefix="restart-bench-")
    os.makedirs(root, exist_ok=True)
    results: dict[tuple[str, int], float] = {}
    try:
        for keys in [int(s) for s in args.sizes.split(",")]:
            backup = os.path.join(root, f"backup-{keys}.bak")
            size = make_backup(backup, keys)
            for store in args.stores.split(","):
                out = run_one(root, backup, store, keys, size)
                results[(store, keys)] = out["restart_s"]
                print(json.dumps(out), flush=True)
            os.unlink(backup)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    sizes = sorted({k for _, k in results})
    for store in args.stores.split(","):
        if (store, sizes[0]) in results and (store, sizes[-1]) in results and len(sizes) > 1:
            ratio = results[(store, sizes[-1])] / results[(store, sizes[0])]
            print(json.dumps({"bench": "restart-ratio", "store": store, "small": sizes[0],
                              "large": sizes[-1], "ratio": round(ratio, 2)}), flush=True)


if __name__ == "__main__":
    main()
