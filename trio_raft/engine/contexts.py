"""Byte envelopes the engine puts around proposals, ReadIndex rounds and membership changes so
it can match what raft hands back to the caller waiting for it. Layouts in ``docs/formats.md``.

* proposal entry data: ``0x01 | request id u64 | payload``;
* ReadIndex context: ``0x02 | round id u64``;
* configuration change context: ``0x03 | request id u64 | node id u64 | len(id) u16 |
  len(address) u16 | id | address``.
"""

from __future__ import annotations

import struct

import attrs

from trio_raft.errors import ConfChangeContextTooLargeError

PROPOSAL_VERSION = 0x01
READ_VERSION = 0x02
CONF_VERSION = 0x03

_ID = struct.Struct(">BQ")
_CONF = struct.Struct(">BQQHH")
HEADER_SIZE = _ID.size  # 9


def encode_proposal(request_id: int, payload: bytes) -> bytes:
    return _ID.pack(PROPOSAL_VERSION, request_id) + payload


def decode_proposal(data: bytes) -> tuple[int, bytes] | None:
    """(request id, payload), or None for data that is not a proposal envelope."""
    if len(data) < HEADER_SIZE or data[0] != PROPOSAL_VERSION:
        return None
    return _ID.unpack_from(data)[1], data[HEADER_SIZE:]


def encode_read_context(round_id: int) -> bytes:
    """The context of one ReadIndex round (``reads.py``)."""
    return _ID.pack(READ_VERSION, round_id)


def decode_read_context(ctx: bytes) -> int | None:
    if len(ctx) != HEADER_SIZE or ctx[0] != READ_VERSION:
        return None
    return int(_ID.unpack(ctx)[1])


@attrs.frozen
class ConfContext:
    request_id: int
    node_id: int
    id: str
    address: str


def encode_conf_context(c: ConfContext) -> bytes:
    pid = c.id.encode()
    addr = c.address.encode()
    if len(pid) > 0xFFFF or len(addr) > 0xFFFF:
        raise ConfChangeContextTooLargeError()
    return _CONF.pack(CONF_VERSION, c.request_id, c.node_id, len(pid), len(addr)) + pid + addr


def decode_conf_context(data: bytes) -> ConfContext | None:
    if len(data) < _CONF.size or data[0] != CONF_VERSION:
        return None
    _, rid, nid, ilen, alen = _CONF.unpack_from(data)
    if len(data) != _CONF.size + ilen + alen:
        return None
    try:
        pid = data[_CONF.size : _CONF.size + ilen].decode()
        addr = data[_CONF.size + ilen :].decode()
    except UnicodeDecodeError:
        return None
    return ConfContext(rid, nid, pid, addr)
