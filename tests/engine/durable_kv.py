"""A key/value state machine with a durable store of its own, for the cold-start tests.

The store is one JSON file holding the data, the applied index and the cluster id, replaced
atomically (temporary file, fsync, rename) after every ``apply`` and ``restore``: the index is
written in the same "transaction" as the data it covers, as docs/api.md requires. Every call
the engine makes is recorded in ``calls``.
"""

from __future__ import annotations

import json
import os
from typing import IO, Any

from tests.engine.kv import KVSnapshot


class DurableKV:
    def __init__(self, path: str) -> None:
        self.path = path
        self.calls: list[tuple[str, Any]] = []
        self.data: dict[str, str] = {}
        self.index = 0
        self.cluster_id = ""
        self._pending_index = 0
        if os.path.exists(path):
            with open(path) as f:
                blob = json.load(f)
            self.data, self.index = blob["data"], blob["index"]
            self.cluster_id = blob["cluster_id"]
            self._pending_index = self.index

    # -- the store ----------------------------------------------------------------------------
    def _commit(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"data": self.data, "index": self.index,
                       "cluster_id": self.cluster_id}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    # -- the optional hooks -------------------------------------------------------------------
    def set_cluster_id(self, cluster_id: str) -> None:
        self.calls.append(("set_cluster_id", cluster_id))
        self._new_cluster_id = cluster_id

    def durable_state(self) -> tuple[str, int] | None:
        self.calls.append(("durable_state", None))
        if not os.path.exists(self.path):
            return None
        return self.cluster_id, self.index

    def set_apply_index(self, index: int) -> None:
        self.calls.append(("set_apply_index", index))
        self._pending_index = index

    # -- the state machine --------------------------------------------------------------------
    def apply(self, data: bytes) -> Any:
        self.calls.append(("apply", self._pending_index))
        parts = data.decode().split(" ", 2)
        prev = None
        if parts[0] == "set" and len(parts) == 3:
            prev = self.data.get(parts[1])
            self.data[parts[1]] = parts[2]
        self.index = self._pending_index
        self.cluster_id = getattr(self, "_new_cluster_id", self.cluster_id)
        self._commit()
        return prev

    def snapshot(self) -> KVSnapshot:
        return KVSnapshot(self.data)

    def restore(self, reader: IO[bytes]) -> None:
        self.calls.append(("restore", self._pending_index))
        blob = reader.read()
        self.data = json.loads(blob) if blob else {}
        self.index = self._pending_index
        self.cluster_id = getattr(self, "_new_cluster_id", self.cluster_id)
        self._commit()

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]
