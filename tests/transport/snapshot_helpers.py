"""Helpers for the snapshot transfer tests: real ``.fsm`` files, exchanges whose file I/O the
test can watch and hold (through a :class:`~trio_raft.testing.faults.FaultyFileIO`), and what this
process still has open."""

from __future__ import annotations

import os
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import crc32c
import trio

from trio_raft.core.messages import ConfState, Message, MessageType, Snapshot, SnapshotMetadata
from trio_raft.storage import fsm_snapshot as fsm
from trio_raft.storage.recovery import SPOOL_PREFIX
from trio_raft.storage.snapshot_exchange import OutgoingPayload, SnapshotExchange
from trio_raft.testing.faults import FaultyFileIO

#: Seam patterns of the exchange's two streams: the spool a received payload is written to, and
#: the ``.fsm`` file a payload is sent from (read with ``readinto``).
SPOOL_WRITES = "*/" + SPOOL_PREFIX + "*"
FSM_FILES = "*" + fsm.FSM_SUFFIX


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


@asynccontextmanager
async def released_at_exit(*ios: FaultyFileIO) -> AsyncIterator[None]:
    """Release every hold of ``ios`` when the block ends: a failing assertion must not leave a
    worker thread held (the transports wait for it when they close)."""
    try:
        yield
    finally:
        for io in ios:
            io.release_all()


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


class ProbedExchange(SnapshotExchange):
    """A real exchange on a :class:`FaultyFileIO` (``io``: the test arms holds and faults on it
    and reads its call record), with an applied index the test sets and a record of the
    payload readers it opened."""

    def __init__(self, fsm_dir: Path, applied: int = 0, *, io: FaultyFileIO | None = None,
                 **kwargs: Any) -> None:
        self.io = io if io is not None else FaultyFileIO()
        super().__init__(fsm_dir, lambda: self.applied, file_io=self.io, **kwargs)
        self.applied = applied
        self.outgoing: list[OutgoingPayload | None] = []

    def open_outgoing(self, data: bytes) -> OutgoingPayload | None:
        opened = super().open_outgoing(data)
        self.outgoing.append(opened)
        return opened
