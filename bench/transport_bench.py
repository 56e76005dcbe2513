"""Transport throughput between two OS processes; prints JSON lines.

Cases: raft MsgApp messages carrying 1 or 64 entries of 100 bytes, sent

* over GRPCTransport, unary ``Send`` (one call in flight, as priority messages went before
  they had a lane of their own; ``bench/priority_lane_bench.py`` measures that lane) and over
  the ``SendStream`` replication lane;
* over raw trio TCP with 4-byte length prefixes (the same codec frames), request/response and
  streaming: the baseline measured in the same run.

Each case sends for ``--seconds`` and then a marker message; the receiver answers the marker, so
the time covers delivery of everything sent. Usage::

    python bench/transport_bench.py [--seconds 3]
"""

from __future__ import annotations

import argparse
import json
import struct
import subprocess
import sys
import time
from typing import Any

import trio

from trio_raft.core.messages import Entry, Message, MessageType
from trio_raft.transport import GRPCTransport, TransportPeer
from trio_raft.transport.codec import decode_message, encode_message

MARKER = 2**63
_LEN = struct.Struct(">I")


def make_app(n_entries: int, index: int = 1) -> Message:
    return Message(MessageType.APP, to=2, from_=1, term=1, log_term=1, index=index, commit=index,
                   entries=tuple(Entry(1, index + i, data=b"e" * 100) for i in range(n_entries)))


# -- receiver (child process) ---------------------------------------------------------------------


async def serve_grpc(client_address: str) -> None:
    t = GRPCTransport([TransportPeer(1, "client", client_address)])

    async def handler(m: Message) -> None:
        if m.index == MARKER:
            await t.send(Message(MessageType.HEARTBEAT_RESP, to=1, from_=2))

    t.attach(handler, None)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(t.serve, "127.0.0.1", 0)
        print(port, flush=True)
        await trio.to_thread.run_sync(sys.stdin.read)  # until the parent closes our stdin
        await t.aclose()


async def serve_raw() -> None:
    async def conn(stream: trio.SocketStream) -> None:
        buf = bytearray()
        while True:
            data = await stream.receive_some(1 << 16)
            if not data:
                return
            buf += data
            while len(buf) >= 4:
                (n,) = _LEN.unpack_from(buf)
                if len(buf) < 4 + n:
                    break
                frame = bytes(buf[4:4 + n])
                del buf[:4 + n]
                m = decode_message(frame)
                if m.context == b"ack" or m.index == MARKER:
                    await stream.send_all(b"k")

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    print(listeners[0].socket.getsockname()[1], flush=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, conn, listeners)
        await trio.to_thread.run_sync(sys.stdin.read)
        nursery.cancel_scope.cancel()


# -- sender (parent process) ----------------------------------------------------------------------


def spawn(kind: str, extra: str = "") -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen([sys.executable, __file__, "--serve", kind, "--client", extra],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


def report(case: str, lane: str, n_entries: int, count: int, frame_bytes: int,
           elapsed: float) -> dict[str, Any]:
    out = {"case": case, "lane": lane, "entries_per_msg": n_entries, "messages": count,
           "seconds": round(elapsed, 3), "msgs_per_s": round(count / elapsed, 1),
           "entries_per_s": round(count * n_entries / elapsed, 1),
           "MB_per_s": round(count * frame_bytes / elapsed / 1e6, 2)}
    print(json.dumps(out), flush=True)
    return out


async def bench_grpc(seconds: float) -> list[dict[str, Any]]:
    results = []
    got_reply = trio.Event()

    async def on_reply(_m: Message) -> None:
        got_reply.set()

    for lane in ("unary", "stream"):
        client = GRPCTransport(send_stream=(lane == "stream"))
        client.attach(on_reply, None)
        async with trio.open_nursery() as nursery:
            port = await nursery.start(client.serve, "127.0.0.1", 0)
            proc, server_port = spawn("grpc", f"127.0.0.1:{port}")
            try:
                client.upsert_peer(TransportPeer(2, "server", f"127.0.0.1:{server_port}"))
                for n_entries in (1, 64):
                    msg = make_app(n_entries)
                    frame_bytes = len(encode_message(msg))
                    for phase in ("warmup", "measure"):
                        got_reply = trio.Event()
                        count = 0
                        t0 = time.perf_counter()
                        end = t0 + (0.5 if phase == "warmup" else seconds)
                        while time.perf_counter() < end:
                            for _ in range(50):
                                await client.send(msg)
                            count += 50
                        await client.send(make_app(0, index=MARKER))
                        with trio.fail_after(60):
                            await got_reply.wait()
                        elapsed = time.perf_counter() - t0
                    results.append(report("grpc", lane, n_entries, count, frame_bytes, elapsed))
            finally:
                await client.aclose()
                assert proc.stdin is not None
                proc.stdin.close()
                proc.wait(10)
    return results


async def bench_raw(seconds: float) -> list[dict[str, Any]]:
    results = []
    proc, port = spawn("raw")
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            for lane in ("unary", "stream"):
                for n_entries in (1, 64):
                    msg = make_app(n_entries)
                    if lane == "unary":
                        msg = Message(msg.type, to=2, from_=1, entries=msg.entries,
                                      context=b"ack")
                    frame = encode_message(msg)
                    wire = _LEN.pack(len(frame)) + frame
                    marker = encode_message(make_app(0, index=MARKER))
                    for phase in ("warmup", "measure"):
                        count = 0
                        t0 = time.perf_counter()
                        end = t0 + (0.5 if phase == "warmup" else seconds)
                        while time.perf_counter() < end:
                            for _ in range(50):
                                # Encode per message, as a sender of fresh messages would.
                                wire = _LEN.pack(len(frame)) + encode_message(msg)
                                await stream.send_all(wire)
                                if lane == "unary":
                                    await stream.receive_some(1)
                            count += 50
                        await stream.send_all(_LEN.pack(len(marker)) + marker)
                        await stream.receive_some(1)
                        elapsed = time.perf_counter() - t0
                    results.append(report("raw_trio_tcp", lane, n_entries, count, len(frame),
                                          elapsed))
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(10)
    return results


async def main(seconds: float) -> None:
    raw = await bench_raw(seconds)
    grpc = await bench_grpc(seconds)
    for g in grpc:
        base = next(r for r in raw if r["lane"] == g["lane"]
                    and r["entries_per_msg"] == g["entries_per_msg"])
        print(json.dumps({"summary": f"grpc/{g['lane']}/{g['entries_per_msg']}",
                          "entries_per_s_vs_raw": round(base["entries_per_s"]
                                                        / g["entries_per_s"], 2)}), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--serve", choices=["grpc", "raw"])
    parser.add_argument("--client", default="")
    args = parser.parse_args()
    if args.serve == "grpc":
        trio.run(serve_grpc, args.client)
    elif args.serve == "raw":
        trio.run(serve_raw)
    else:
        trio.run(main, args.seconds)
