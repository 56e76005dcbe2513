"""Fixtures shared by the storage tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from trio_raft.envelope import KEK, Cipher


@pytest.fixture
def cipher(tmp_path: Path) -> Cipher:
    """A cipher over a fresh key store with key id 1 installed (for sealed payloads)."""
    c = Cipher.open(str(tmp_path / "keys"), KEK.generate(), node_id="n1")
    assert c.keystore is not None
    c.keystore.install(1, os.urandom(32))
    return c
