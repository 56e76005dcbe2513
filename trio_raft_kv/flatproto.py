"""Fast protobuf decoding and encoding of *flat* KV messages, with betterproto2 as the reference.

Most KV messages (``PutRequest``, ``PutResponse``, ``DeleteRequest``...) are flat: singular
scalar fields of the kinds in :data:`KINDS`, nothing nested, repeated, optional or enumerated.
betterproto2 decodes and encodes them by reflection, which on the 2-vCPU machine of
docs/benchmarks.md costs about 13 us to decode a ``PutRequest`` strictly (``replies.py``) and 5
us to encode a ``PutResponse``: a large share of what a kvnode leader spends per streamed write.
:class:`FlatSchema` does the common case in one pass over the bytes instead.

It never decides anything betterproto2 and the strict checks would decide otherwise: the fast
path only accepts the canonical subset below and hands anything else to the reference path
(``fallback``), which then answers (a message or its own error) exactly as before:

* every tag is one byte (field numbers 1 to 15), names a field of the schema and carries the
  wire type of its kind (2 for ``string``/``bytes``, 0 for the integers and ``bool``);
* integers are non-negative and in range of their kind, ``bool`` is 0 or 1, strings are UTF-8;
* length prefixes stay within the message; a field that appears again replaces the earlier
  value (protobuf's rule for scalars, and betterproto2's).

Encoding writes the fields in field-number order, skipping default values, as betterproto2 does;
a message with unknown fields kept from its own decoding, or a negative integer, goes to
betterproto2. tests/kvnode/test_flatproto.py checks both directions against betterproto2 and the
strict path over generated inputs, malformed ones included.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable
from typing import Any

from grpclib.encoding.proto import ProtoCodec

#: The scalar kinds a flat message may hold, with the wire type each is carried in.
KINDS: dict[str, int] = {"string": 2, "bytes": 2, "bool": 0, "uint64": 0, "uint32": 0,
                         "int64": 0, "int32": 0}
_LIMIT = {"bool": 2, "uint64": 1 << 64, "uint32": 1 << 32, "int64": 1 << 63, "int32": 1 << 31}
_DEFAULTS: dict[str, Any] = {"string": "", "bytes": b"", "bool": False, "uint64": 0,
                             "uint32": 0, "int64": 0, "int32": 0}
_BYTE = struct.Struct("B")


class _Fallback(Exception):
    """Not in the canonical subset: the reference path decides."""


@dataclasses.dataclass(frozen=True, slots=True)
class _Field:
    number: int
    name: str
    kind: str
    tag: int


class FlatSchema:
    """How to decode and encode one flat betterproto2 message type (see the module docstring).
    :meth:`of` builds and caches it; None for a type that is not flat."""

    _cache: dict[type, FlatSchema | None] = {}

    def __init__(self, message_type: type, fields: list[_Field]) -> None:
        self.message_type = message_type
        self._fields = sorted(fields, key=lambda f: f.number)
        self._by_tag = {f.tag: f for f in fields}
        self._defaults = {f.name: _DEFAULTS[f.kind] for f in fields}

    @classmethod
    def of(cls, message_type: type) -> FlatSchema | None:
        try:
            return cls._cache[message_type]
        except KeyError:
            pass
        schema = cls._build(message_type)
        cls._cache[message_type] = schema
        return schema

    @classmethod
    def _build(cls, message_type: type) -> FlatSchema | None:
        if not dataclasses.is_dataclass(message_type):
            return None
        fields: list[_Field] = []
        for f in dataclasses.fields(message_type):
            meta = f.metadata.get("betterproto")
            if meta is None:
                return None
            kind = getattr(meta, "proto_type", None)
            if (kind not in KINDS or getattr(meta, "repeated", False)
                    or getattr(meta, "optional", False) or getattr(meta, "map_meta", None)
                    or getattr(meta, "group", None) or getattr(meta, "unwrap", None)
                    or not 1 <= meta.number <= 15):
                return None
            fields.append(_Field(meta.number, f.name, kind, meta.number << 3 | KINDS[kind]))
        return cls(message_type, fields)

    # -- decoding ----------------------------------------------------------------------------
    def decode(self, data: bytes, fallback: Callable[[bytes], Any]) -> Any:
        """The message ``data`` encodes, or what ``fallback(data)`` answers (returns or
        raises) when ``data`` is outside the canonical subset."""
        try:
            values = self._scan(data)
        except _Fallback:
            return fallback(data)
        return self.message_type(**values)

    def _scan(self, data: bytes) -> dict[str, Any]:
        values = dict(self._defaults)
        by_tag, pos, end = self._by_tag, 0, len(data)
        while pos < end:
            field = by_tag.get(data[pos])
            if field is None:
                raise _Fallback
            pos += 1
            value, pos = _varint(data, pos, end)
            if field.tag & 7 == 2:
                stop = pos + value
                if stop > end:
                    raise _Fallback
                raw = data[pos:stop]
                pos = stop
                if field.kind == "string":
                    try:
                        values[field.name] = raw.decode()
                    except UnicodeDecodeError:
                        raise _Fallback from None
                else:
                    values[field.name] = bytes(raw)
            else:
                if value >= _LIMIT[field.kind]:
                    raise _Fallback
                values[field.name] = bool(value) if field.kind == "bool" else value
        return values

    # -- encoding ----------------------------------------------------------------------------
    def encode(self, message: Any, fallback: Callable[[Any], bytes]) -> bytes:
        """The wire bytes of ``message`` (as betterproto2 writes them)."""
        if getattr(message, "_unknown_fields", b""):
            return fallback(message)
        parts: list[bytes] = []
        for field in self._fields:
            value = getattr(message, field.name)
            if not value:
                continue  # a default is not written (proto3)
            if field.kind == "string":
                raw = value.encode()
            elif field.kind == "bytes":
                raw = bytes(value)
            else:
                if value is True:
                    value = 1
                if not 0 <= value < _LIMIT[field.kind]:
                    return fallback(message)
                parts += (_BYTE.pack(field.tag), _encode_varint(value))
                continue
            parts += (_BYTE.pack(field.tag), _encode_varint(len(raw)), raw)
        return b"".join(parts)


def _varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """A varint of at most 10 bytes at ``pos``; anything else is for the reference path."""
    value = shift = 0
    for i in range(pos, min(pos + 10, end)):
        byte = data[i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i + 1
        shift += 7
    raise _Fallback


def _encode_varint(value: int) -> bytes:
    if value < 0x80:
        return _BYTE.pack(value)
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_message(message: Any) -> bytes:
    """``bytes(message)``, through the fast path when the message type is flat."""
    schema = FlatSchema.of(type(message))
    if schema is None:
        return bytes(message)
    return schema.encode(message, bytes)


class FlatCodec(ProtoCodec):
    """grpclib's protobuf codec with the fast path for flat messages (the KV client's)."""

    def encode(self, message: Any, message_type: Any) -> bytes:
        schema = FlatSchema.of(message_type)
        if schema is None or type(message) is not message_type:
            return super().encode(message, message_type)
        return schema.encode(message, bytes)

    def decode(self, data: bytes, message_type: Any) -> Any:
        schema = FlatSchema.of(message_type)
        if schema is None:
            return super().decode(data, message_type)
        return schema.decode(data, message_type.FromString)
