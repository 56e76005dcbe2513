"""Envelope control records: the cutover marker and key rotation, carried through the raft log.

A control record is a proposal payload the engine handles itself (the state machine never sees
it). It is never wrapped, so a node can read it before it has the key it installs::

    opcode u8 | magic "TRENV" | version u8 (1) | key id u32 BE | sealed DEK (76 bytes)

* ``OP_CUTOVER`` (0xE0): the cleartext enable marker. Its index becomes the cutover: entries
  above it are wrapped. It also installs (and activates) the key named in it.
* ``OP_ROTATE`` (0xE1): installs a new key and makes it the active one; older keys stay.

The sealed DEK is ``SecretBox(KEK)`` over ``key id | DEK`` (:func:`keystore.seal_dek`), so the log
holds no usable key material without the cluster's KEK. The opcode plus the 5-byte magic form
the reserved prefix: the engine refuses cleartext proposals that start with it, and above the
cutover every user payload starts with the envelope version byte (0x01), which no opcode uses.
"""

from __future__ import annotations

import enum
import struct

import attrs

from trio_raft.envelope.envelope import check_key_id
from trio_raft.envelope.errors import KeyStoreCorruptError
from trio_raft.envelope.keystore import SEALED_DEK_SIZE

MAGIC = b"TRENV"
VERSION = 1
_HEAD = struct.Struct(">B5sBI")
RECORD_SIZE = _HEAD.size + SEALED_DEK_SIZE


class Opcode(enum.IntEnum):
    CUTOVER = 0xE0
    ROTATE = 0xE1


OPCODES = frozenset(int(o) for o in Opcode)


@attrs.frozen
class ControlRecord:
    opcode: Opcode
    key_id: int
    sealed_dek: bytes

    def encode(self) -> bytes:
        check_key_id(self.key_id)
        return _HEAD.pack(self.opcode, MAGIC, VERSION, self.key_id) + self.sealed_dek


def is_control(payload: bytes) -> bool:
    """Whether ``payload`` starts with the reserved control prefix (opcode + magic)."""
    return len(payload) >= 6 and payload[0] in OPCODES and payload[1:6] == MAGIC


def decode_control(payload: bytes) -> ControlRecord:
    if not is_control(payload):
        raise ValueError("not an envelope control record")
    if len(payload) != RECORD_SIZE:
        raise KeyStoreCorruptError(f"control record of {len(payload)} bytes, want {RECORD_SIZE}")
    op, _magic, version, key_id = _HEAD.unpack_from(payload)
    if version != VERSION:
        raise KeyStoreCorruptError(f"control record version {version}")
    return ControlRecord(Opcode(op), key_id, bytes(payload[_HEAD.size:]))
