"""A small JSON-lines key/value state machine used by the engine tests."""

from __future__ import annotations

import json
from typing import IO, Any


class KVSnapshot:
    def __init__(self, data: dict[str, str]) -> None:
        self._data = dict(data)
        self.closed = False

    def write_to(self, writer: IO[bytes]) -> int:
        blob = json.dumps(self._data, sort_keys=True).encode()
        writer.write(blob)
        return len(blob)

    def close(self) -> None:
        self.closed = True


class KV:
    """Commands are ``b"set k v"``; ``apply`` returns the previous value."""

    def __init__(self) -> None:
        self.data: dict[str, str] = {}
        self.applied: list[bytes] = []
        self.apply_index = 0

    def set_apply_index(self, index: int) -> None:
        self.apply_index = index

    def apply(self, data: bytes) -> Any:
        self.applied.append(data)
        parts = data.decode().split(" ", 2)
        if parts[0] == "set" and len(parts) == 3:
            prev = self.data.get(parts[1])
            self.data[parts[1]] = parts[2]
            return prev
        return None

    def snapshot(self) -> KVSnapshot:
        return KVSnapshot(self.data)

    def restore(self, reader: IO[bytes]) -> None:
        blob = reader.read()
        self.data = json.loads(blob) if blob else {}
