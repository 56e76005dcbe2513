"""Heartbeats while a snapshot streams to the same peer: the priority lane against unary calls.

Two OS processes on loopback. The receiver (a child process) runs a GRPCTransport with a real
SnapshotExchange (payloads spooled to its temp dir, fsynced, renamed) and answers every
``MsgHeartbeat`` with a ``MsgHeartbeatResp`` through its own transport. The sender (this
process) measures, for each lane:

* ``idle``: heartbeat round trips, one in flight, nothing else on the wire;
* ``during_snapshot``: the same while ``--snapshots`` snapshots of ``--snapshot-mb`` MB (64)
  stream to the same peer one after the other (a 1.5 ms pause between two heartbeats);
* ``rate``: heartbeats sent back to back for ``--seconds``, then one answered marker: priority
  messages per second.

Lanes: ``stream`` is the priority lane (``PriorityStream`` on a connection of its own);
``unary`` sends each priority message as a unary ``Send`` on the peer's main connection, as
before the lane existed (``GRPCTransport(priority_stream=False)``). On a tree without the
priority lane (put one first on ``PYTHONPATH``), only ``unary`` runs. Prints JSON lines, then a
table. Usage::

    python bench/priority_lane_bench.py [--snapshot-mb 64] [--snapshots 3] [--seconds 3]
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from typing import Any

import crc32c
import trio

from trio_raft.core.messages import ConfState, Message, MessageType, Snapshot, SnapshotMetadata
from trio_raft.storage import fsm_snapshot as fsm
from trio_raft.storage.snapshot_exchange import SnapshotExchange
from trio_raft.transport import GRPCTransport, TransportPeer

SENDER, RECEIVER = 1, 2
MARKER = 1 << 62
HAS_LANE = "priority_stream" in inspect.signature(GRPCTransport).parameters


CHUNK_BYTES: dict[str, int] = {}  # --chunk-kib, when given


def transport(lane: str, peers: list[TransportPeer]) -> GRPCTransport:
    if HAS_LANE:
        return GRPCTransport(peers, priority_stream=(lane == "stream"), **CHUNK_BYTES)
    return GRPCTransport(peers, **CHUNK_BYTES)


def heartbeat(to: int, seq: int, from_: int) -> Message:
    kind = MessageType.HEARTBEAT if to == RECEIVER else MessageType.HEARTBEAT_RESP
    return Message(kind, to=to, from_=from_, term=1, commit=seq)


# -- receiver (child process) ---------------------------------------------------------------------

async def receiver(lane: str, sender_address: str, directory: str) -> None:
    t = transport(lane, [TransportPeer(SENDER, "sender", sender_address)])
    exchange = SnapshotExchange(directory, lambda: 0)
    snapshots = 0

    async def handle(m: Message) -> None:
        nonlocal snapshots
        if m.type is MessageType.HEARTBEAT and m.commit != MARKER - 1:
            await t.send(heartbeat(SENDER, m.commit, RECEIVER))
        elif m.type is MessageType.SNAP:
            snapshots += 1

    t.attach(handle, exchange)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(t.serve, "127.0.0.1", 0)
        print(port, flush=True)
        await trio.to_thread.run_sync(sys.stdin.read)  # until the parent closes our stdin
        await t.aclose()


# -- sender (this process) ------------------------------------------------------------------------

def spawn(lane: str, sender_address: str, directory: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--receive", lane, "--sender",
         sender_address, "--dir", directory,
         *(["--chunk-kib", str(CHUNK_BYTES["snapshot_chunk_bytes"] >> 10)]
           if CHUNK_BYTES else [])],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


def write_payload(directory: str, index: int, size: int) -> bytes:
    payload = os.urandom(1 << 20) * (size >> 20)
    crc = crc32c.crc32c(payload)
    with open(fsm.fsm_snapshot_path(directory, index), "wb") as f:
        f.write(payload + struct.pack(">I", crc))
    return fsm.encode_snapshot_token(index, crc)


def percentiles(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    if not s:
        return {"p50_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0}

    def pct(q: float) -> float:
        return round(s[min(len(s) - 1, round(q * (len(s) - 1)))] * 1000, 2)

    return {"p50_ms": pct(0.5), "p99_ms": pct(0.99), "max_ms": round(s[-1] * 1000, 2)}


class Pinger:
    """Heartbeats with sequence numbers; the receiver's answers are matched to them."""

    def __init__(self, t: GRPCTransport) -> None:
        self.t = t
        self.seq = 0
        self.waiting: dict[int, tuple[float, trio.Event]] = {}
        self.rtts: list[float] = []

    async def on_message(self, m: Message) -> None:
        if m.type is MessageType.HEARTBEAT_RESP and m.commit in self.waiting:
            t0, done = self.waiting.pop(m.commit)
            self.rtts.append(time.perf_counter() - t0)
            done.set()

    async def ping(self) -> None:
        self.seq += 1
        done = trio.Event()
        self.waiting[self.seq] = (time.perf_counter(), done)
        await self.t.send(heartbeat(RECEIVER, self.seq, SENDER))
        with trio.fail_after(30):
            await done.wait()


