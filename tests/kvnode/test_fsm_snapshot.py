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


def test_a_character_split_across_two_keys_is_refused() -> None:
    # "é" is b"\xc3\xa9": each key alone is not UTF-8, though the two side by side would be.
    split = payload({"a1": b"x", "b2": b"y"}).replace(b"a1", b"a\xc3", 1).replace(
        b"b2", b"\xa9b", 1)
    with pytest.raises(CommandError, match="UTF-8"):
        decode_snapshot(split)
    with pytest.raises(CommandError, match="UTF-8"):
        decode_snapshot(v1_payload({"a1": b"x", "b2": b"y"}, set()).replace(b"a1", b"a\xc3", 1)
                        .replace(b"b2", b"\xa9b", 1))
    fine = {"é": b"1", "\x00": b"2", "日本": b"3", "": b"4"}
    assert decode_snapshot(payload(fine)) == (fine, set())


def test_the_store_answers_by_str_key_and_snapshots_what_it_holds() -> None:
    fsm = KVStateMachine()
    fsm.apply(encode_put("ключ", b"v1"))
    fsm.apply(encode_put("k2", b"v2"))
    assert fsm.get("ключ") == b"v1" and fsm.get("missing") is None and fsm.key_count() == 2
    out = io.BytesIO()
    fsm.snapshot().write_to(out)
    again = KVStateMachine()
    again.restore(io.BytesIO(out.getvalue()))
    assert again.data == {"ключ": b"v1", "k2": b"v2"} and again.get("k2") == b"v2"
    with pytest.raises(UnicodeDecodeError):  # a command whose key is not a string
        fsm.apply(b"P" + struct.pack(">I", 2) + b"\xff\xfe" + b"v")
    assert fsm.key_count() == 2
