"""The fast path for flat KV messages (trio_raft_kv/flatproto.py) against its references:
betterproto2 for encoding and for the client's decoding, the strict path of
trio_raft_kv/replies.py for the server's. Over generated messages and generated (mostly
malformed) bytes, the fast path answers exactly what the reference answers."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import betterproto2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_raft_kv._proto.trio_raft.kv import v1 as pb
from trio_raft_kv.errors import InvalidFieldError
from trio_raft_kv.flatproto import KINDS, FlatCodec, FlatSchema, encode_message
from trio_raft_kv.replies import StrictRequest

MESSAGES = [c for _, c in inspect.getmembers(pb, inspect.isclass)
            if issubclass(c, betterproto2.Message)]
FLAT = [c for c in MESSAGES if FlatSchema.of(c) is not None]

_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "string": st.text(max_size=40),
    "bytes": st.binary(max_size=300),
    "bool": st.booleans(),
    "uint64": st.integers(0, (1 << 64) - 1),
    "uint32": st.integers(0, (1 << 32) - 1),
    "int64": st.integers(-(1 << 63), (1 << 63) - 1),
    "int32": st.integers(-(1 << 31), (1 << 31) - 1),
}


def test_the_kv_hot_messages_are_flat_and_the_others_are_not() -> None:
    for m in (pb.PutRequest, pb.PutResponse, pb.DeleteRequest, pb.CasRequest, pb.StatusResponse):
        assert m in FLAT
    assert FlatSchema.of(pb.GetRequest) is None  # an enum field
    assert FlatSchema.of(pb.MembersResponse) is None  # repeated messages
    assert FlatSchema.of(int) is None


def messages(message_type: type) -> st.SearchStrategy[Any]:
    kinds = {f.name: f.metadata["betterproto"].proto_type
             for f in dataclasses.fields(message_type)}
    assert all(k in KINDS for k in kinds.values())
    return st.fixed_dictionaries({name: _VALUES[k] for name, k in kinds.items()}).map(
        lambda values: message_type(**values))


@pytest.mark.parametrize("message_type", FLAT, ids=lambda c: c.__name__)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_encoding_and_decoding_agree_with_betterproto2(message_type: type, data: Any) -> None:
    message = data.draw(messages(message_type))
    wire = bytes(message)
    assert encode_message(message) == wire
    assert FlatCodec().encode(message, message_type) == wire
    assert FlatCodec().decode(wire, message_type) == message_type.FromString(wire)
    assert StrictRequest(message_type).FromString(wire) == message


def outcome(fn: Any, data: bytes) -> tuple[str, Any]:
    try:
        return "ok", fn(data)
    except InvalidFieldError as exc:
        return "invalid", str(exc)
    except Exception as exc:  # the reference's own kinds of failure
        return type(exc).__name__, None


def _tag(number: int, wire_type: int) -> bytes:
    return encode_message(pb.PutResponse(index=number << 3 | wire_type))[1:] or b"\x00"


#: Integers at the edges of the kinds' ranges (and of bool's).
_EDGES = [0, 1, 2, (1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 32, (1 << 63) - 1, 1 << 63,
          (1 << 64) - 1]

# Field bytes near the canonical subset: right and wrong wire types, unknown and huge field
# numbers, overlong, negative and truncated varints, lengths past the end, bad UTF-8.
_PIECES = st.one_of(
    st.binary(max_size=12),
    st.builds(lambda n, w, v: _tag(n, w) + v, st.integers(1, 20), st.sampled_from([0, 1, 2, 5]),
              st.binary(max_size=6)),
    st.builds(lambda n, v: _tag(n, 0) + encode_message(pb.PutResponse(index=v))[1:],
              st.integers(1, 15), st.integers(0, (1 << 64) - 1) | st.sampled_from(_EDGES)),
    st.builds(lambda n, s: _tag(n, 2) + bytes([len(s)]) + s, st.integers(1, 15),
              st.binary(max_size=20)),
    st.just(b"\x0a\x02\xff\xfe"),
    st.just(b"\x08" + b"\xff" * 9 + b"\x01"),
    st.just(b"\x08" + b"\xff" * 10),
)


@pytest.mark.parametrize("message_type", FLAT, ids=lambda c: c.__name__)
@settings(max_examples=120, deadline=None)
@given(pieces=st.lists(_PIECES, max_size=6))
def test_any_bytes_get_the_reference_answer(message_type: type, pieces: list[bytes]) -> None:
    data = b"".join(pieces)
    strict = StrictRequest(message_type)
    assert outcome(strict.FromString, data) == outcome(strict._strict, data)
    fast = outcome(lambda d: FlatCodec().decode(d, message_type), data)
    reference = outcome(message_type.FromString, data)
    assert fast == reference


def test_a_negative_or_unknown_field_goes_to_betterproto2() -> None:
    m = pb.AdminResponse(index=3)
    m._unknown_fields = b"\x78\x01"  # field 15, kept from an earlier decoding
    assert encode_message(m) == bytes(m)
    with pytest.raises(InvalidFieldError, match="field number 0"):
        StrictRequest(pb.PutRequest).FromString(b"\x00\x01")


def _varint(value: int) -> bytes:
    return encode_message(pb.PutResponse(index=value))[1:] or b"\x00"


@pytest.mark.parametrize("message_type", FLAT, ids=lambda c: c.__name__)
def test_every_field_at_the_edges_gets_the_reference_answer(message_type: type) -> None:
    # Each field with every wire type, the integers at the edges of every kind's range, 10-byte
    # varints, empty, long and non-UTF-8 strings: the same answers as the references.
    strict = StrictRequest(message_type)
    for f in dataclasses.fields(message_type):
        tag = f.metadata["betterproto"].number << 3
        cases = [bytes([tag]) + _varint(v) for v in _EDGES]
        cases += [bytes([tag]) + b"\xff" * 9 + bytes([last]) for last in (0, 1, 2, 0x7F)]
        cases += [bytes([tag | 2]) + _varint(len(s)) + s
                  for s in (b"", b"a", b"\xc3\xa9", b"\xff\xfe", b"x" * 200)]
        cases += [bytes([tag | 2]) + b"\x05ab", bytes([tag | 1]) + b"\x00" * 8,
                  bytes([tag | 5]) + b"\x00" * 4, bytes([tag | 3]), bytes([tag])]
        for data in cases:
            assert outcome(strict.FromString, data) == outcome(strict._strict, data), data
            assert (outcome(lambda d: FlatCodec().decode(d, message_type), data)
                    == outcome(message_type.FromString, data)), data
