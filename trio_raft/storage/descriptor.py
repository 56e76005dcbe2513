"""The snapshot descriptor: what a raft snapshot's ``data`` holds (docs/storage.md section 4a).

A raft :class:`~trio_raft.core.messages.Snapshot` carries opaque ``data``. The engine puts a
*descriptor* there: the 17-byte ``.fsm`` token naming the state machine payload, the cluster id
and every member's address. It is written into ``snap/*.snap`` (version 2) and travels, whole,
in the metadata frame of a ``MsgSnap``; the receiving
:class:`~trio_raft.storage.snapshot_exchange.SnapshotExchange` keeps every record and only swaps
the token for the one naming its own ``.fsm`` file. Layout (integers big-endian)::

    descriptor := b"TRSD" | version u8 = 1 | record count u16 | record* | CRC32C u32
    record     := type u16 | flags u8 | length u32 | value (length bytes)

The CRC32C covers every byte before it. Record types (each at most once):

====  ================  ========  ====================================================
type  name              flags     value
====  ================  ========  ====================================================
1     PAYLOAD_TOKEN     critical  the 17-byte ``.fsm`` token (required)
2     CLUSTER_ID        -         the cluster id, 1-64 ASCII letters, digits, ``-``, ``_``
3     MEMBERS           -         u16 count, then per member: node id u64, suffrage u8
                                  (0 voter, 1 learner), u16 id length, id (UTF-8),
                                  u16 address length, address (UTF-8)
16    KEY_RING          critical  the envelope's data keys, each sealed with the KEK:
                                  active key id u32, u16 count, then per key: key id u32,
                                  u16 length, sealed key (docs/envelope.md)
17    CUTOVER_INDEX     critical  the envelope cutover index, u64
18    SEALED_PAYLOAD    critical  the ``.fsm`` payload is a sealed stream
                                  (``trio_raft/envelope/stream.py``); value: its key id u32
====  ================  ========  ====================================================

A descriptor written while the envelope is on carries all three envelope records, so a node
restored or caught up from it has the keys to open the payload and the entries after it, and
knows the cutover. A descriptor without CUTOVER_INDEX was written with the envelope off.

Flags: bit 0 is *critical*; bits 1-7 must be zero. Extension rule: a reader that meets a record
type it does not know refuses the descriptor when the record is critical
(:class:`~trio_raft.errors.SnapshotDescriptorError`) and otherwise skips it, keeping it verbatim:
re-encoding a descriptor (as the receiving exchange does) preserves records it did not
understand. A new record that changes what the payload means (sealed payloads, keys) must be
critical, so that an older node refuses the snapshot instead of misreading it.

Anything that is not a descriptor is what the data held before descriptors existed: a bare
17-byte token, or an *inline* payload (a migrated data dir, docs/storage.md section 7). An
inline payload never starts with the descriptor magic (migration refuses one that does).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable

import attrs
import crc32c as _crc32c

from trio_raft.errors import FSMSnapshotTokenInvalidError, SnapshotDescriptorError
from trio_raft.storage import fsm_snapshot as fsm

DESCRIPTOR_MAGIC = b"TRSD"
DESCRIPTOR_VERSION = 1
#: Largest descriptor accepted (it travels in one metadata frame).
MAX_DESCRIPTOR_BYTES = 4 << 20
MAX_MEMBERS = 1024
MAX_STRING = 0xFFFF

REC_PAYLOAD_TOKEN = 1
REC_CLUSTER_ID = 2
REC_MEMBERS = 3
#: The envelope (docs/envelope.md): sealed data keys, cutover index, sealed payload.
REC_KEY_RING = 16
REC_CUTOVER_INDEX = 17
REC_SEALED_PAYLOAD = 18
KNOWN_TYPES = frozenset({REC_PAYLOAD_TOKEN, REC_CLUSTER_ID, REC_MEMBERS, REC_KEY_RING,
                         REC_CUTOVER_INDEX, REC_SEALED_PAYLOAD})
MAX_RING_KEYS = 4096

FLAG_CRITICAL = 0x01

VOTER = "voter"
LEARNER = "learner"
_SUFFRAGE = {VOTER: 0, LEARNER: 1}
_SUFFRAGE_NAMES = {0: VOTER, 1: LEARNER}

_PREFIX = struct.Struct(">4sB")
_REC = struct.Struct(">HBI")
_CRC = struct.Struct(">I")
_U16 = struct.Struct(">H")
_MEMBER = struct.Struct(">QB")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_CLUSTER_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def check_cluster_id(value: str) -> str:
    """``value`` if it is a valid cluster id (1-64 ASCII letters, digits, ``-``, ``_``)."""
    if not _CLUSTER_ID.match(value):
        raise SnapshotDescriptorError(f"invalid cluster id {value!r}")
    return value


@attrs.frozen(slots=True)
class SnapshotMember:
    """One member as a snapshot records it: raft node id, operator id, address, suffrage."""

    node_id: int
    id: str
    address: str
    suffrage: str = VOTER


@attrs.frozen(slots=True)
class KeyRing:
    """The envelope's data keys as a snapshot carries them: the active key id and every
    installed key, each sealed with the KEK (never a usable key without it)."""

    active: int
    keys: tuple[tuple[int, bytes], ...]

    def encode(self) -> bytes:
        if len(self.keys) > MAX_RING_KEYS:
            raise SnapshotDescriptorError(f"more than {MAX_RING_KEYS} keys in a key ring")
        out = bytearray(_U32.pack(self.active) + _U16.pack(len(self.keys)))
        for kid, sealed in self.keys:
            if len(sealed) > MAX_STRING:
                raise SnapshotDescriptorError(f"sealed key {kid} is too long")
            out += _U32.pack(kid) + _U16.pack(len(sealed)) + sealed
        return bytes(out)

    @classmethod
    def decode(cls, value: bytes, what: str = "key ring") -> KeyRing:
        try:
            (active,) = _U32.unpack_from(value, 0)
            (count,) = _U16.unpack_from(value, 4)
            pos = 6
            keys: list[tuple[int, bytes]] = []
            for _ in range(count):
                (kid,) = _U32.unpack_from(value, pos)
                (n,) = _U16.unpack_from(value, pos + 4)
                pos += 6
                if pos + n > len(value):
                    raise SnapshotDescriptorError(f"{what}: truncated")
                keys.append((kid, bytes(value[pos:pos + n])))
                pos += n
        except struct.error:
            raise SnapshotDescriptorError(f"{what}: truncated") from None
        if pos != len(value):
            raise SnapshotDescriptorError(f"{what}: {len(value) - pos} trailing bytes")
        ids = [k for k, _ in keys]
        if 0 in ids or len(set(ids)) != len(ids) or (active and active not in ids):
            raise SnapshotDescriptorError(f"{what}: key ids {ids}, active {active}")
        return cls(active, tuple(keys))


@attrs.frozen(slots=True)
class EnvelopeState:
    """What a snapshot says about the envelope: the cutover index, the key ring, and the key
    id its payload is sealed under (0: not sealed). ``cutover_index`` None: the envelope was
    off when the snapshot was written."""

    cutover_index: int | None = None
    key_ring: KeyRing | None = None
    sealed_key_id: int = 0

    def records(self) -> list[tuple[int, int, bytes]]:
        out: list[tuple[int, int, bytes]] = []
        if self.key_ring is not None:
            out.append((REC_KEY_RING, FLAG_CRITICAL, self.key_ring.encode()))
        if self.cutover_index is not None:
            out.append((REC_CUTOVER_INDEX, FLAG_CRITICAL, _U64.pack(self.cutover_index)))
        if self.sealed_key_id:
            out.append((REC_SEALED_PAYLOAD, FLAG_CRITICAL, _U32.pack(self.sealed_key_id)))
        return out

    @classmethod
    def from_records(cls, known: dict[int, bytes], what: str) -> EnvelopeState:
        ring = (KeyRing.decode(known[REC_KEY_RING], f"{what}: key ring")
                if REC_KEY_RING in known else None)
        cutover = None
        if REC_CUTOVER_INDEX in known:
            raw = known[REC_CUTOVER_INDEX]
            if len(raw) != _U64.size:
                raise SnapshotDescriptorError(f"{what}: cutover index of {len(raw)} bytes")
            (cutover,) = _U64.unpack(raw)
        sealed = 0
        if REC_SEALED_PAYLOAD in known:
            raw = known[REC_SEALED_PAYLOAD]
            if len(raw) != _U32.size or _U32.unpack(raw)[0] == 0:
                raise SnapshotDescriptorError(f"{what}: bad sealed payload record")
            (sealed,) = _U32.unpack(raw)
        return cls(cutover, ring, sealed)


NO_ENVELOPE = EnvelopeState()


@attrs.frozen(slots=True)
class RawRecord:
    """A record this version does not understand (never critical), kept verbatim."""

    type: int
    flags: int
    value: bytes


@attrs.frozen(slots=True)
class SnapshotDescriptor:
    """The decoded descriptor (see the module docstring)."""

    token: bytes
    cluster_id: str = ""
    members: tuple[SnapshotMember, ...] = ()
    #: Non-critical records of unknown type, in the order they were found.
    extra: tuple[RawRecord, ...] = ()
    #: The envelope records (cutover, key ring, sealed payload).
    envelope: EnvelopeState = NO_ENVELOPE

    def member(self, node_id: int) -> SnapshotMember | None:
        return next((m for m in self.members if m.node_id == node_id), None)


# -- records --------------------------------------------------------------------------------


def encode_records(records: Iterable[tuple[int, int, bytes]]) -> bytes:
    """``record count u16 | record*`` for (type, flags, value) triples."""
    out = bytearray()
    count = 0
    for rtype, flags, value in records:
        out += _REC.pack(rtype, flags, len(value)) + value
        count += 1
    if count > 0xFFFF:
        raise SnapshotDescriptorError(f"{count} records exceed {0xFFFF}")
    return _U16.pack(count) + bytes(out)


def decode_records(data: bytes | memoryview, pos: int, end: int, what: str
                   ) -> tuple[list[tuple[int, int, bytes]], int]:
    """Parse ``record count u16 | record*`` from ``data[pos:end]``; returns the records and
    the position after them. Flags other than bit 0, duplicate types and truncation are
    :class:`SnapshotDescriptorError`."""
    view = memoryview(data)
    if pos + _U16.size > end:
        raise SnapshotDescriptorError(f"{what}: truncated record count")
    (count,) = _U16.unpack_from(view, pos)
    pos += _U16.size
    out: list[tuple[int, int, bytes]] = []
    seen: set[int] = set()
    for _ in range(count):
        if pos + _REC.size > end:
            raise SnapshotDescriptorError(f"{what}: truncated record header at {pos}")
        rtype, flags, length = _REC.unpack_from(view, pos)
        pos += _REC.size
        if flags & ~FLAG_CRITICAL:
            raise SnapshotDescriptorError(f"{what}: record {rtype} has unknown flags {flags:#x}")
        if rtype in seen:
            raise SnapshotDescriptorError(f"{what}: record {rtype} appears twice")
        if pos + length > end:
            raise SnapshotDescriptorError(f"{what}: record {rtype} runs past the end")
        seen.add(rtype)
        out.append((rtype, flags, bytes(view[pos:pos + length])))
        pos += length
    return out, pos


def _encode_string(value: str, what: str) -> bytes:
    raw = value.encode("utf-8")
    if len(raw) > MAX_STRING:
        raise SnapshotDescriptorError(f"{what} longer than {MAX_STRING} bytes")
    return _U16.pack(len(raw)) + raw


def encode_members(members: Iterable[SnapshotMember]) -> bytes:
    items = sorted(members, key=lambda m: (m.node_id, m.id))
    if len(items) > MAX_MEMBERS:
        raise SnapshotDescriptorError(f"more than {MAX_MEMBERS} members")
    out = bytearray(_U16.pack(len(items)))
    for m in items:
        if m.suffrage not in _SUFFRAGE:
            raise SnapshotDescriptorError(f"member {m.id!r}: unknown suffrage {m.suffrage!r}")
        out += _MEMBER.pack(m.node_id, _SUFFRAGE[m.suffrage])
        out += _encode_string(m.id, "member id") + _encode_string(m.address, "member address")
    return bytes(out)


def decode_members(value: bytes, what: str = "members") -> tuple[SnapshotMember, ...]:
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(value):
            raise SnapshotDescriptorError(f"{what}: truncated at {pos}")
        out = value[pos:pos + n]
        pos += n
        return out

    def string(field: str) -> str:
        (n,) = _U16.unpack(take(_U16.size))
        try:
            return take(n).decode("utf-8")
        except UnicodeDecodeError:
            raise SnapshotDescriptorError(f"{what}: {field} is not UTF-8") from None

    (count,) = _U16.unpack(take(_U16.size))
    if count > MAX_MEMBERS:
        raise SnapshotDescriptorError(f"{what}: {count} members exceed {MAX_MEMBERS}")
    out: list[SnapshotMember] = []
    for _ in range(count):
        node_id, suffrage = _MEMBER.unpack(take(_MEMBER.size))
        if suffrage not in _SUFFRAGE_NAMES:
            raise SnapshotDescriptorError(f"{what}: unknown suffrage byte {suffrage}")
        ident = string("member id")
        out.append(SnapshotMember(node_id, ident, string("member address"),
                                  _SUFFRAGE_NAMES[suffrage]))
    if pos != len(value):
        raise SnapshotDescriptorError(f"{what}: {len(value) - pos} trailing bytes")
    return tuple(out)


def describe_records(cluster_id: str, members: Iterable[SnapshotMember],
                     extra: Iterable[RawRecord] = (), envelope: EnvelopeState = NO_ENVELOPE
                     ) -> list[tuple[int, int, bytes]]:
    """The CLUSTER_ID, MEMBERS and envelope records (and ``extra``) as (type, flags, value)
    triples."""
    records: list[tuple[int, int, bytes]] = []
    if cluster_id:
        records.append((REC_CLUSTER_ID, 0, check_cluster_id(cluster_id).encode("ascii")))
    records.append((REC_MEMBERS, 0, encode_members(members)))
    records += envelope.records()
    records += [(r.type, r.flags, r.value) for r in extra]
    return records


def interpret_records(records: list[tuple[int, int, bytes]], what: str
                      ) -> tuple[dict[int, bytes], str, tuple[SnapshotMember, ...],
                                 tuple[RawRecord, ...]]:
    """Split records into the known ones (by type), the cluster id, the members and the
    unknown non-critical ones; an unknown critical record is refused."""
    known: dict[int, bytes] = {}
    extra: list[RawRecord] = []
    for rtype, flags, value in records:
        if rtype in KNOWN_TYPES:
            known[rtype] = value
        elif flags & FLAG_CRITICAL:
            raise SnapshotDescriptorError(
                f"{what}: unknown critical record type {rtype}: written by a newer version")
        else:
            extra.append(RawRecord(rtype, flags, value))
    cluster_id = ""
    if REC_CLUSTER_ID in known:
        try:
            cluster_id = check_cluster_id(known[REC_CLUSTER_ID].decode("ascii"))
        except UnicodeDecodeError:
            raise SnapshotDescriptorError(f"{what}: cluster id is not ASCII") from None
    members = decode_members(known[REC_MEMBERS], what) if REC_MEMBERS in known else ()
    return known, cluster_id, members, tuple(extra)


# -- the descriptor -------------------------------------------------------------------------


def encode_descriptor(desc: SnapshotDescriptor) -> bytes:
    """The bytes of ``desc`` (members sorted by node id)."""
    fsm.decode_snapshot_token(desc.token)  # a valid token, or FSMSnapshotTokenInvalidError
    records = [(REC_PAYLOAD_TOKEN, FLAG_CRITICAL, desc.token),
               *describe_records(desc.cluster_id, desc.members, desc.extra, desc.envelope)]
    body = _PREFIX.pack(DESCRIPTOR_MAGIC, DESCRIPTOR_VERSION) + encode_records(records)
    if len(body) + _CRC.size > MAX_DESCRIPTOR_BYTES:
        raise SnapshotDescriptorError(f"descriptor of {len(body)} bytes is too large")
    return body + _CRC.pack(_crc32c.crc32c(body))


def is_descriptor(data: bytes) -> bool:
    """Whether ``data`` is shaped like a descriptor (it starts with the magic)."""
    return len(data) >= 4 and bytes(data[:4]) == DESCRIPTOR_MAGIC


def decode_descriptor(data: bytes) -> SnapshotDescriptor:
    """Decode and check a descriptor; :class:`SnapshotDescriptorError` for anything wrong."""
    if not is_descriptor(data):
        raise SnapshotDescriptorError("not a snapshot descriptor (bad magic)")
    if len(data) > MAX_DESCRIPTOR_BYTES:
        raise SnapshotDescriptorError(f"descriptor of {len(data)} bytes is too large")
    if len(data) < _PREFIX.size + _U16.size + _CRC.size:
        raise SnapshotDescriptorError(f"descriptor too short ({len(data)} bytes)")
    end = len(data) - _CRC.size
    (crc,) = _CRC.unpack_from(data, end)
    if _crc32c.crc32c(memoryview(data)[:end]) != crc:
        raise SnapshotDescriptorError("descriptor CRC32C mismatch")
    _magic, version = _PREFIX.unpack_from(data)
    if version != DESCRIPTOR_VERSION:
        raise SnapshotDescriptorError(f"unsupported descriptor version {version}")
    records, pos = decode_records(data, _PREFIX.size, end, "descriptor")
    if pos != end:
        raise SnapshotDescriptorError(f"descriptor: {end - pos} trailing bytes")
    known, cluster_id, members, extra = interpret_records(records, "descriptor")
    token = known.get(REC_PAYLOAD_TOKEN)
    if token is None:
        raise SnapshotDescriptorError("descriptor has no payload token")
    try:
        fsm.decode_snapshot_token(token)
    except FSMSnapshotTokenInvalidError as exc:
        raise SnapshotDescriptorError(f"descriptor: {exc}") from None
    return SnapshotDescriptor(token, cluster_id, members, extra,
                              EnvelopeState.from_records(known, "descriptor"))


# -- what a snapshot's data means ------------------------------------------------------------


def descriptor_of(data: bytes) -> SnapshotDescriptor | None:
    """The descriptor ``data`` holds, or None for a bare token or an inline payload."""
    return decode_descriptor(data) if is_descriptor(data) else None


def envelope_of(data: bytes) -> EnvelopeState:
    """The envelope records of a snapshot's ``data`` (none for a bare token or inline data)."""
    desc = descriptor_of(data) if data else None
    return desc.envelope if desc is not None else NO_ENVELOPE


