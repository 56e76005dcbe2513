"""Snapshot descriptors, ``.snap`` version 2, the cluster id file, and a descriptor crossing a
snapshot exchange (sender's records kept, local token swapped in)."""

from __future__ import annotations

import struct
from pathlib import Path

import crc32c
import pytest

from trio_raft.core.messages import ConfState, Snapshot, SnapshotMetadata
from trio_raft.errors import (
    ClusterIdFileError,
    SnapshotDescriptorError,
    SnapshotFileError,
)
from trio_raft.storage import descriptor as d
from trio_raft.storage import fsm_snapshot as fsm
from trio_raft.storage import snapshots as snaps
from trio_raft.storage.cluster_id import (
    cluster_id_path,
    load_cluster_id,
    new_cluster_id,
    save_cluster_id,
)
from trio_raft.storage.snapshot_exchange import SnapshotExchange

TOKEN = fsm.encode_snapshot_token(42, 0xCAFEBABE)
MEMBERS = (d.SnapshotMember(7, "n2", "10.0.0.2:7001"),
           d.SnapshotMember(3, "n1", "10.0.0.1:7001"),
           d.SnapshotMember(9, "n4", "[::1]:7004", d.LEARNER))


def sample(**kw: object) -> d.SnapshotDescriptor:
    fields: dict[str, object] = {"token": TOKEN, "cluster_id": "c0ffee",
                                 "members": MEMBERS}
    fields.update(kw)
    return d.SnapshotDescriptor(**fields)  # type: ignore[arg-type]


def raw_descriptor(records: list[tuple[int, int, bytes]]) -> bytes:
    body = b"TRSD\x01" + d.encode_records(records)
    return body + struct.pack(">I", crc32c.crc32c(body))


def test_round_trip_sorts_members_and_names_the_payload() -> None:
    data = d.encode_descriptor(sample())
    assert d.is_descriptor(data) and not fsm.is_snapshot_token(data)
    got = d.decode_descriptor(data)
    assert got.token == TOKEN and got.cluster_id == "c0ffee"
    assert [m.node_id for m in got.members] == [3, 7, 9]
    assert got.member(9) == MEMBERS[2]
    assert d.payload_token(data) == TOKEN and d.payload_ref(data) == (42, 0xCAFEBABE)
    # a bare token and an inline payload keep their old meaning
    assert d.payload_ref(TOKEN) == (42, 0xCAFEBABE) and d.descriptor_of(TOKEN) is None
    assert d.payload_ref(b'{"inline": 1}') is None


def test_every_damaged_byte_is_refused() -> None:
    data = d.encode_descriptor(sample())
    for i in range(len(data)):
        bad = bytearray(data)
        bad[i] ^= 0x40
        with pytest.raises(SnapshotDescriptorError):
            d.decode_descriptor(bytes(bad))
    for n in range(len(data)):
        with pytest.raises(SnapshotDescriptorError):
            d.decode_descriptor(data[:n])


def test_unknown_records_critical_refused_others_kept_verbatim() -> None:
    token_rec = (d.REC_PAYLOAD_TOKEN, d.FLAG_CRITICAL, TOKEN)
    with pytest.raises(SnapshotDescriptorError, match="critical record type 99"):
        d.decode_descriptor(raw_descriptor([token_rec, (99, d.FLAG_CRITICAL, b"x")]))
    with pytest.raises(SnapshotDescriptorError, match="unknown flags"):
        d.decode_descriptor(raw_descriptor([token_rec, (99, 0x02, b"x")]))
    with pytest.raises(SnapshotDescriptorError, match="twice"):
        d.decode_descriptor(raw_descriptor([token_rec, token_rec]))
    with pytest.raises(SnapshotDescriptorError, match="no payload token"):
        d.decode_descriptor(raw_descriptor([(d.REC_CLUSTER_ID, 0, b"abc")]))
    with pytest.raises(SnapshotDescriptorError, match="version"):
        body = b"TRSD\x02" + d.encode_records([token_rec])
        d.decode_descriptor(body + struct.pack(">I", crc32c.crc32c(body)))
    kept = d.decode_descriptor(raw_descriptor([token_rec, (200, 0, b"future")]))
    assert kept.extra == (d.RawRecord(200, 0, b"future"),)
    # swapping the token (what a receiver does) keeps the unknown record
    other = fsm.encode_snapshot_token(42, 1)
    again = d.decode_descriptor(d.with_token(d.encode_descriptor(kept), other))
    assert again.token == other and again.extra == kept.extra


