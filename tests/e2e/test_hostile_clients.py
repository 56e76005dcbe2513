"""Hostile clients against a real kvnode process: its memory stays bounded, they are refused,
and normal clients are served meanwhile.

One kvnode (fsync on) serves the raft transport and the KV service on one port, so the limits
of docs/transport.md (section 3.7) cover both. At the same time:

* grpcio channels each send one genuinely large Put (a 160 MiB value): refused with
  RESOURCE_EXHAUSTED on the message's declared length, before the body is read;
* raw HTTP/2 connections open calls whose message prefix declares 4 GiB - 1 (KV and raft
  routes) or a length within the raft cap, then send the body slowly: refused the same way,
  or, for the ones within the cap, reading them holds the node's receive budget, which then
  refuses the rest;
* grpcio channels keep many calls in flight with oversized values (refused by validation once
  read, or by the budget);
* a normal client puts and reads small values all along, and must never fail.

The node's RSS (``VmRSS`` of /proc/PID/status, sampled every 10 ms) must stay within a bound
that the flags imply, far below what the attack would cost if bodies were buffered. Finally,
connections past ``--max-connections`` are refused with GOAWAY while the open ones still work.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator

import grpc
import pytest
from h2.errors import ErrorCodes

from tests.e2e.h2raw import RawConnection
from tests.e2e.kvprocs import Node, start_node, wait_leader
from trio_raft_kv._proto.trio_raft.kv import v1 as pb

pytestmark = pytest.mark.slow

KV_PUT = "/trio_raft.kv.v1.KV/Put"
KV_GET = "/trio_raft.kv.v1.KV/Get"
RAFT_SEND = "/trio_raft.transport.v1.RaftTransport/Send"
RAFT_STREAM = "/trio_raft.transport.v1.RaftTransport/SendStream"
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
MiB = 1 << 20

#: grpcio shares connections between channels to one address unless told not to.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]
MAX_CONNECTIONS = 40
BUDGET_MIB = 96
FLAGS = ("--max-connections", str(MAX_CONNECTIONS), "--max-streams-per-connection", "64",
         "--receive-buffer-mib", str(BUDGET_MIB), "--connection-window-kib", "1024",
         "--stream-window-kib", "512")
#: What the node may grow by: the receive budget, one connection window per connection, and
#: room for decoded copies, stream state and the allocator (measured: well under this).
RSS_BOUND_MIB = BUDGET_MIB + MAX_CONNECTIONS * 1 + 100
LARGE_PUTS = 3
LARGE_VALUE = 160 * MiB


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


class PeakRSS:
    """Samples a process's RSS in a thread until stopped."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mib(self.pid))
            self._stop.wait(0.01)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture
def node(tmp_path: os.PathLike[str]) -> Iterator[Node]:
    n = start_node(str(tmp_path), "n1", *FLAGS)
    try:
        wait_leader(n.address)
        yield n
    finally:
        n.stop()


def _put(channel: grpc.Channel, key: str, value: bytes, timeout: float = 30) -> str:
    try:
        channel.unary_unary(KV_PUT)(bytes(pb.PutRequest(key=key, value=value)), timeout=timeout)
        return "OK"
    except grpc.RpcError as exc:
        return exc.code().name


class Threads:
    """Run functions in threads; collect their results (or their exceptions)."""

    def __init__(self) -> None:
        self.results: list[object] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def start(self, fn: Callable[[], object]) -> None:
        def run() -> None:
            try:
                out = fn()
            except BaseException as exc:  # reported by the test
                out = exc
            with self._lock:
                self.results.append(out)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        self._threads.append(t)

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
            assert not t.is_alive(), "a client thread did not finish"


def large_put(address: str, request: bytes) -> str:
    options = [("grpc.max_send_message_length", -1)]
    with grpc.insecure_channel(address, options=options) as channel:
        try:
            channel.unary_unary(KV_PUT)(request, timeout=60)
            return "large:OK"
        except grpc.RpcError as exc:
            return "large:" + exc.code().name


def slow_huge(address: str, declared: int, seconds: float) -> tuple[int, list[str]]:
    """16 calls on one connection, each declaring ``declared`` bytes then sending 1 KiB every
    50 ms; the status of each (or "open" if none came)."""
    conn = RawConnection(address)
    try:
        conn.pump(0.1)
        paths = [KV_PUT, RAFT_SEND, RAFT_STREAM, KV_PUT] * 4
        sids = [conn.open_call(p) for p in paths]
        for sid in sids:
            conn.send_prefix(sid, declared)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not conn.closed:
            for sid in sids:
                call = conn.calls[sid]
                if call.status is None and not call.reset:
                    conn.send(sid, b"\x0a" * 1024)
            conn.pump(0.05)
        return declared, [str(conn.calls[s].status) if conn.calls[s].status is not None
                          else "open" for s in sids]
    finally:
        conn.close()


