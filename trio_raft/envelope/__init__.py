"""Raft entry envelope: AES-256-GCM wrapped payloads, the KEK-sealed key store, nonces.

See docs/envelope.md. This package does not import the engine; the engine wires it in
(``trio_raft/engine/envelope_gate.py``).
"""

from trio_raft.envelope.cipher import Cipher, CipherCounts
from trio_raft.envelope.control import ControlRecord, Opcode, decode_control, is_control
from trio_raft.envelope.envelope import HEADER_SIZE, OVERHEAD, Envelope, open_envelope, parse, seal
from trio_raft.envelope.errors import (
    EncryptionScanError,
    KEKError,
    KEKPermissionError,
    KeyConflictError,
    KeyStoreCorruptError,
    KeyStoreError,
    NonceExhaustedError,
    ReservedPrefixError,
)
from trio_raft.envelope.keystore import KEK, KeyStore, open_dek, rotate_kek, seal_dek
from trio_raft.envelope.nonce import NonceSource, node_prefix
from trio_raft.envelope.stream import OpeningReader, SealingWriter

__all__ = [
    "HEADER_SIZE",
    "KEK",
    "OVERHEAD",
    "Cipher",
    "CipherCounts",
    "ControlRecord",
    "EncryptionScanError",
    "Envelope",
    "KEKError",
    "KEKPermissionError",
    "KeyConflictError",
    "KeyStore",
    "KeyStoreCorruptError",
    "KeyStoreError",
    "NonceExhaustedError",
    "NonceSource",
    "Opcode",
    "OpeningReader",
    "ReservedPrefixError",
    "SealingWriter",
    "decode_control",
    "is_control",
    "node_prefix",
    "open_dek",
    "open_envelope",
    "parse",
    "rotate_kek",
    "seal",
    "seal_dek",
]
