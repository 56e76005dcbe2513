"""The machine's floor under one proposal's latency: process wake-ups and small fsyncs.

    python bench/machine_floor.py [--dir DIR] [--rounds 4000]

A proposal at 1 in flight crosses processes four times (append out, answer back, each read by
a process asleep in ``epoll_wait``) and waits for a follower's ``write + fdatasync``. What
those cost on this machine, without any Python engine around them, bounds what the engine can
reach (docs/benchmarks.md, "Commit latency and reads"). JSON lines, assertions none:

* ``wake``: a one-byte ping-pong over a socket pair between two processes, each blocking in
  ``recv``: round trip p50/p99 (two wake-ups of a sleeping process). ``spin`` is the same
  with both sides polling the socket instead of sleeping: the difference is the price of
  the wake-ups themselves (on a virtual machine, often a halted virtual CPU woken by the host).
* ``fsync``: a 200-byte append + ``fdatasync`` to a file in ``--dir`` (the disk the data
  directory lives on), p50/p99 of each probing process, in four settings: ``alone``;
  ``three`` (three processes at once, as a leader and two followers do);
  ``two_beside_one_busy`` (two processes that compute 0.2 ms before each append, as a
  follower decodes and steps a message, while a third spins, as a busy leader does: a
  process woken by its disk may have to wait for a CPU);
  ``busy_cpus`` (one process while every CPU also spins).

Linux or any system with ``os.fork``; figures, not assertions.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import socket
import statistics
import tempfile
import time
from collections.abc import Iterator


def loadavg() -> float:
    return round(os.getloadavg()[0], 2)


def emit(record: dict[str, object]) -> None:
    record["loadavg"] = loadavg()
    print(json.dumps(record), flush=True)


def summary(samples: list[float]) -> dict[str, float]:
    """p50 and p99 of ``samples`` (seconds, at least two) in milliseconds."""
    p99 = statistics.quantiles(samples, n=100, method="inclusive")[98]
    return {"p50_ms": round(statistics.median(samples) * 1e3, 4),
            "p99_ms": round(p99 * 1e3, 4)}


def _receive(sock: socket.socket, spin: bool) -> bytes:
    if not spin:
        return sock.recv(16)
    while True:
        try:
            return sock.recv(16, socket.MSG_DONTWAIT)
        except BlockingIOError:
            pass


def wake_round_trips(rounds: int, spin: bool) -> list[float]:
    """Round trips of one byte between this process and a child, both sleeping or spinning."""
    here, there = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the echoing child
        here.close()
        try:
            for _ in range(rounds):
                _receive(there, spin)
                there.send(b"y")
        finally:
            os._exit(0)
    there.close()
    samples = []
    for _ in range(rounds):
        began = time.perf_counter()
        here.send(b"x")
        _receive(here, spin)
        samples.append(time.perf_counter() - began)
    os.waitpid(pid, 0)
    here.close()
    return samples


def fsync_samples(directory: str, rounds: int, work: float = 0.0) -> list[float]:
    """``rounds`` appends of 200 bytes, each followed by ``fdatasync``, to a fresh file; with
    ``work``, each append comes after that many seconds of computing (as a follower decodes
    and steps a message before its write)."""
    fd, path = tempfile.mkstemp(dir=directory, prefix="floor-")
    payload = os.urandom(200)
    samples = []
    try:
        for _ in range(rounds):
            if work:
                until = time.perf_counter() + work
                while time.perf_counter() < until:
                    pass
            began = time.perf_counter()
            os.write(fd, payload)
            os.fdatasync(fd)
            samples.append(time.perf_counter() - began)
    finally:
        os.close(fd)
        os.unlink(path)
    return samples


def in_children(count: int, directory: str, rounds: int, work: float = 0.0
                ) -> list[list[float]]:
    """:func:`fsync_samples` in ``count`` processes at once; every process's samples."""
    readers, pids = [], []
    for _ in range(count):
        reader, writer = os.pipe()
        pid = os.fork()
        if pid == 0:  # a child never returns into the caller (nor its cleanups)
            try:
                os.close(reader)
                data = memoryview(json.dumps(fsync_samples(directory, rounds, work)).encode())
                while data:
                    data = data[os.write(writer, data):]
            finally:
                os._exit(0)
        os.close(writer)
        readers.append(reader)
        pids.append(pid)
    results = []
    for reader in readers:
        chunks = []
        while chunk := os.read(reader, 1 << 20):
            chunks.append(chunk)
        os.close(reader)
        results.append(list(json.loads(b"".join(chunks))))
    for pid in pids:
        os.waitpid(pid, 0)
    return results


@contextlib.contextmanager
def busy_loops(count: int) -> Iterator[None]:
    """``count`` processes spinning on a CPU each, for the duration of the block."""
    busy = []
    for _ in range(count):
        pid = os.fork()
        if pid == 0:
            try:
                while True:
                    pass
            finally:
                os._exit(0)
        busy.append(pid)
    try:
        yield
    finally:
        for pid in busy:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


#: Seconds of computing before each append in ``two_beside_one_busy``.
WORK = 0.0002


def fsync_settings(directory: str, rounds: int) -> Iterator[tuple[str, list[list[float]]]]:
    """(setting, samples of each probing process) for the settings of the module docstring."""
    yield "alone", [fsync_samples(directory, rounds)]
    yield "three", in_children(3, directory, rounds)
    with busy_loops(1):
        yield "two_beside_one_busy", in_children(2, directory, rounds // 2, work=WORK)
    with busy_loops(os.cpu_count() or 1):
        yield "busy_cpus", [fsync_samples(directory, rounds // 2)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=None, help="where the fsync probes write (default: a "
                    "temporary directory)")
    ap.add_argument("--rounds", type=int, default=4000)
    args = ap.parse_args()
    emit({"event": "machine", "python": platform.python_version(), "cpus": os.cpu_count(),
          "platform": platform.platform()})
    for spin in (False, True):
        samples = wake_round_trips(args.rounds, spin)
        emit({"bench": "wake", "mode": "spin" if spin else "sleep", "rounds": args.rounds,
              **summary(samples)})
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        for setting, per_process in fsync_settings(directory, args.rounds):
            emit({"bench": "fsync", "setting": setting, "bytes": 200,
                  "rounds": len(per_process[0]),
                  "per_process": [summary(samples) for samples in per_process]})


if __name__ == "__main__":
    main()
