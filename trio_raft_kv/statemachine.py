"""The replicated key/value state machine of kvnode, and its command and snapshot encodings.

Keys are strings (UTF-8 on the wire and on disk), values are arbitrary bytes. The store keeps
each key as its UTF-8 bytes, as commands and snapshots carry it, so a snapshot copies keys
without encoding them and a restore keeps them without decoding them (``KVStateMachine.data``
is a str-keyed copy for inspection). Commands are small binary records, so any key or value
round-trips exactly:

    put      b"P" | u32 key_len | key | value
    delete   b"D" | u32 key_len | key
    cas      b"C" | u8 flags (1: expect absent) | u32 key_len | key | u32 exp_len | expected | value
    member   b"M" | member id (UTF-8)          (internal: "this node has been a member with data")

Snapshot payload (written by :meth:`KVSnapshot.write_to` in a worker thread), columnar so that
both directions run mostly in C:

    b"KVS2" | u64 n | n x u32 key_len | n x u32 value_len | n keys | n values
            | u32 member_count | member_count x (u32 id_len | id)

The earlier row layout is still read (``restore`` of an older node's snapshot):

    b"KVS1" | u64 n | n x (u32 key_len | key | u32 value_len | value) | members as above

All integers are big-endian. ``restore`` checks the magic and every length against the data it
has, so a truncated or foreign payload is an error, never a half-restored store.
"""

from __future__ import annotations

import array
import itertools
import struct
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import IO, Any, Protocol

import attrs

from trio_raft_kv.errors import CommandError

SNAPSHOT_MAGIC = b"KVS2"
SNAPSHOT_MAGIC_V1 = b"KVS1"
MAX_KEY_BYTES = 4096
MAX_VALUE_BYTES = 512 * 1024

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_U32_CODE = next(c for c in "IL" if array.array(c).itemsize == 4)


@attrs.frozen
class CasResult:
    swapped: bool
    found: bool
    current: bytes


def _key_bytes(key: str) -> bytes:
    return key.encode("utf-8")


def encode_put(key: str, value: bytes) -> bytes:
    k = _key_bytes(key)
    return b"P" + _U32.pack(len(k)) + k + bytes(value)


def encode_delete(key: str) -> bytes:
    k = _key_bytes(key)
    return b"D" + _U32.pack(len(k)) + k


def encode_cas(key: str, expected: bytes, expect_absent: bool, value: bytes) -> bytes:
    k = _key_bytes(key)
    return (b"C" + bytes([1 if expect_absent else 0]) + _U32.pack(len(k)) + k
            + _U32.pack(len(expected)) + bytes(expected) + bytes(value))


def encode_member(member_id: str) -> bytes:
    return b"M" + member_id.encode("utf-8")


def _take(data: bytes, pos: int) -> tuple[bytes, int]:
    if pos + 4 > len(data):
        raise CommandError("truncated length")
    (n,) = _U32.unpack_from(data, pos)
    pos += 4
    if pos + n > len(data):
        raise CommandError("truncated field")
    return data[pos:pos + n], pos + n


class KVSnapshot:
    """A point-in-time copy of the store (keys and values are immutable bytes: a shallow copy
    suffices). ``data`` maps each key, as its UTF-8 bytes, to its value."""

    def __init__(self, data: Mapping[bytes, bytes], members: set[str]) -> None:
        self._data = dict(data)
        self._members = sorted(members)

    def write_to(self, writer: IO[bytes]) -> int:
        keys = list(self._data)
        values = list(self._data.values())
        tail = [_U32.pack(len(self._members))]
        for member in self._members:
            m = member.encode("utf-8")
            tail += (_U32.pack(len(m)), m)
        parts = (SNAPSHOT_MAGIC + _U64.pack(len(keys)), _u32_array(map(len, keys)),
                 _u32_array(map(len, values)), b"".join(keys), b"".join(values), b"".join(tail))
        for part in parts:  # a few large writes; no copy of the whole payload
            writer.write(part)
        return sum(map(len, parts))

    def close(self) -> None:
        self._data = {}


class KVStore(Protocol):
    """What the KV service needs from a store: the in-memory :class:`KVStateMachine`
    (``--store memory``) or ``trio_raft_kv.sqlstore.SqliteKVStateMachine``
    (``--store sqlite``). Both are trio_raft state machines with the same commands, results
    and snapshot payloads."""

    members: set[str]
    on_members_changed: Callable[[], None] | None

    def get(self, key: str) -> bytes | None: ...

    def key_count(self) -> int: ...

    def apply(self, data: bytes) -> Any: ...

    def snapshot(self) -> Any: ...

    def restore(self, reader: IO[bytes]) -> None: ...

    def flush(self) -> None:
        """Make what was applied durable in the store, if it has one (trio thread)."""

    def close(self) -> None: ...