def test_bad_fields_are_refused_when_encoding() -> None:
    with pytest.raises(SnapshotDescriptorError):
        d.encode_descriptor(sample(cluster_id="has space"))
    with pytest.raises(SnapshotDescriptorError):
        d.encode_descriptor(sample(members=(d.SnapshotMember(1, "x", "h:1", "observer"),)))
    with pytest.raises(fsm.FSMSnapshotTokenInvalidError):
        d.encode_descriptor(sample(token=b"short"))


def test_announced_crc() -> None:
    data = d.encode_descriptor(sample())
    assert d.announced_crc(data, 42) == 0xCAFEBABE
    assert d.announced_crc(data, 41) is None  # a token for another index announces nothing
    assert d.announced_crc(TOKEN, 42) == 0xCAFEBABE
    assert d.announced_crc(b"inline", 42) is None
    assert d.announced_crc(data[:-1], 42) is None


def test_snap_file_versions(tmp_path: Path) -> None:
    meta = SnapshotMetadata(ConfState([3, 7], [9]), 42, 5)
    sn = snaps.Snapshotter(tmp_path)
    v2 = Snapshot(meta, d.encode_descriptor(sample()))
    path = sn.save(v2)
    raw = Path(path).read_bytes()
    assert raw[:5] == b"TRSN\x02"
    assert sn.load(path) == v2
    v1 = Snapshot(meta, TOKEN)
    assert snaps.encode_snap_file(v1)[:5] == b"TRSN\x01"  # older data keeps version 1
    assert snaps.decode_snap_file(snaps.encode_snap_file(v1)) == v1
    # a version 2 file whose data is not a valid descriptor is refused (CRC of the file OK)
    bad = Snapshot(meta, d.encode_descriptor(sample())[:-1] + b"\x00")
    body = snaps.encode_snap_file(bad)
    assert body[:5] == b"TRSN\x02"
    with pytest.raises(SnapshotFileError, match="descriptor"):
        snaps.decode_snap_file(body)
    future = bytearray(raw)
    future[4] = 3
    with pytest.raises(SnapshotFileError, match="unsupported version 3"):
        snaps.decode_snap_file(bytes(future))


def test_cluster_id_file(tmp_path: Path) -> None:
    assert load_cluster_id(tmp_path) is None
    cid = new_cluster_id()
    assert len(cid) == 32 and int(cid, 16) >= 0 and cid != new_cluster_id()
    save_cluster_id(tmp_path, cid)
    assert load_cluster_id(tmp_path) == cid
    raw = Path(cluster_id_path(tmp_path)).read_bytes()
    for i in range(len(raw)):
        bad = bytearray(raw)
        bad[i] ^= 0x01
        Path(cluster_id_path(tmp_path)).write_bytes(bytes(bad))
        with pytest.raises(ClusterIdFileError):
            load_cluster_id(tmp_path)
    Path(cluster_id_path(tmp_path)).write_bytes(raw + b"x")
    with pytest.raises(ClusterIdFileError):
        load_cluster_id(tmp_path)
    with pytest.raises(ValueError):
        save_cluster_id(tmp_path, "")


def test_exchange_keeps_the_senders_descriptor(tmp_path: Path) -> None:
    payload = b"state machine bytes" * 100
    crc = crc32c.crc32c(payload)
    sender_data = d.encode_descriptor(sample(token=fsm.encode_snapshot_token(42, crc)))
    ex = SnapshotExchange(tmp_path / "fsm", lambda: 0)
    incoming = ex.begin_incoming(42)
    incoming.write(payload)
    data = incoming.finalize(d.announced_crc(sender_data, 42), sender_data)
    got = d.decode_descriptor(data)
    assert got.token == fsm.encode_snapshot_token(42, crc)
    assert got.cluster_id == "c0ffee" and got.members == d.decode_descriptor(sender_data).members
    # the sending side reads the file a descriptor names
    with ex.open_outgoing(data) as out:
        assert out is not None and out.read(1 << 20) == payload
    # an older sender (bare token) gets a bare local token back
    incoming = ex.begin_incoming(43)
    incoming.write(payload)
    assert incoming.finalize(crc, fsm.encode_snapshot_token(43, crc)) == \
        fsm.encode_snapshot_token(43, crc)
