"""Helpers for the snapshot transfer tests: real ``.fsm`` files, probes into transfers in flight,
and what this process still has open."""

from __future__ import annotations

import os
import struct
import threading
from pathlib import Path
from typing import Any

import crc32c
import trio

from trio_raft.core.messages import ConfState, Message, MessageType, Snapshot, SnapshotMetadata
from trio_raft.storage import fsm_snapshot as fsm
from trio_raft.storage.recovery import SPOOL_PREFIX
from trio_raft.storage.snapshot_exchange import (
    IncomingSnapshot,
    OutgoingPayload,
    SnapshotExchange,
)


def snap_msg(index: int, data: bytes = b"", to: int = 2) -> Message:
    return Message(MessageType.SNAP, to=to, from_=1, term=2, snapshot=Snapshot(
        SnapshotMetadata(ConfState([1, 2, 3]), index, 2), data))


def write_fsm(directory: Path, index: int, payload: bytes) -> bytes:
    """Write ``directory/%016x.fsm`` for ``payload``; returns its token."""
    directory.mkdir(parents=True, exist_ok=True)
    crc = crc32c.crc32c(payload)
    (directory / fsm_name(index)).write_bytes(payload + struct.pack(">I", crc))
    return fsm.encode_snapshot_token(index, crc)


def fsm_name(index: int) -> str:
    return os.path.basename(fsm.fsm_snapshot_path("", index))


def spools(directory: Path) -> list[str]:
    if not directory.exists():
        return []
    return [n for n in os.listdir(directory) if n.startswith(SPOOL_PREFIX)]


def open_files_under(directory: Path) -> list[str]:
    """Paths under ``directory`` that this process holds open (from /proc/self/fd)."""
    root = str(directory.resolve())
    out: list[str] = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(root + os.sep):
            out.append(target)
    return out


def portal_tasks() -> list[str]:
    """Names of the trio tasks that run calls coming from an asyncio loop (TrioPortal.run)."""
    names: list[str] = []

    def walk(task: trio.lowlevel.Task) -> None:
        if "TrioPortal.run" in task.name:
            names.append(task.name)
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                walk(child)

    walk(trio.lowlevel.current_root_task())
    return names


class Probe:
    """Watches bytes passing a point in a worker thread: ``reached`` (a trio event) is set once
    ``threshold`` bytes have passed; with ``hold``, the thread then waits for :meth:`release`."""

    def __init__(self, threshold: int, *, hold: bool = False) -> None:
        self.threshold = threshold
        self.hold = hold
        self.reached = trio.Event()
        self.seen = 0
        self._gate = threading.Event()

    def passed(self, n: int) -> None:  # worker thread
        self.seen += n
        if self.seen >= self.threshold:
            if not self.reached.is_set():
                trio.from_thread.run_sync(self.reached.set)
            if self.hold:
                self._gate.wait(timeout=60)

    def release(self) -> None:
        self._gate.set()


class _ProbedIncoming:
    def __init__(self, inner: IncomingSnapshot, probe: Probe) -> None:
        self._inner, self._probe = inner, probe

    def write(self, data: bytes) -> None:
        self._inner.write(data)
        self._probe.passed(len(data))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _ProbedOutgoing:
    def __init__(self, inner: OutgoingPayload, probe: Probe) -> None:
        self._inner, self._probe = inner, probe

    def read(self, n: int) -> bytes:
        data = self._inner.read(n)
        self._probe.passed(len(data))
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class ProbedExchange(SnapshotExchange):
    """A real exchange whose incoming writes and outgoing reads pass through probes."""

    def __init__(self, fsm_dir: Path, applied: int = 0, *, incoming: Probe | None = None,
                 outgoing: Probe | None = None, **kwargs: Any) -> None:
        super().__init__(fsm_dir, lambda: self.applied, **kwargs)
        self.applied = applied
        self.incoming_probe = incoming
        self.outgoing_probe = outgoing
        self.outgoing: list[Any] = []

    def begin_incoming(self, index: int) -> Any:
        inner = super().begin_incoming(index)
        return inner if self.incoming_probe is None else _ProbedIncoming(
            inner, self.incoming_probe)

    def open_outgoing(self, data: bytes) -> Any:
        inner = super().open_outgoing(data)
        self.outgoing.append(inner)
        if inner is None or self.outgoing_probe is None:
            return inner
        return _ProbedOutgoing(inner, self.outgoing_probe)