class KVStateMachine:
    """``apply`` returns: put -> None, delete -> bool (deleted), cas -> :class:`CasResult`.

    ``on_members_changed`` (optional) is called after ``apply`` recorded a member and after
    ``restore``, in the thread that called them: ``apply`` runs in the engine's trio thread,
    ``restore`` in a worker thread (docs/api.md). The serve command waits on it instead of
    polling ``members``.
    """

    def __init__(self, on_members_changed: Callable[[], None] | None = None) -> None:
        #: key (UTF-8 bytes) -> value.
        self._data: dict[bytes, bytes] = {}
        self.members: set[str] = set()
        self.apply_index = 0
        self.snapshots_taken = 0
        self.snapshots_restored = 0
        self.on_members_changed = on_members_changed

    def set_apply_index(self, index: int) -> None:
        self.apply_index = index

    @property
    def data(self) -> dict[str, bytes]:
        """A copy of the store with str keys (for inspection and tests: O(n))."""
        return {k.decode("utf-8"): v for k, v in self._data.items()}

    def get(self, key: str) -> bytes | None:
        return self._data.get(key.encode("utf-8"))

    def key_count(self) -> int:
        return len(self._data)

    def flush(self) -> None:
        """Nothing to do: the store lives in memory."""

    def close(self) -> None:
        """Nothing to do: the store lives in memory."""

    def apply(self, data: bytes) -> Any:
        if not data:
            return None  # not one of ours (e.g. an empty entry): nothing to do
        op = data[:1]
        if op == b"P":
            key, pos = _take(data, 1)
            self._data[_utf8(key)] = bytes(data[pos:])
            return None
        if op == b"D":
            key, _ = _take(data, 1)
            return self._data.pop(_utf8(key), None) is not None
        if op == b"C":
            if len(data) < 2:
                raise CommandError("truncated cas")
            expect_absent = bool(data[1] & 1)
            raw_key, pos = _take(data, 2)
            expected, pos = _take(data, pos)
            cas_key = _utf8(raw_key)
            current = self._data.get(cas_key)
            if expect_absent:
                swapped = current is None
            else:
                swapped = current is not None and current == expected
            if swapped:
                self._data[cas_key] = bytes(data[pos:])
            return CasResult(swapped, current is not None, current or b"")
        if op == b"M":
            self.members.add(data[1:].decode("utf-8"))
            if self.on_members_changed is not None:
                self.on_members_changed()
            return None
        return None  # unknown opcodes from a newer version are ignored, deterministically

    def snapshot(self) -> KVSnapshot:
        self.snapshots_taken += 1
        return KVSnapshot(self._data, self.members)

    def restore(self, reader: IO[bytes]) -> None:
        blob = reader.read()
        data, members = decode_snapshot_raw(blob)
        self._data, self.members = data, members
        self.snapshots_restored += 1
        if self.on_members_changed is not None:
            self.on_members_changed()


def _utf8(key: bytes) -> bytes:
    """``key`` as bytes, checked to be UTF-8 (a command from the log: keys are strings)."""
    key.decode("utf-8")
    return bytes(key)


def _u32_array(lengths: Iterable[int]) -> bytes:
    a = array.array(_U32_CODE, lengths)
    if sys.byteorder == "little":
        a.byteswap()
    return a.tobytes()


def _read_u32_array(blob: bytes, pos: int, count: int) -> list[int]:
    a = array.array(_U32_CODE)
    a.frombytes(blob[pos:pos + 4 * count])
    if sys.byteorder == "little":
        a.byteswap()
    return a.tolist()


def _slices(blob: bytes, start: int, lengths: list[int]) -> tuple[list[bytes], int]:
    ends = list(itertools.accumulate(lengths, initial=start))
    return [blob[a:b] for a, b in itertools.pairwise(ends)], ends[-1]


def decode_snapshot(blob: bytes) -> tuple[dict[str, bytes], set[str]]:
    """The store (str keys) and members a snapshot payload holds; CommandError when damaged."""
    data, members = decode_snapshot_raw(blob)
    return {k.decode("utf-8"): v for k, v in data.items()}, members


def decode_snapshot_raw(blob: bytes) -> tuple[dict[bytes, bytes], set[str]]:
    """:func:`decode_snapshot` with each key kept as its (checked) UTF-8 bytes."""
    if not blob:
        return {}, set()
    if blob[:4] not in (SNAPSHOT_MAGIC, SNAPSHOT_MAGIC_V1) or len(blob) < 12:
        raise CommandError("not a kvnode snapshot (bad magic)")
    (count,) = _U64.unpack_from(blob, 4)
    pos = 12
    data: dict[bytes, bytes] = {}
    if blob[:4] == SNAPSHOT_MAGIC_V1:
        for _ in range(count):
            key, pos = _take(blob, pos)
            value, pos = _take(blob, pos)
            data[key] = value
    else:
        if 8 * count > len(blob) - pos:
            raise CommandError("truncated snapshot (entry lengths)")
        klens = _read_u32_array(blob, pos, count)
        vlens = _read_u32_array(blob, pos + 4 * count, count)
        pos += 8 * count
        if pos + sum(klens) + sum(vlens) > len(blob):
            raise CommandError("truncated snapshot (keys and values)")
        keys, pos = _slices(blob, pos, klens)
        values, pos = _slices(blob, pos, vlens)
        data = dict(zip(keys, values, strict=True))
        if len(data) != count:
            raise CommandError("duplicate keys in snapshot")
    members: set[str] = set()
    if pos + 4 > len(blob):
        raise CommandError("truncated snapshot")
    (mcount,) = _U32.unpack_from(blob, pos)
    pos += 4
    for _ in range(mcount):
        member, pos = _take(blob, pos)
        members.add(member.decode("utf-8"))
    if pos != len(blob):
        raise CommandError(f"{len(blob) - pos} trailing bytes in snapshot")
    try:
        # One check for every key: a NUL between two keys ends any character, so the whole
        # decodes if and only if each key does.
        b"\0".join(data).decode("utf-8")
    except UnicodeDecodeError:
        raise CommandError("snapshot key is not UTF-8") from None
    return data, members
