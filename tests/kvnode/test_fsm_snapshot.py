"""kvnode's snapshot payload: round trips, reads the older layout, refuses damaged input."""

from __future__ import annotations

import io
import struct

import pytest

from trio_raft_kv.statemachine import (
    SNAPSHOT_MAGIC_V1,
    CommandError,
    KVStateMachine,
    decode_snapshot,
    encode_put,
)


def payload(data: dict[str, bytes], members: frozenset[str] = frozenset()) -> bytes:
    fsm = KVStateMachine()
    for k, v in data.items():
        fsm.apply(encode_put(k, v))
    fsm.members = set(members)
    out = io.BytesIO()
    snap = fsm.snapshot()
    n = snap.write_to(out)
    assert n == len(out.getvalue())
    return out.getvalue()


def v1_payload(data: dict[str, bytes], members: set[str]) -> bytes:
    parts = [SNAPSHOT_MAGIC_V1, struct.pack(">Q", len(data))]
    for k, v in data.items():
        kb = k.encode()
        parts += (struct.pack(">I", len(kb)), kb, struct.pack(">I", len(v)), v)
    parts.append(struct.pack(">I", len(members)))
    for m in sorted(members):
        parts += (struct.pack(">I", len(m)), m.encode())
    return b"".join(parts)


DATA = {"a": b"1", "ключ": b"\x00\xff" * 300, "empty": b"", "k" * 4096: b"v"}


def test_round_trip_bytes_safe_keys_values_and_members() -> None:
    blob = payload(DATA, frozenset({"n1", "n2"}))
    assert decode_snapshot(blob) == (DATA, {"n1", "n2"})
    fsm = KVStateMachine()
    fsm.restore(io.BytesIO(blob))
    assert fsm.data == DATA and fsm.members == {"n1", "n2"}
    assert decode_snapshot(payload({})) == ({}, set())


def test_reads_the_row_layout_of_earlier_versions() -> None:
    assert decode_snapshot(v1_payload(DATA, {"n3"})) == (DATA, {"n3"})


@pytest.mark.parametrize("cut", [5, 12, 20, 40, -1])
def test_truncated_payloads_are_refused(cut: int) -> None:
    blob = payload(DATA, frozenset({"n1"}))
    with pytest.raises(CommandError):
        decode_snapshot(blob[:cut])


def test_damaged_payloads_are_refused_and_leave_the_store_alone() -> None:
    blob = payload(DATA, frozenset({"n1"}))
    with pytest.raises(CommandError):
        decode_snapshot(b"XXXX" + blob[4:])
    with pytest.raises(CommandError):
        decode_snapshot(blob + b"\x00")  # trailing bytes
    huge = blob[:4] + struct.pack(">Q", 1 << 40) + blob[12:]  # a count no payload could hold
    with pytest.raises(CommandError):
        decode_snapshot(huge)
    bad_utf8 = payload({"ab": b"v"}).replace(b"ab", b"\xff\xfe", 1)
    fsm = KVStateMachine()
    fsm.apply(encode_put("keep", b"me"))
    with pytest.raises(CommandError):
        fsm.restore(io.BytesIO(bad_utf8))
    assert fsm.data == {"keep": b"me"}