def many_oversized(address: str, calls: int) -> Counter[str]:
    """``calls`` Puts in flight on one channel, each with a 900 KB value (over the KV value
    limit, under the request cap: read, then refused by validation)."""
    value = b"v" * 900_000
    out: Counter[str] = Counter()
    with grpc.insecure_channel(address) as channel:
        put = channel.unary_unary(KV_PUT)
        futures = [put.future(bytes(pb.PutRequest(key=f"m{i}", value=value)), timeout=60)
                   for i in range(calls)]
        for f in futures:
            try:
                f.result()
                out["OK"] += 1
            except grpc.RpcError as exc:
                out[exc.code().name] += 1
    return out


def normal_client(address: str, stop: threading.Event) -> Counter[str]:
    out: Counter[str] = Counter()
    with grpc.insecure_channel(address) as channel:
        get = channel.unary_unary(KV_GET)
        i = 0
        while not stop.is_set() or i < 5:
            out["put:" + _put(channel, f"normal-{i}", b"x" * 100, timeout=20)] += 1
            try:
                raw = get(bytes(pb.GetRequest(key=f"normal-{i}")), timeout=20)
                ok = pb.GetResponse.parse(raw).value == b"x" * 100
                out["get:OK" if ok else "get:WRONG"] += 1
            except grpc.RpcError as exc:
                out["get:" + exc.code().name] += 1
            i += 1
    return out


def test_hostile_clients_are_refused_and_the_node_stays_small(node: Node) -> None:
    pid = int(node.ready["pid"])
    with grpc.insecure_channel(node.address) as warm:  # allocate what normal service needs
        assert [_put(warm, f"w{i}", b"w" * 1000) for i in range(20)] == ["OK"] * 20
    baseline = rss_mib(pid)
    stop = threading.Event()
    normal = Threads()
    attack = Threads()
    with PeakRSS(pid) as rss:
        normal.start(lambda: normal_client(node.address, stop))
        request = bytes(pb.PutRequest(key="large", value=os.urandom(LARGE_VALUE)))
        for _ in range(LARGE_PUTS):
            attack.start(lambda: large_put(node.address, request))
        for declared in (0xFFFF_FFFF, 0xFFFF_FFFF, 48 * MiB, 48 * MiB, 60 * MiB):
            attack.start(lambda d=declared: slow_huge(node.address, d, 4.0))  # type: ignore[misc]
        for _ in range(4):
            attack.start(lambda: many_oversized(node.address, 64))
        attack.join(180)
        stop.set()
        normal.join(60)
    grown = rss.peak - baseline
    results = attack.results
    assert not [r for r in results if isinstance(r, BaseException)], results

    large = [r for r in results if isinstance(r, str)]
    assert large == ["large:RESOURCE_EXHAUSTED"] * LARGE_PUTS
    slow = [r for r in results if isinstance(r, tuple)]
    assert len(slow) == 5
    # Every call that declared more than its route's cap was refused at once; of the ones
    # within the raft routes' cap, the budget let a few be read and refused the rest.
    huge = [st for declared, sts in slow if declared > 64 * MiB for st in sts]
    assert huge == [str(RESOURCE_EXHAUSTED)] * 32, huge
    within = [st for declared, sts in slow if declared <= 64 * MiB for st in sts]
    assert set(within) <= {str(RESOURCE_EXHAUSTED), "open"}, Counter(within)
    assert within.count(str(RESOURCE_EXHAUSTED)) >= 40, Counter(within)
    oversized = sum((r for r in results if isinstance(r, Counter)), Counter())
    assert sum(oversized.values()) == 4 * 64
    assert set(oversized) <= {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}, oversized
    # The normal client was served throughout.
    [served] = normal.results
    assert isinstance(served, Counter), served
    assert set(served) == {"put:OK", "get:OK"}, served
    assert served["put:OK"] >= 5
    print(f"kvnode RSS: baseline {baseline:.0f} MiB, peak {rss.peak:.0f} MiB under attack")
    assert grown < RSS_BOUND_MIB, f"RSS grew by {grown:.0f} MiB (baseline {baseline:.0f})"

    # Past the connection cap: GOAWAY and closed, before any request is read; the open
    # connections keep working.
    keep = grpc.insecure_channel(node.address)
    try:
        assert _put(keep, "before-cap", b"1") == "OK"
        extra = []
        for _ in range(MAX_CONNECTIONS + 4):
            c = RawConnection(node.address)
            c.pump(0.05)
            extra.append(c)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and sum(c.closed for c in extra) < 5:
            for c in extra:
                c.pump(0.01)
        refused = [c for c in extra if c.goaway is not None]
        assert len(refused) >= 5  # the cap counts the normal channel too
        assert {c.goaway for c in refused} == {ErrorCodes.ENHANCE_YOUR_CALM}
        assert all(c.closed for c in refused)
        assert _put(keep, "after-cap", b"2") == "OK"
        with grpc.insecure_channel(node.address, options=OWN_CONNECTION) as late:
            assert _put(late, "late", b"3", timeout=3) in {"UNAVAILABLE", "DEADLINE_EXCEEDED"}
        for c in extra:
            c.close()
        # Closed connections leave the count: a new client is served again.
        deadline = time.monotonic() + 10
        while True:
            with grpc.insecure_channel(node.address, options=OWN_CONNECTION) as again:
                if _put(again, "again", b"4", timeout=3) == "OK":
                    break
            assert time.monotonic() < deadline, "connections were not released"
    finally:
        keep.close()
