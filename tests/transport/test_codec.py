"""The wire frame: round trips and untrusted input."""

from __future__ import annotations

import contextlib
import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_raft.core.messages import (
    ConfState,
    Entry,
    EntryType,
    Message,
    MessageType,
    Snapshot,
    SnapshotMetadata,
)
from trio_raft.errors import CodecError
from trio_raft.transport.codec import (
    MAX_FRAME_BYTES,
    WIRE_VERSION,
    decode_message,
    encode_message,
    encode_snapshot_header,
)

u64 = st.integers(min_value=0, max_value=2**64 - 1)
entries = st.builds(Entry, u64, u64, st.sampled_from(list(EntryType)), st.binary(max_size=64))
snapshots = st.builds(
    Snapshot,
    st.builds(SnapshotMetadata,
              st.builds(ConfState, st.lists(u64, max_size=4), st.lists(u64, max_size=3),
                        st.lists(u64, max_size=2), st.lists(u64, max_size=2), st.booleans()),
              u64, u64),
    st.binary(max_size=64),
)
messages = st.builds(
    Message,
    type=st.sampled_from(list(MessageType)), to=u64, from_=u64, term=u64, log_term=u64,
    index=u64, entries=st.lists(entries, max_size=5).map(tuple), commit=u64,
    snapshot=st.none() | snapshots, reject=st.booleans(), reject_hint=u64,
    context=st.binary(max_size=32),
)


@given(messages)
@settings(max_examples=300, deadline=None)
def test_round_trip(message: Message) -> None:
    frame = encode_message(message)
    assert frame[0] == WIRE_VERSION
    assert decode_message(frame) == message
    assert decode_message(memoryview(frame)) == message
    assert decode_message(bytearray(frame)) == message


@given(st.binary(max_size=512))
@settings(max_examples=4000, deadline=None)
def test_random_bytes_raise_only_codec_error(data: bytes) -> None:
    with contextlib.suppress(CodecError):
        decode_message(data)


@given(messages, st.data())
@settings(max_examples=2000, deadline=None)
def test_mutated_frames_raise_only_codec_error(message: Message, data: st.DataObject) -> None:
    frame = bytearray(encode_message(message))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "truncate", "extend", "huge"]))
        if op == "flip" and frame:
            i = data.draw(st.integers(0, len(frame) - 1))
            frame[i] ^= data.draw(st.integers(1, 255))
        elif op == "truncate":
            del frame[data.draw(st.integers(0, len(frame))):]
        elif op == "extend":
            frame += data.draw(st.binary(min_size=1, max_size=16))
        elif op == "huge" and len(frame) >= 8:
            i = data.draw(st.integers(0, len(frame) - 4))
            frame[i:i + 4] = b"\xff\xff\xff\xf0"
    try:
        out = decode_message(bytes(frame))
    except CodecError:
        return
    assert isinstance(out, Message)


def test_truncated_prefixes_of_a_large_message() -> None:
    msg = Message(MessageType.APP, to=2, from_=1, entries=tuple(
        Entry(1, i, data=os.urandom(50)) for i in range(20)))
    frame = encode_message(msg)
    for n in range(len(frame)):
        with pytest.raises(CodecError):
            decode_message(frame[:n])


def test_version_and_limits() -> None:
    frame = encode_message(Message(MessageType.HEARTBEAT, to=2, from_=1))
    with pytest.raises(CodecError, match="version"):
        decode_message(bytes([2]) + frame[1:])
    with pytest.raises(CodecError, match="empty"):
        decode_message(b"")
    with pytest.raises(CodecError, match="exceeds"):
        decode_message(frame, max_bytes=len(frame) - 1)
    with pytest.raises(CodecError, match="exceeds"):
        encode_message(Message(MessageType.APP, entries=(Entry(1, 1, data=b"x" * 100),)),
                       max_bytes=64)
    with pytest.raises(CodecError):
        encode_message(Message(MessageType.APP, term=-1))
    assert MAX_FRAME_BYTES == 64 << 20


def test_huge_declared_lengths_do_not_allocate() -> None:
    # An entry count of 2**20 and data length of 2**32-1 in a tiny frame: refused up front.
    rng = random.Random(7)
    msg = Message(MessageType.APP, to=2, from_=1, entries=(Entry(1, 1, data=b"abc"),))
    frame = bytearray(encode_message(msg))
    header = 1 + 1 + 8 * 6 + 1 + 8 + 4  # version + message header up to context length
    count_at = header  # no context: entry count follows
    frame[count_at:count_at + 4] = (1 << 20).to_bytes(4, "big")
    with pytest.raises(CodecError):
        decode_message(bytes(frame))
    frame = bytearray(encode_message(msg))
    data_len_at = count_at + 4 + 8 + 8 + 1
    frame[data_len_at:data_len_at + 4] = (2**32 - 1).to_bytes(4, "big")
    with pytest.raises(CodecError):
        decode_message(bytes(frame))
    for _ in range(200):
        junk = bytes([WIRE_VERSION]) + rng.randbytes(rng.randrange(0, 200))
        with contextlib.suppress(CodecError):
            decode_message(junk)


def test_snapshot_header_drops_payload() -> None:
    snap = Snapshot(SnapshotMetadata(ConfState([1, 2]), 10, 2), b"payload")
    msg = Message(MessageType.SNAP, to=2, from_=1, snapshot=snap)
    header = decode_message(encode_snapshot_header(msg))
    assert header.snapshot is not None
    assert header.snapshot.data == b""
    assert header.snapshot.metadata == snap.metadata
