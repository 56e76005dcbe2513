"""Shared helpers for the envelope tests."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tests.engine.kv import KV
from trio_raft import derive_node_id
from trio_raft.envelope import KEK, Cipher


class RecordingKV(KV):
    """KV that also records ``(apply index, payload)`` for every apply."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[int, bytes]] = []

    def apply(self, data: bytes) -> Any:
        self.log.append((self.apply_index, data))
        return super().apply(data)


class TolerantKV(RecordingKV):
    """RecordingKV that records non-UTF-8 payloads instead of failing on them."""

    def apply(self, data: bytes) -> Any:
        try:
            return super().apply(data)
        except UnicodeDecodeError:
            return None


def open_cipher(base: Path | str, name: str, kek: KEK) -> Cipher:
    """A node's cipher: key store under ``<base>/keys-<name>`` (outside the data dir)."""
    return Cipher.open(os.path.join(os.fspath(base), f"keys-{name}"), kek,
                       node_id=derive_node_id(name))


def wal_bytes(data_dir: str) -> bytes:
    wal_dir = os.path.join(data_dir, "wal")
    out = []
    for name in sorted(os.listdir(wal_dir)):
        if name.endswith(".wal"):
            with open(os.path.join(wal_dir, name), "rb") as f:
                out.append(f.read())
    assert out, f"no WAL segments in {wal_dir}"
    return b"".join(out)
