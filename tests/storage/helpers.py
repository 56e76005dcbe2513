"""Shared helpers for the storage tests: a tiny state machine and file-damage tools."""

from __future__ import annotations

import json
import os
from typing import BinaryIO


class BytesSnapshot:
    """An FSM snapshot handle over fixed bytes, written in small chunks."""

    def __init__(self, payload: bytes, chunk: int = 7) -> None:
        self.payload = payload
        self.chunk = chunk
        self.closed = False

    def write_to(self, writer: BinaryIO) -> int:
        for i in range(0, len(self.payload), self.chunk):
            writer.write(self.payload[i : i + self.chunk])
        return len(self.payload)

    def close(self) -> None:
        self.closed = True


class KV:
    """A dict state machine whose snapshot is JSON."""

    def __init__(self, data: dict[str, str] | None = None, *, partial_restore: bool = False):
        self.data = dict(data or {})
        self.restores = 0
        self.partial_restore = partial_restore
        self.handles: list[BytesSnapshot] = []

    def apply(self, cmd: bytes) -> None:
        k, v = cmd.decode().split("=", 1)
        self.data[k] = v

    def snapshot(self) -> BytesSnapshot:
        h = BytesSnapshot(json.dumps(self.data, sort_keys=True).encode())
        self.handles.append(h)
        return h

    def restore(self, reader: BinaryIO) -> None:
        self.restores += 1
        if self.partial_restore:
            reader.read(1)  # leave the rest for the CRC drain
            return
        self.data = json.loads(reader.read() or b"{}")


def flip_bit(path: str | os.PathLike[str], offset: int, bit: int = 0) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes((b ^ (1 << bit),)))


def truncate(path: str | os.PathLike[str], size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def append_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


class RawSink:
    """A state machine that keeps the raw restored bytes."""

    def __init__(self, *, read_all: bool = True) -> None:
        self.restores = 0
        self.got = b""
        self.read_all = read_all

    def restore(self, reader: BinaryIO) -> None:
        self.restores += 1
        self.got = reader.read() if self.read_all else reader.read(1)
