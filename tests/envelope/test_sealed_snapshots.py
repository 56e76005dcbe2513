"""Sealed snapshots in the engine: payloads sealed after the cutover, keys and cutover carried by
the snapshot descriptor, a wiped follower caught up from a sealed snapshot, rotation, compaction
that leaves no cleartext, and the typed errors for a node that cannot read what it holds."""

from __future__ import annotations

import os

import pytest
import trio

import trio_raft
from tests.engine.test_single_node import cfg
from tests.envelope.helpers import RecordingKV, open_cipher
from trio_raft import errors
from trio_raft.core.messages import Snapshot
from trio_raft.storage import fsm_snapshot as fsm
from trio_raft.storage.cutover import CUTOVER_FILE, load_cutover
from trio_raft.storage.descriptor import decode_descriptor, with_token
from trio_raft.storage.recovery import FSM_DIR, SNAP_DIR
from trio_raft.storage.snapshots import Snapshotter
from trio_raft.testing.cluster import open_memory_cluster

NAMES = ["n1", "n2", "n3"]


def all_bytes(root: str) -> dict[str, bytes]:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[path] = f.read()
    return out


def files_with(root: str, needle: bytes) -> list[str]:
    return sorted(p for p, data in all_bytes(root).items() if needle in data)


def newest_descriptor(data_dir: str):
    snapper = Snapshotter(os.path.join(data_dir, SNAP_DIR))
    snap = snapper.load(snapper.files()[-1].path)
    return snap, decode_descriptor(snap.data)



async def start_with_ciphers(c, tmp_path, kek):
    """Start every node with its own cipher: (ciphers, leader, its name, a follower's)."""
    ciphers = {n: open_cipher(tmp_path, n, kek) for n in NAMES}
    for n in NAMES:
        await c.start(n, raft_cipher=ciphers[n])
    leader = await c.wait_for_leader()
    lname = c.leader_name()
    return ciphers, leader, lname, next(n for n in NAMES if n != lname)


async def remove_and_wipe(c, leader, follower: str) -> None:
    """Remove ``follower`` from the cluster, wait for it to stop, wipe its data dir."""
    await leader.remove_server(follower)
    with trio.fail_after(30):
        await c.nodes[follower].stopped.wait()
    c.wipe(follower)

async def test_single_node_snapshots_are_sealed_after_the_cutover(tmp_path, kek):
    cipher = open_cipher(tmp_path, "n1", kek)
    data_dir = str(tmp_path / "n1")
    c = cfg(tmp_path, RecordingKV(), raft_cipher=cipher, snapshot_every=5,
            snapshot_catchup_entries=0)
    async with trio_raft.open_engine(c) as engine:
        for i in range(6):
            await engine.propose(b"set before%d CLEAR-%d" % (i, i))
        cutover = await engine.enable_raft_envelope(cipher)
        for i in range(12):
            await engine.propose(b"set after%d SECRET-%d" % (i, i))
        first_key = engine.envelope_status().active_key_id
        await engine.compact_now()
        _snap, desc = newest_descriptor(data_dir)
        env = desc.envelope
        assert env.cutover_index == cutover and env.sealed_key_id == first_key
        assert env.key_ring is not None and env.key_ring.active == first_key
        assert [k for k, _ in env.key_ring.keys] == [first_key]
        assert cipher.keystore is not None
        assert cipher.keystore.key_bytes(first_key) not in b"".join(
            all_bytes(data_dir).values())  # only ever sealed with the KEK
        # The scrub left no cleartext anywhere in the data dir: neither the values written
        # before the cutover (WAL, older .fsm files) nor those after it.
        assert files_with(data_dir, b"CLEAR-") == []
        assert files_with(data_dir, b"SECRET-") == []
        assert engine.envelope_status().counts.payloads_sealed >= 1
        assert engine.envelope_status().kek_fingerprint == kek.fingerprint
        new_key = await engine.rotate_raft_key()
        await engine.propose(b"set rotated SECRET-rot")
        await engine.compact_now()
        _snap2, desc2 = newest_descriptor(data_dir)
        assert desc2.envelope.sealed_key_id == new_key != first_key
        assert {k for k, _ in desc2.envelope.key_ring.keys} == {first_key, new_key}
    # A restart restores the sealed payload with the node's cipher.
    again = RecordingKV()
    async with trio_raft.open_engine(cfg(tmp_path, again, raft_cipher=cipher)) as engine:
        assert engine.open_report().restored
        assert again.data["after11"] == "SECRET-11" and again.data["before0"] == "CLEAR-0"
        assert again.data["rotated"] == "SECRET-rot"