async def run_lane(lane: str, args: argparse.Namespace, base: str) -> list[dict[str, Any]]:
    src = os.path.join(base, f"{lane}-src")
    dst = os.path.join(base, f"{lane}-dst")
    os.makedirs(src)
    os.makedirs(dst)
    size = args.snapshot_mb << 20
    tokens = [write_payload(src, 40 + i, size) for i in range(args.snapshots)]
    t = transport(lane, [])
    pinger = Pinger(t)
    t.attach(pinger.on_message, SnapshotExchange(src, lambda: 0))
    rows = []
    async with trio.open_nursery() as nursery:
        port = await nursery.start(t.serve, "127.0.0.1", 0)
        proc, peer_port = spawn(lane, f"127.0.0.1:{port}", dst)
        try:
            t.upsert_peer(TransportPeer(RECEIVER, "receiver", f"127.0.0.1:{peer_port}"))
            for _ in range(50):  # warm-up: connections and streams open
                await pinger.ping()
            pinger.rtts.clear()
            for _ in range(args.pings):
                await pinger.ping()
            rows.append({"phase": "idle", "heartbeats": len(pinger.rtts),
                         **percentiles(pinger.rtts)})
            pinger.rtts.clear()

            snapshot_seconds: list[float] = []
            done = trio.Event()

            async def stream_snapshots() -> None:
                for i, token in enumerate(tokens):
                    t0 = time.perf_counter()
                    await t.send_snapshot(Message(
                        MessageType.SNAP, to=RECEIVER, from_=SENDER, term=1,
                        snapshot=Snapshot(SnapshotMetadata(ConfState([1, 2]), 40 + i, 1),
                                          token)))
                    snapshot_seconds.append(time.perf_counter() - t0)
                done.set()

            nursery.start_soon(stream_snapshots)
            while not done.is_set():
                await pinger.ping()
                await trio.sleep(0.0015)
            rows.append({"phase": "during_snapshot", "heartbeats": len(pinger.rtts),
                         "snapshot_mb": args.snapshot_mb, "snapshots": args.snapshots,
                         "snapshot_s": [round(x, 2) for x in snapshot_seconds],
                         **percentiles(pinger.rtts)})
            pinger.rtts.clear()

            sent = 0
            t0 = time.perf_counter()
            end = t0 + args.seconds
            while time.perf_counter() < end:
                for _ in range(50):
                    await t.send(heartbeat(RECEIVER, MARKER - 1, SENDER))  # not answered
                sent += 50
            await pinger.ping()  # answered after everything sent before it on the lane
            elapsed = time.perf_counter() - t0
            rows.append({"phase": "rate", "priority_msgs": sent,
                         "seconds": round(elapsed, 2),
                         "msgs_per_s": round(sent / elapsed, 1)})
        finally:
            await t.aclose()
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait(30)
    code = "trio_raft at " + os.path.dirname(os.path.dirname(
        sys.modules["trio_raft"].__file__ or ""))
    out = []
    for row in rows:
        full = {"bench": "priority_lane", "lane": lane, "code": code, **row}
        print(json.dumps(full), flush=True)
        out.append(full)
    return out


def table(rows: list[dict[str, Any]]) -> str:
    by = {(r["lane"], r["phase"]): r for r in rows}
    lines = ["| lane | idle p50 / p99 ms | during snapshot p50 / p99 / max ms | heartbeats "
             "during | priority msgs/s |", "|---|---:|---:|---:|---:|"]
    for lane in ("unary", "stream"):
        idle, during, rate = (by.get((lane, p)) for p in ("idle", "during_snapshot", "rate"))
        if idle is None or during is None or rate is None:
            continue
        lines.append(f"| {lane} | {idle['p50_ms']} / {idle['p99_ms']} | "
                     f"{during['p50_ms']} / {during['p99_ms']} / {during['max_ms']} | "
                     f"{during['heartbeats']} | {rate['msgs_per_s']:.0f} |")
    return "\n".join(lines)


async def main(args: argparse.Namespace) -> None:
    base = tempfile.mkdtemp(prefix="priority-lane-")
    try:
        rows = []
        for lane in (("unary", "stream") if HAS_LANE else ("unary",)):
            rows += await run_lane(lane, args, base)
        print()
        print(table(rows), flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snapshot-mb", type=int, default=64)
    parser.add_argument("--snapshots", type=int, default=3)
    parser.add_argument("--pings", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--chunk-kib", type=int, default=0,
                        help="the transports' snapshot_chunk_bytes in KiB (default: theirs)")
    parser.add_argument("--receive", choices=["unary", "stream"])
    parser.add_argument("--sender", default="")
    parser.add_argument("--dir", default="")
    args = parser.parse_args()
    if args.chunk_kib:
        CHUNK_BYTES["snapshot_chunk_bytes"] = args.chunk_kib << 10
    if args.receive:
        trio.run(receiver, args.receive, args.sender, args.dir)
    else:
        trio.run(main, args)
