"""Catch-up of an empty learner from a ~100 MB state machine over the gRPC transport.

Three OS processes: this one orchestrates; a leader (single voter, bootstrapped) fills its state
machine with ``--mb`` MB of incompressible values and takes a snapshot; then a second node starts
with an empty data directory (no bootstrap) and the leader adds it with ``add_learner``. Measured:
seconds from ``add_learner`` until the learner has applied the snapshot index, broken into

* ``to_landed_s``: until the payload is on the learner's disk (the transport's "landed" log
  record, where the code under test logs one);
* ``to_restore_start_s`` / ``restore_s``: when the learner's state machine starts and finishes
  ``restore`` (timed inside the state machine);
* ``leader_send_done_s``: when the leader's transport counts the snapshot as sent (acknowledged);

and the peak RSS of the leader and the learner. Only the public API is used (``open_engine``,
``OpenConfig``, ``Peer``, ``add_learner``, ``applied_index``, ``status``, the ``GRPCTransport``
constructor), so the script runs unchanged against older trees: put one first on ``PYTHONPATH``.
The output names the ``trio_raft`` package that ran. Prints JSON lines; asserts nothing.

    python bench/snapshot_bench.py [--mb 100] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import IO, Any

import trio

import trio_raft
from trio_raft import OpenConfig, Peer, open_engine
from trio_raft.transport.grpc import GRPCTransport

VALUE_BYTES = 1_000_000
_LEN = struct.Struct(">I")


# -- the state machine ------------------------------------------------------------------------


class _Handle:
    def __init__(self, items: list[tuple[bytes, bytes]]) -> None:
        self._items = items

    def write_to(self, writer: IO[bytes]) -> int:
        n = 0
        for key, value in self._items:
            writer.write(_LEN.pack(len(key)) + key + _LEN.pack(len(value)))
            writer.write(value)
            n += 8 + len(key) + len(value)
        return n

    def close(self) -> None:
        self._items = []


class BlobFSM:
    """key -> value; a command is ``u32 key length | key | value``."""

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}
        self.restore_started: float | None = None
        self.restore_done: float | None = None

    def apply(self, command: bytes) -> int:
        (klen,) = _LEN.unpack_from(command)
        self.data[command[4:4 + klen]] = command[4 + klen:]
        return len(self.data)

    def snapshot(self) -> _Handle:
        return _Handle(list(self.data.items()))

    def restore(self, reader: IO[bytes]) -> None:
        self.restore_started = time.monotonic()
        data: dict[bytes, bytes] = {}
        while header := reader.read(4):
            (klen,) = _LEN.unpack(header)
            key = reader.read(klen)
            (vlen,) = _LEN.unpack(reader.read(4))
            data[key] = reader.read(vlen)
        self.data = data
        self.restore_done = time.monotonic()


def command(key: bytes, value: bytes) -> bytes:
    return _LEN.pack(len(key)) + key + value


# -- the node processes -----------------------------------------------------------------------


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


async def read_line() -> str:
    return (await trio.to_thread.run_sync(sys.stdin.readline)).strip()


async def wait_until(predicate: Any, poll: float = 0.005) -> float:
    while not predicate():
        await trio.sleep(poll)
    return time.monotonic()


async def leader(args: argparse.Namespace) -> None:
    address = f"127.0.0.1:{args.port}"
    fsm = BlobFSM()
    transport = GRPCTransport(local_address=address)
    cfg = OpenConfig(local_id="n1", local_address=address, data_dir=args.dir,
                     peers=[Peer(id="n1", address=address)], bootstrap=True, state_machine=fsm,
                     transport=transport, snapshot_every=args.entries,
                     snapshot_catchup_entries=1)
    async with trio.open_nursery() as nursery:
        await nursery.start(transport.serve)
        async with open_engine(cfg) as engine:
            await wait_until(lambda: engine.state().value == "leader")
            last = 0
            for i in range(args.entries):
                last = (await engine.propose(command(b"k%d" % i, os.urandom(VALUE_BYTES)))
                        ).commit_index
            i = args.entries
            while engine.status().last_snapshot_index < last:  # small entries until a
                await engine.propose(command(b"tick", b"%d" % i))  # snapshot covers the fill
                i += 1
            emit(role="leader", ready=True, snapshot_index=engine.status().last_snapshot_index,
                 fsm_bytes=sum(len(v) for v in fsm.data.values()))
            learner_address = await read_line()
            t_add = time.monotonic()
            await engine.add_learner("n2", learner_address, 0)
            t_added = time.monotonic()
            t_sent = await wait_until(
                lambda: transport.stats().get("snapshots_dispatched", 0) >= 1)
            emit(role="leader", t_add=t_add, t_added=t_added, t_sent=t_sent)
            await read_line()  # "stop"
            emit(role="leader", peak_rss_mb=peak_rss_mb())
        await transport.aclose()


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seen: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "snapshot" in record.getMessage():
            self.seen.append((time.monotonic(), record.getMessage()))


async def learner(args: argparse.Namespace) -> None:
    records = _Records()
    root = logging.getLogger("trio_raft")
    root.addHandler(records)
    root.setLevel(logging.DEBUG)
    address = f"127.0.0.1:{args.port}"
    fsm = BlobFSM()
    cfg = OpenConfig(local_id="n2", local_address=address, data_dir=args.dir,
                     peers=[Peer(id="n1", address=args.leader), Peer(id="n2", address=address)],
                     bootstrap=False, state_machine=fsm, join_as_learner=True)
    async with open_engine(cfg) as engine:
        emit(role="learner", ready=True)
        target = int(await read_line())
        t_applied = await wait_until(lambda: engine.applied_index() >= target)
        landed = [t for t, msg in records.seen if "landed" in msg]
        emit(role="learner", t_applied=t_applied, t_landed=landed[0] if landed else None,
             t_restore_start=fsm.restore_started, t_restore_done=fsm.restore_done,
             fsm_bytes=sum(len(v) for v in fsm.data.values()))
        await read_line()  # "stop"
        emit(role="learner", peak_rss_mb=peak_rss_mb())


# -- the orchestrator -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Node:
    def __init__(self, *argv: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), *argv], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True)

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"node exited with {self.proc.wait()}")
        out: dict[str, Any] = json.loads(line)
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def since(t0: float, t: float | None) -> float | None:
    return None if t is None else round(t - t0, 3)


def run_once(mb: int, run: int) -> dict[str, Any]:
    base = tempfile.mkdtemp(prefix="trio-raft-snapbench-")
    nodes: list[Node] = []
    try:
        p1, p2 = free_port(), free_port()
        entries = max(1, mb * 1_000_000 // VALUE_BYTES)
        lead = Node("--role", "leader", "--dir", os.path.join(base, "n1"), "--port", str(p1),
                    "--entries", str(entries))
        nodes.append(lead)
        ready = lead.read()
        learn = Node("--role", "learner", "--dir", os.path.join(base, "n2"), "--port", str(p2),
                     "--leader", f"127.0.0.1:{p1}")
        nodes.append(learn)
        learn.read()
        learn.send(str(ready["snapshot_index"]))
        lead.send(f"127.0.0.1:{p2}")
        sent = lead.read()
        got = learn.read()
        lead.send("stop")
        learn.send("stop")
        rss_leader = lead.read()["peak_rss_mb"]
        rss_learner = learn.read()["peak_rss_mb"]
        t0 = sent["t_add"]
        restore = (None if got["t_restore_start"] is None
                   else round(got["t_restore_done"] - got["t_restore_start"], 3))
        return {
            "case": "snapshot_catchup", "run": run, "trio_raft": trio_raft.__file__,
            "fsm_mb": round(ready["fsm_bytes"] / 1e6, 1),
            "snapshot_index": ready["snapshot_index"],
            "catchup_s": since(t0, got["t_applied"]),
            "add_learner_s": since(t0, sent["t_added"]),
            "to_landed_s": since(t0, got["t_landed"]),
            "to_restore_start_s": since(t0, got["t_restore_start"]),
            "restore_s": restore,
            "leader_send_done_s": since(t0, sent["t_sent"]),
            "learner_fsm_mb": round(got["fsm_bytes"] / 1e6, 1),
            "leader_peak_rss_mb": rss_leader, "learner_peak_rss_mb": rss_learner,
        }
    finally:
        for node in nodes:
            node.stop()
        shutil.rmtree(base, ignore_errors=True)


def summary(rows: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    keys = ["catchup_s", "to_landed_s", "to_restore_start_s", "restore_s",
            "leader_peak_rss_mb", "learner_peak_rss_mb"]
    out: dict[str, Any] = {"summary": "snapshot_catchup", "runs": len(rows),
                           "trio_raft": trio_raft.__file__}
    for key in keys:
        values = sorted(r[key] for r in rows if r.get(key) is not None)
        out[f"{key}_median"] = values[len(values) // 2] if values else None
    yield out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--role", choices=["leader", "learner"])
    parser.add_argument("--dir")
    parser.add_argument("--port", type=int)
    parser.add_argument("--entries", type=int, default=100)
    parser.add_argument("--leader")
    args = parser.parse_args()
    if args.role == "leader":
        trio.run(leader, args)
        return
    if args.role == "learner":
        trio.run(learner, args)
        return
    rows = []
    for run in range(args.runs):
        row = run_once(args.mb, run)
        rows.append(row)
        print(json.dumps(row), flush=True)
    for line in summary(rows):
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