def payload_token(data: bytes) -> bytes | None:
    """The ``.fsm`` token that ``data`` (a descriptor or a bare token) names; None when
    ``data`` is an inline payload."""
    if is_descriptor(data):
        return decode_descriptor(data).token
    if fsm.is_snapshot_token(data):
        return data
    return None


def payload_ref(data: bytes) -> tuple[int, int] | None:
    """``(index, crc)`` of the ``.fsm`` payload ``data`` names, or None (inline payload)."""
    token = payload_token(data)
    return None if token is None else fsm.decode_snapshot_token(token)


def with_token(data: bytes, token: bytes) -> bytes:
    """``data`` naming the payload ``token`` names instead: a descriptor keeps every other
    record; anything else becomes ``token`` itself."""
    if is_descriptor(data):
        return encode_descriptor(attrs.evolve(decode_descriptor(data), token=token))
    return token


def announced_crc(data: bytes, index: int) -> int | None:
    """The payload CRC32C a sender announced in a snapshot's ``data`` (its token for
    ``index``), or None when ``data`` announces none (an inline payload, a damaged
    descriptor, a token for another index)."""
    try:
        ref = payload_ref(data)
    except (SnapshotDescriptorError, FSMSnapshotTokenInvalidError):
        return None
    if ref is None or ref[0] != index:
        return None
    return ref[1]
