"""WAL record framing and segment scanning (no file handles kept here).

Theory of operation
-------------------
A segment file is a sequence of records. Every record is a 16-byte header and a payload::

    offset  size  field
    0       4     payload length n (u32 BE)
    4       1     record type (u8)
    5       3     reserved, zero
    8       4     CRC32C of the payload (u32 BE)
    12      4     CRC32C of header bytes 0..12 (u32 BE)
    16      n     payload

The header carries its own checksum so that a reader can tell *which* part of a damaged record
is wrong. That is what separates the two outcomes of a failed check:

* **torn tail** (crash in the middle of an append): only possible in the newest segment, and only
  when the damage is explained by a short or zero-filled end of file: fewer bytes left than a
  header, a valid header whose payload runs past the end of the file, or a failed checksum
  where everything from inside the failing record to the end of the file is zero bytes.
  The WAL truncates the file there (once, at open) and logs it.
* **corruption**: anything else (a checksum mismatch followed by non-zero data, an unknown
  type, an impossible length, a record that fails to decode, damage in an older segment).
  :class:`WALCorruptError` names the file and the offset; nothing is ever skipped.

The first record of every segment is a SEGMENT record (magic, version, sequence number, first
index) that must agree with the file name; a METADATA record follows it, and, from the second
segment on, the STATE record current when the segment was cut.
"""

from __future__ import annotations

import enum
import struct

import attrs
import crc32c as _crc32c

from trio_raft.errors import WALCorruptError

crc32c = _crc32c.crc32c

HEADER = struct.Struct(">IB3xI")  # payload length, type, 3 reserved bytes, payload crc
HEADER_SIZE = HEADER.size + 4
_U32 = struct.Struct(">I")
_SEGMENT = struct.Struct(">4sBQQ")  # magic, version, seq, first index
_ENTRY_INDEX = struct.Struct(">QQ")  # term, index: the first fields of an encoded entry

SEGMENT_MAGIC = b"TRWL"
SEGMENT_VERSION = 1
#: Largest payload a record may declare: an entry of the core's maximum size plus slack.
MAX_RECORD_PAYLOAD = (64 << 20) + (16 << 20)


class RecordType(enum.IntEnum):
    METADATA = 1
    ENTRY = 2
    STATE = 3
    SEGMENT = 4
    SNAPSHOT = 5


_KNOWN_TYPES = frozenset(int(t) for t in RecordType)


def frame(rtype: RecordType, payload: bytes | bytearray | memoryview, out: bytearray) -> None:
    """Append one framed record to ``out``."""
    head = HEADER.pack(len(payload), rtype, crc32c(payload))
    out += head
    out += _U32.pack(crc32c(head))
    out += payload


def segment_header_payload(seq: int, first_index: int) -> bytes:
    return _SEGMENT.pack(SEGMENT_MAGIC, SEGMENT_VERSION, seq, first_index)


def parse_segment_header(payload: memoryview) -> tuple[int, int]:
    """Return (seq, first_index); raise ValueError if the payload is not a segment header."""
    if len(payload) != _SEGMENT.size:
        raise ValueError(f"segment header of {len(payload)} bytes, want {_SEGMENT.size}")
    magic, version, seq, first = _SEGMENT.unpack(payload)
    if magic != SEGMENT_MAGIC:
        raise ValueError(f"bad segment magic {bytes(magic)!r}")
    if version != SEGMENT_VERSION:
        raise ValueError(f"unsupported segment version {version}")
    return seq, first


def entry_index(payload: memoryview) -> int:
    """The index of an encoded entry, read without decoding the entry."""
    if len(payload) < _ENTRY_INDEX.size:
        raise ValueError("entry record too short")
    return int(_ENTRY_INDEX.unpack_from(payload)[1])


@attrs.frozen(slots=True)
class RawRecord:
    type: RecordType
    offset: int
    payload: memoryview


@attrs.frozen(slots=True)
class ScanResult:
    records: list[RawRecord]
    #: Offset of a torn tail (only ever set when scanning the newest segment), else None.
    torn_at: int | None
    torn_reason: str = ""


def corrupt(path: str, offset: int, reason: str) -> WALCorruptError:
    err = WALCorruptError(f"wal: corrupt record in {path} at offset {offset}: {reason}")
    err.path = path  # type: ignore[attr-defined]
    err.offset = offset  # type: ignore[attr-defined]
    return err


def _zero_tail_start(data: bytes) -> int:
    """Offset where the run of zero bytes that ends the data begins (len(data) if none)."""
    return len(data.rstrip(b"\x00"))


def scan(path: str, data: bytes, *, is_last: bool) -> ScanResult:
    """Check and split one segment's bytes into records (see the module docstring)."""
    view = memoryview(data)
    size = len(data)
    records: list[RawRecord] = []
    off = 0
    zero_start: int | None = None

    def zeros_from() -> int:
        nonlocal zero_start
        if zero_start is None:
            zero_start = _zero_tail_start(data)
        return zero_start

    while off < size:
        if size - off < HEADER_SIZE:
            if is_last:
                return ScanResult(records, off, "partial record header at end of file")
            raise corrupt(path, off, f"truncated record header ({size - off} bytes)")
        plen, rtype, pcrc = HEADER.unpack_from(view, off)
        (hcrc,) = _U32.unpack_from(view, off + HEADER.size)
        if crc32c(view[off : off + HEADER.size]) != hcrc:
            if is_last and zeros_from() < off + HEADER_SIZE:
                return ScanResult(records, off, "zero-filled record header at end of file")
            raise corrupt(path, off, "record header checksum mismatch")
        if plen > MAX_RECORD_PAYLOAD:
            raise corrupt(path, off, f"impossible record length {plen}")
        if rtype not in _KNOWN_TYPES:
            raise corrupt(path, off, f"unknown record type {rtype}")
        end = off + HEADER_SIZE + plen
        if end > size:
            if is_last:
                return ScanResult(records, off, "record runs past end of file")
            raise corrupt(path, off, "record runs past end of segment")
        payload = view[off + HEADER_SIZE : end]
        if crc32c(payload) != pcrc:
            if is_last and zeros_from() < end:
                return ScanResult(records, off, "zero-filled record payload at end of file")
            raise corrupt(path, off, "record payload checksum mismatch")
        records.append(RawRecord(RecordType(rtype), off, payload))
        off = end
    return ScanResult(records, None)
