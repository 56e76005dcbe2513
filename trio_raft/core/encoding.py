"""Compact, bounds-checked binary encodings of the core's value types.

Used by storage (WAL records, snapshot metadata) and by the transport codec (raft messages on the
wire). Pure functions over ``bytes``: no I/O. All integers are big-endian. The layouts are
documented in ``docs/formats.md``.

Decoding accepts untrusted input: it raises :class:`DecodeError` (and nothing else) for anything
malformed, and never allocates more than the input it was given, because every declared length or
count is checked against the bytes that remain before it is used.
"""

from __future__ import annotations

import struct

from trio_raft.core.errors import DecodeError
from trio_raft.core.messages import (
    ConfState,
    Entry,
    EntryType,
    HardState,
    Message,
    MessageType,
    Snapshot,
    SnapshotMetadata,
)

#: Hard caps on declared sizes, independent of the input length.
MAX_ENTRY_DATA = 64 << 20
MAX_SNAPSHOT_DATA = 1 << 30
MAX_CONTEXT = 1 << 20
MAX_NODES = 1 << 16
MAX_ENTRIES = 1 << 20

_ENTRY = struct.Struct(">QQBI")  # term, index, type, data length
_HARD_STATE = struct.Struct(">QQQ")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_U8 = struct.Struct(">B")
# type, to, from, term, log_term, index, commit, reject, reject_hint, context length
_MSG = struct.Struct(">BQQQQQQBQI")
_META = struct.Struct(">QQ")  # index, term

_ENTRY_TYPES = {int(t): t for t in EntryType}
_MSG_TYPES = {int(t): t for t in MessageType}


class Reader:
    """A cursor over ``bytes`` whose every read is bounds-checked."""

    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes | memoryview, pos: int = 0) -> None:
        self.buf = buf
        self.pos = pos

    def remaining(self) -> int:
        return len(self.buf) - self.pos

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > len(self.buf):
            raise DecodeError(
                f"truncated {what}: need {n} bytes at offset {self.pos}, have {self.remaining()}"
            )

    def unpack(self, st: struct.Struct, what: str) -> tuple[int, ...]:
        self.need(st.size, what)
        vals = st.unpack_from(self.buf, self.pos)
        self.pos += st.size
        return vals

    def u8(self, what: str) -> int:
        return self.unpack(_U8, what)[0]

    def u32(self, what: str) -> int:
        return self.unpack(_U32, what)[0]

    def u64(self, what: str) -> int:
        return self.unpack(_U64, what)[0]

    def take(self, n: int, what: str, cap: int) -> bytes:
        if n > cap:
            raise DecodeError(f"{what} length {n} exceeds limit {cap}")
        self.need(n, what)
        out = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return out

    def done(self, what: str) -> None:
        if self.pos != len(self.buf):
            raise DecodeError(f"{self.remaining()} trailing bytes after {what}")


# -- entries --------------------------------------------------------------------------------


def encode_entry(ent: Entry, out: bytearray) -> None:
    out += _ENTRY.pack(ent.term, ent.index, ent.type, len(ent.data))
    out += ent.data


def read_entry(r: Reader) -> Entry:
    term, index, etype, n = r.unpack(_ENTRY, "entry header")
    kind = _ENTRY_TYPES.get(etype)
    if kind is None:
        raise DecodeError(f"unknown entry type {etype}")
    return Entry(term, index, kind, r.take(n, "entry data", MAX_ENTRY_DATA))


def entry_to_bytes(ent: Entry) -> bytes:
    out = bytearray()
    encode_entry(ent, out)
    return bytes(out)


def entry_from_bytes(data: bytes | memoryview) -> Entry:
    r = Reader(data)
    ent = read_entry(r)
    r.done("entry")
    return ent


# -- hard state -----------------------------------------------------------------------------


def hard_state_to_bytes(hs: HardState) -> bytes:
    return _HARD_STATE.pack(hs.term, hs.vote, hs.commit)


def hard_state_from_bytes(data: bytes | memoryview) -> HardState:
    r = Reader(data)
    term, vote, commit = r.unpack(_HARD_STATE, "hard state")
    r.done("hard state")
    return HardState(term, vote, commit)


# -- conf state / snapshot ------------------------------------------------------------------


def _encode_ids(ids: tuple[int, ...], out: bytearray) -> None:
    out += _U32.pack(len(ids))
    for i in ids:
        out += _U64.pack(i)