async def test_restart_without_a_cipher_refuses_the_sealed_snapshot(tmp_path, kek):
    cipher = open_cipher(tmp_path, "n1", kek)
    async with trio_raft.open_engine(cfg(tmp_path, RecordingKV(), raft_cipher=cipher)) as engine:
        await engine.enable_raft_envelope(cipher)
        await engine.propose(b"set a SECRET")
        await engine.compact_now()
    with pytest.raises(errors.RaftUnwrapFailedError, match="no raft cipher is wired"):
        async with trio_raft.open_engine(cfg(tmp_path, RecordingKV())):
            pass


async def test_damaged_sealed_snapshot_is_a_typed_error_naming_the_file(tmp_path, kek):
    cipher = open_cipher(tmp_path, "n1", kek)
    data_dir = str(tmp_path / "n1")
    async with trio_raft.open_engine(cfg(tmp_path, RecordingKV(), raft_cipher=cipher)) as engine:
        await engine.enable_raft_envelope(cipher)
        await engine.propose(b"set a " + b"SECRET" * 100)
        index = await engine.compact_now()
    path = fsm.fsm_snapshot_path(os.path.join(data_dir, FSM_DIR), index)
    with open(path, "r+b") as f:  # flip a byte inside the sealed stream, fix the CRC footer
        data = bytearray(f.read())
        data[100] ^= 0x40
        payload = bytes(data[:-4])
        f.seek(0)
        f.write(payload + fsm.crc32c(payload).to_bytes(4, "big"))
    # A deliberate forgery: the descriptor's token is made to match the damaged file, so the
    # CRC checks pass and only the sealed stream's tags can tell.
    snap, _desc = newest_descriptor(data_dir)
    forged = with_token(snap.data, fsm.encode_snapshot_token(index, fsm.crc32c(payload)))
    Snapshotter(os.path.join(data_dir, SNAP_DIR)).save(Snapshot(snap.metadata, forged))
    fsm_ = RecordingKV()
    with pytest.raises(errors.SealedSnapshotIntegrityError, match=rf"{path}: chunk 0"):
        async with trio_raft.open_engine(cfg(tmp_path, fsm_, raft_cipher=cipher)):
            pass
    assert fsm_.log == [] and fsm_.data == {}  # nothing of the damaged payload restored


async def test_wrong_key_material_is_refused(tmp_path, kek):
    cipher = open_cipher(tmp_path, "n1", kek)
    async with trio_raft.open_engine(cfg(tmp_path, RecordingKV(), raft_cipher=cipher)) as engine:
        await engine.enable_raft_envelope(cipher)
        await engine.propose(b"set a SECRET")
        await engine.compact_now()
    # Another key store with its own key 1: the snapshot's ring does not install over it and
    # the payload does not verify under it.
    other = open_cipher(tmp_path, "other", kek)
    other.keystore.install(1, os.urandom(32))
    with pytest.raises(errors.SealedSnapshotIntegrityError, match=r"\.fsm: chunk 0"):
        async with trio_raft.open_engine(cfg(tmp_path, RecordingKV(), raft_cipher=other)):
            pass


