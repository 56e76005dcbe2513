"""The machine's floor under one proposal's latency: process wake-ups and small fsyncs.

    python bench/machine_floor.py [--dir DIR] [--rounds 4000]

A proposal at 1 in flight crosses processes four times (append out, answer back, each read by
a process asleep in ``epoll_wait``) and waits for a follower's ``write + fdatasync``. What
those cost on this machine, without any Python engine around them, bounds what the engine can
reach (docs/benchmarks.md, "The floor under 1 in flight"). JSON lines, assertions none:

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

Figures, not assertions (``fdatasync``: Linux and most Unix systems).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import socket
import statistics
import tempfile
import time
from collections.abc import Iterator
from typing import Any

#: Child processes start fresh (no fork of a process that may run threads).
SPAWN = multiprocessing.get_context("spawn")


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


def _echo(sock: socket.socket, rounds: int, spin: bool) -> None:
    """The other end of :func:`wake_round_trips` (a child process)."""
    for _ in range(rounds):
        _receive(sock, spin)
        sock.send(b"y")


def wake_round_trips(rounds: int, spin: bool) -> list[float]:
    """Round trips of one byte between this process and a child, both sleeping or spinning."""
    here, there = socket.socketpair()
    child = SPAWN.Process(target=_echo, args=(there, rounds, spin))
    child.start()
    there.close()
    samples = []
    for _ in range(rounds):
        began = time.perf_counter()
        here.send(b"x")
        _receive(here, spin)
        samples.append(time.perf_counter() - began)
    child.join()
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


def _probe(directory: str, rounds: int, work: float, start: Any, results: Any,
           k: int) -> None:
    """One process of :func:`in_children`."""
    start.wait()
    results.put((k, fsync_samples(directory, rounds, work)))


def in_children(count: int, directory: str, rounds: int, work: float = 0.0
                ) -> list[list[float]]:
    """:func:`fsync_samples` in ``count`` processes started together; every one's samples."""
    start, results = SPAWN.Barrier(count), SPAWN.SimpleQueue()
    children = [SPAWN.Process(target=_probe, args=(directory, rounds, work, start, results, k))
                for k in range(count)]
    for child in children:
        child.start()
    got = dict(results.get() for _ in children)
    for child in children:
        child.join()
    return [got[k] for k in range(count)]


def _spin() -> None:
    while True:
        pass


@contextlib.contextmanager
def busy_loops(count: int) -> Iterator[None]:
    """``count`` processes spinning on a CPU each, for the duration of the block."""
    busy = [SPAWN.Process(target=_spin, daemon=True) for _ in range(count)]
    for child in busy:
        child.start()
    try:
        yield
    finally:
        for child in busy:
            child.kill()
            child.join()


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