def _read_ids(r: Reader, what: str) -> tuple[int, ...]:
    n = r.u32(what)
    if n > MAX_NODES:
        raise DecodeError(f"{what} count {n} exceeds limit {MAX_NODES}")
    r.need(8 * n, what)
    vals = struct.unpack_from(f">{n}Q", r.buf, r.pos)
    r.pos += 8 * n
    return tuple(vals)


def encode_conf_state(cs: ConfState, out: bytearray) -> None:
    _encode_ids(cs.voters, out)
    _encode_ids(cs.learners, out)
    _encode_ids(cs.voters_outgoing, out)
    _encode_ids(cs.learners_next, out)
    out += _U8.pack(1 if cs.auto_leave else 0)


def read_conf_state(r: Reader) -> ConfState:
    voters = _read_ids(r, "voters")
    learners = _read_ids(r, "learners")
    outgoing = _read_ids(r, "outgoing voters")
    nxt = _read_ids(r, "next learners")
    flag = r.u8("auto leave")
    if flag > 1:
        raise DecodeError(f"bad auto_leave flag {flag}")
    return ConfState(voters, learners, outgoing, nxt, bool(flag))


def encode_snapshot_metadata(meta: SnapshotMetadata, out: bytearray) -> None:
    out += _META.pack(meta.index, meta.term)
    encode_conf_state(meta.conf_state, out)


def read_snapshot_metadata(r: Reader) -> SnapshotMetadata:
    index, term = r.unpack(_META, "snapshot metadata")
    return SnapshotMetadata(read_conf_state(r), index, term)


def encode_snapshot(snap: Snapshot, out: bytearray) -> None:
    encode_snapshot_metadata(snap.metadata, out)
    out += _U32.pack(len(snap.data))
    out += snap.data


def read_snapshot(r: Reader) -> Snapshot:
    meta = read_snapshot_metadata(r)
    n = r.u32("snapshot data length")
    return Snapshot(meta, r.take(n, "snapshot data", MAX_SNAPSHOT_DATA))


def snapshot_to_bytes(snap: Snapshot) -> bytes:
    out = bytearray()
    encode_snapshot(snap, out)
    return bytes(out)


def snapshot_from_bytes(data: bytes | memoryview) -> Snapshot:
    r = Reader(data)
    snap = read_snapshot(r)
    r.done("snapshot")
    return snap


# -- messages -------------------------------------------------------------------------------


def encode_message(m: Message, out: bytearray) -> None:
    out += _MSG.pack(
        m.type,
        m.to,
        m.from_,
        m.term,
        m.log_term,
        m.index,
        m.commit,
        1 if m.reject else 0,
        m.reject_hint,
        len(m.context),
    )
    out += m.context
    out += _U32.pack(len(m.entries))
    for ent in m.entries:
        out += _ENTRY.pack(ent.term, ent.index, ent.type, len(ent.data))
        out += ent.data
    if m.snapshot is None:
        out += b"\x00"
    else:
        out += b"\x01"
        encode_snapshot(m.snapshot, out)


def read_message(r: Reader) -> Message:
    mtype, to, frm, term, log_term, index, commit, reject, hint, ctx_len = r.unpack(
        _MSG, "message header"
    )
    kind = _MSG_TYPES.get(mtype)
    if kind is None:
        raise DecodeError(f"unknown message type {mtype}")
    if reject > 1:
        raise DecodeError(f"bad reject flag {reject}")
    context = r.take(ctx_len, "message context", MAX_CONTEXT)
    n = r.u32("entry count")
    if n > MAX_ENTRIES or n * _ENTRY.size > r.remaining():
        raise DecodeError(f"entry count {n} exceeds what the message holds")
    entries = tuple(read_entry(r) for _ in range(n))
    has_snap = r.u8("snapshot flag")
    if has_snap > 1:
        raise DecodeError(f"bad snapshot flag {has_snap}")
    snap = read_snapshot(r) if has_snap else None
    return Message(
        kind,
        to=to,
        from_=frm,
        term=term,
        log_term=log_term,
        index=index,
        entries=entries,
        commit=commit,
        snapshot=snap,
        reject=bool(reject),
        reject_hint=hint,
        context=context,
    )


def message_to_bytes(m: Message) -> bytes:
    out = bytearray()
    encode_message(m, out)
    return bytes(out)


def message_from_bytes(data: bytes | memoryview) -> Message:
    r = Reader(data)
    m = read_message(r)
    r.done("message")
    return m