async def test_wiped_follower_catches_up_from_a_sealed_snapshot(tmp_path, clock, kek):
    async with open_memory_cluster(tmp_path / "data", NAMES, RecordingKV, start=False,
                                   snapshot_every=8, snapshot_catchup_entries=0) as c:
        ciphers, leader, lname, follower = await start_with_ciphers(c, tmp_path, kek)
        for i in range(10):
            await leader.propose(b"set pre%d CLEAR-%d" % (i, i))
        cutover = await leader.enable_raft_envelope(ciphers[lname])
        for i in range(30):
            await leader.propose(b"set post%d SECRET-%d" % (i, i))
        await c.wait_applied(leader.applied_index())
        await leader.compact_now()
        # Replace the follower (docs/operations.md): removed, wiped (data dir, cutover file
        # and key store all gone), started empty, added back as a learner.
        await remove_and_wipe(c, leader, follower)
        keys_dir = tmp_path / f"keys-{follower}"
        for name in os.listdir(keys_dir):
            os.unlink(keys_dir / name)
        fresh = open_cipher(tmp_path, follower, kek)
        assert fresh.active_key_id == 0
        for i in range(5):
            await leader.propose(b"set late%d SECRET-L%d" % (i, i))
        h = c.nodes[follower]
        await c.start(follower, raft_cipher=fresh, bootstrap=False)
        await leader.add_learner(follower, h.address)
        await c.wait_applied(leader.applied_index(), [follower])
        eng = c.engine(follower)
        assert eng.counters().snapshots_installed == 1
        assert eng.raft_cutover_index() == cutover
        assert load_cutover(h.data_dir) == cutover
        assert fresh.active_key_id == ciphers[lname].active_key_id
        await leader.propose(b"set last SECRET-last")
        await c.wait_applied(leader.applied_index(), [follower])
        fsm_ = h.fsm
        expected = {**{f"pre{i}": f"CLEAR-{i}" for i in range(10)},
                    **{f"post{i}": f"SECRET-{i}" for i in range(30)},
                    **{f"late{i}": f"SECRET-L{i}" for i in range(5)}, "last": "SECRET-last"}
        assert fsm_.data == expected
        # What it received travelled sealed and is stored sealed.
        assert files_with(h.data_dir, b"SECRET-") == []
        assert files_with(h.data_dir, b"CLEAR-") == []
        assert os.path.exists(os.path.join(h.data_dir, CUTOVER_FILE))


async def test_follower_without_a_cipher_stops_on_a_sealed_snapshot(tmp_path, clock, kek):
    async with open_memory_cluster(tmp_path / "data", NAMES, RecordingKV, start=False,
                                   snapshot_every=5, snapshot_catchup_entries=0) as c:
        ciphers, leader, lname, follower = await start_with_ciphers(c, tmp_path, kek)
        await leader.enable_raft_envelope(ciphers[lname])
        for i in range(12):
            await leader.propose(b"set k%d SECRET-%d" % (i, i))
        await c.wait_applied(leader.applied_index())
        await leader.compact_now()
        await remove_and_wipe(c, leader, follower)
        fsm_before = c.nodes[follower]
        await c.start(follower, bootstrap=False)  # no raft cipher
        await leader.add_learner(follower, fsm_before.address)
        with trio.fail_after(30):
            await c.nodes[follower].stopped.wait()
        err = c.nodes[follower].error
        while isinstance(err, BaseExceptionGroup) and len(err.exceptions) == 1:
            err = err.exceptions[0]
        assert isinstance(err, errors.RaftUnwrapFailedError), err
        assert "no raft cipher is wired" in str(err)
        assert "SECRET" not in repr(fsm_before.fsm.data)


async def test_metrics_count_wraps_unwraps_and_sealed_payloads(tmp_path, kek):
    from prometheus_client import CollectorRegistry

    from tests.engine.test_metrics import samples, value
    from trio_raft.metrics import RaftMetrics

    registry = CollectorRegistry()
    node = RaftMetrics(registry).engine("n1")
    cipher = open_cipher(tmp_path, "n1", kek)
    async with trio_raft.open_engine(cfg(tmp_path, RecordingKV(), raft_cipher=cipher,
                                         observer=node)) as engine:
        node.attach(engine)
        got = samples(registry)
        assert value(got, "trio_raft_envelope_on", node="n1") == 0
        cutover = await engine.enable_raft_envelope(cipher)
        for i in range(3):
            await engine.propose(b"set k%d SECRET" % i)
        await engine.compact_now()
        node.refresh()
        got = samples(registry)
        assert value(got, "trio_raft_envelope_on", node="n1") == 1
        assert value(got, "trio_raft_envelope_active_key_id", node="n1") == 1
        assert value(got, "trio_raft_envelope_cutover_index", node="n1") == cutover
        ops = {(op, res): value(got, "trio_raft_envelope_operations_total", node="n1", op=op,
                                result=res)
               for op, res in (("wrap", "ok"), ("unwrap", "ok"), ("payload_seal", "ok"),
                               ("unwrap", "failed"))}
        # A node applies the entries it proposed from the plaintexts it kept: no unwrap.
        assert ops[("wrap", "ok")] >= 3 and ops[("unwrap", "ok")] == 0
        assert ops[("payload_seal", "ok")] >= 1 and ops[("unwrap", "failed")] == 0
