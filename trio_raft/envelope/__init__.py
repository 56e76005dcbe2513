"""Raft entry envelope: AES-256-GCM wrapped payloads, the KEK-sealed key store, nonces.

See docs/envelope.md. This package does not import the engine; the engine wires it in
(``trio_raft/engine/envelope_support.py``).
"""

from trio_raft.envelope.cipher import Cipher
from trio_raft.envelope.control import ControlRecord, Opcode, decode_control, is_control
from trio_raft.envelope.envelope import HEADER_SIZE, OVERHEAD, Envelope, open_envelope, parse, seal
from trio_raft.envelope.errors import (
    EncryptionScanError,
    KEKError,
    KeyConflictError,
    KeyStoreCorruptError,
    KeyStoreError,
    NonceExhaustedError,
    ReservedPrefixError,
)
from trio_raft.envelope.keystore import KEK, KeyStore, open_dek, seal_dek
from trio_raft.envelope.nonce import NonceSource, node_prefix

__all__ = [
    "HEADER_SIZE",
    "KEK",
    "OVERHEAD",
    "Cipher",
    "ControlRecord",
    "EncryptionScanError",
    "Envelope",
    "KEKError",
    "KeyConflictError",
    "KeyStore",
    "KeyStoreCorruptError",
    "KeyStoreError",
    "NonceExhaustedError",
    "NonceSource",
    "Opcode",
    "ReservedPrefixError",
    "decode_control",
    "is_control",
    "node_prefix",
    "open_dek",
    "open_envelope",
    "parse",
    "seal",
    "seal_dek",
]
