"""The envelope's own errors (key store, nonce state, control records).

They live in :mod:`trio_raft.errors` with the rest of the hierarchy and are re-exported here.
"""

from __future__ import annotations

from trio_raft.errors import (
    EncryptionScanError,
    KEKError,
    KEKPermissionError,
    KeyConflictError,
    KeyStoreCorruptError,
    KeyStoreError,
    NonceExhaustedError,
    ReservedPrefixError,
)

__all__ = [
    "EncryptionScanError",
    "KEKError",
    "KEKPermissionError",
    "KeyConflictError",
    "KeyStoreCorruptError",
    "KeyStoreError",
    "NonceExhaustedError",
    "ReservedPrefixError",
]
