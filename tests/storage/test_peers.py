"""The peers file: layout, versions, limits, seed handling, monotonic index, atomic writes."""

from __future__ import annotations

import os
import struct

import pytest

from trio_raft.errors import PeersFileError
from trio_raft.storage import peers as pf
from trio_raft.storage.peers import PersistedPeer

A = PersistedPeer(3, "n3", "h3:1", "voter")
B = PersistedPeer(1, "n1", "h1:1", "voter")
C = PersistedPeer(2, "n2", "", "learner")


def test_round_trip_sorted_v3(tmp_path) -> None:
    f = pf.PeersFile(7, (A, B, C), (B,), True)
    data = pf.encode_peers_file(f)
    assert data[:8] == b"TRFP\x00\x00\x00\x03"
    got = pf.decode_peers_file(data)
    assert got.peers == (B, C, A) and got.seed == (B,) and got.seed_active and got.index == 7


def test_suffrage_validated() -> None:
    with pytest.raises(ValueError, match="suffrage"):
        PersistedPeer(1, "n1", "a", "observer")


def _peer_v(p: PersistedPeer, version: int) -> bytes:
    out = struct.pack(">Q", p.node_id)
    if version >= 2:
        out += bytes((0 if p.suffrage == "voter" else 1,))
    return out + struct.pack(">I", len(p.id)) + p.id.encode() + struct.pack(
        ">I", len(p.address)) + p.address.encode()


def test_reads_v1_and_v2() -> None:
    v1 = b"TRFP" + struct.pack(">IQI", 1, 5, 1) + _peer_v(C, 1)
    got = pf.decode_peers_file(v1)
    assert got.version == 1 and got.peers == (PersistedPeer(2, "n2", "", "voter"),)
    v2 = b"TRFP" + struct.pack(">IQI", 2, 5, 1) + _peer_v(C, 2)
    got = pf.decode_peers_file(v2)
    assert got.peers == (C,) and got.seed == () and not got.seed_active


@pytest.mark.parametrize("data,match", [
    (b"EKVP" + struct.pack(">IQI", 3, 1, 0) + b"\x00" + bytes(4), "invalid peers magic"),
    (b"TRFP" + struct.pack(">IQI", 4, 1, 0), "unsupported peers version 4"),
    (b"TRFP" + struct.pack(">IQI", 2, 1, 1) + struct.pack(">QB", 1, 7), "suffrage byte 7"),
    (b"TRFP" + struct.pack(">IQI", 3, 1, 0) + b"\x02" + bytes(4), "seed active byte 2"),
    (b"TRFP" + struct.pack(">IQI", 3, 1, 1025), "exceed 1024"),
    (b"TRFP" + struct.pack(">IQI", 2, 1, 1) + struct.pack(">QBI", 1, 0, (1 << 20) + 1),
     "length .* exceeds limit"),
    (b"TRFP" + struct.pack(">IQI", 2, 1, 1) + struct.pack(">QBI", 1, 0, 10) + b"abc",
     "truncated peer id"),
    (b"TRFP\x00\x00", "truncated header"),
    (b"TRFP" + struct.pack(">IQI", 2, 1, 0) + b"x", "trailing bytes"),
    (b"TRFP" + struct.pack(">IQI", 2, 1, 1) + struct.pack(">QBI", 1, 0, 1) + b"\xff",
     "not UTF-8"),
])
def test_decode_errors(data: bytes, match: str) -> None:
    with pytest.raises(PeersFileError, match=match):
        pf.decode_peers_file(data)


def test_encode_limits() -> None:
    many = tuple(PersistedPeer(i, f"n{i}", "a") for i in range(1025))
    with pytest.raises(PeersFileError):
        pf.encode_peers_file(pf.PeersFile(1, many))
    with pytest.raises(PeersFileError):
        pf.encode_peers_file(pf.PeersFile(1, (PersistedPeer(1, "x" * ((1 << 20) + 1), ""),)))


def test_save_seed_and_monotonic_index(tmp_path) -> None:
    d = str(tmp_path)
    assert pf.load_persisted_peers(d) is None
    assert pf.save_persisted_peers(d, 1, [A, B], seed=[B, A])
    got = pf.load_persisted_peers(d)
    assert got is not None and got.seed_active and got.seed == (B, A)
    # same peers again: the seed stays active
    assert pf.save_persisted_peers(d, 2, [A, B])
    assert pf.load_persisted_peers(d).seed_active  # type: ignore[union-attr]
    # lower index: no-op
    assert not pf.save_persisted_peers(d, 1, [C])
    assert pf.load_persisted_peers(d).peers == (B, A)  # type: ignore[union-attr]
    # a different configuration deactivates the seed but keeps it
    assert pf.save_persisted_peers(d, 3, [A, B, C])
    got = pf.load_persisted_peers(d)
    assert got is not None and not got.seed_active and got.seed == (B, A) and got.index == 3


def test_write_current_always_writes_and_deactivates(tmp_path) -> None:
    d = str(tmp_path)
    pf.save_persisted_peers(d, 10, [A], seed=[A])
    pf.write_current_persisted_peers(d, 4, [A])
    got = pf.load_persisted_peers(d)
    assert got is not None and got.index == 4 and not got.seed_active and got.seed == (A,)


def test_atomic_write_leaves_no_temp_and_cleans_stale(tmp_path) -> None:
    d = str(tmp_path)
    pf.save_persisted_peers(d, 1, [A])
    assert os.listdir(d) == [pf.PEERS_FILE_NAME]
    stale = tmp_path / (pf.PEERS_FILE_NAME + ".tmp-abc")
    stale.write_bytes(b"junk")
    pf.load_persisted_peers(d)
    assert not stale.exists()


def test_corrupt_file_on_disk(tmp_path) -> None:
    (tmp_path / pf.PEERS_FILE_NAME).write_bytes(b"garbage!")
    with pytest.raises(PeersFileError, match=pf.PEERS_FILE_NAME):
        pf.load_persisted_peers(tmp_path)
