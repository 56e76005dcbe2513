"""The encryption runbook of docs/operations.md through the kvnode command, as an operator runs
it (real processes, real files, fsync on): a 3-node cluster with --key-dir/--kek-file, writes
of recognisable values, ``encryption enable`` (cutover and compaction on every member), more
writes with small --snapshot-every, a follower replaced (wiped data dir and key store, caught up
through a sealed snapshot), a key rotation, a sealed backup restored with the KEK; then every
file of every data dir (and the backup) is scanned for the values in clear, every acknowledged
value reads back, and a restart with the wrong KEK (or an exposed KEK file) is refused before
anything is served. Once with ``--store memory``, once with ``--store sqlite``."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.e2e.opsprocs import (
    N3,
    Procs,
    kvnode,
    kvnode_json,
    poll,
    put_many,
    read_all,
)
from trio_raft.envelope import KEK
from trio_raft_kv._proto.trio_raft.kv import v1 as pb

pytestmark = pytest.mark.slow

#: Every value written starts with this: no file may hold it.
MARK = b"PLAINVALUE"


def files_with(root: str, needle: bytes) -> list[str]:
    found = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                if needle in f.read():
                    found.append(path)
    return sorted(found)


def write_kek(path: str, raw: bytes, mode: int = 0o600) -> str:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(raw.hex())
    os.chmod(path, mode)
    return path


def values(prefix: str, n: int) -> dict[str, bytes]:
    return {f"{prefix}{i:03d}": MARK + b"-%s-%03d" % (prefix.encode(), i) for i in range(n)}


@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_encryption_runbook(tmp_path, store: str) -> None:
    root = str(tmp_path / "cluster")
    os.makedirs(root)
    kek = write_kek(str(tmp_path / "cluster.kek"), os.urandom(32))
    wrong = write_kek(str(tmp_path / "wrong.kek"), os.urandom(32))
    key_dir = {n: str(tmp_path / "keys" / n) for n in N3}

    def keys(n: str) -> tuple[str, ...]:
        return ("--key-dir", key_dir[n], "--kek-file", kek)

    procs = Procs(root, N3, store=store, snapshot_every=25)
    written: dict[str, bytes] = {}
    try:
        for n in N3:
            procs.serve(n, N3, "--bootstrap", *keys(n))
        leader = procs.leader()
        laddr = procs.addrs[leader]
        st = kvnode_json("status", "--addr", laddr)
        kek_print = KEK.from_file(kek).fingerprint
        assert st["encryption"] == {"on": False, "active_key_id": 0, "cutover_index": None,
                                    "kek": kek_print}
        written |= values("pre", 40)
        put_many(laddr, values("pre", 40))
        assert files_with(procs.data_dir(leader), MARK)  # the control: before, in clear

        out = kvnode_json("encryption", "enable", "--addr", laddr)
        cutover = out["cutover_index"]
        assert cutover > 0 and out["active_key_id"] == 1
        assert sorted(out["compacted"]) == N3
        assert all(index >= cutover for index in out["compacted"].values())
        again = kvnode_json("encryption", "enable", "--addr", laddr, "--no-compact")
        assert again["cutover_index"] == cutover  # idempotent
        for n in N3:
            st = kvnode_json("status", "--addr", procs.addrs[n])["encryption"]
            assert st == {"on": True, "active_key_id": 1, "cutover_index": cutover,
                          "kek": kek_print}
        written |= values("post", 60)
        put_many(laddr, values("post", 60))

        # Replace a follower: removed, its data dir and key store wiped, back as a learner.
        follower = next(n for n in N3 if n != leader)
        assert kvnode("remove", follower, "--addr", laddr).returncode == 0
        procs.stop(follower)
        shutil.rmtree(procs.data_dir(follower))
        shutil.rmtree(key_dir[follower])
        procs.serve(follower, N3, "--join-as-learner", *keys(follower))
        assert kvnode("add-learner", follower, procs.addrs[follower],
                      "--addr", laddr).returncode == 0
        r = kvnode("promote", follower, "--addr", laddr, "--wait", "60")
        assert r.returncode == 0, r.stderr
        st = kvnode_json("status", "--addr", procs.addrs[follower])["encryption"]
        assert st == {"on": True, "active_key_id": 1, "cutover_index": cutover,
                      "kek": kek_print}

        rotated = kvnode_json("encryption", "rotate", "--addr", laddr)
        assert rotated["active_key_id"] == 2
        written |= values("late", 60)
        put_many(laddr, values("late", 60))
        poll(lambda: procs.caught_up(N3, leader), 60, "every node to catch up")
        for n in N3:
            st = kvnode_json("status", "--addr", procs.addrs[n])["encryption"]
            assert st["active_key_id"] == 2
            assert read_all(procs.addrs[n], sorted(written), pb.ReadMode.LOCAL) == written
        assert read_all(laddr, sorted(written)) == written

        # A sealed backup: nothing in clear; restored only with the key store and the KEK.
        backup = str(tmp_path / "cluster.bak")
        saved = kvnode_json("snapshot", "save", backup, "--addr", laddr)
        assert saved["sealed"] and saved["keys"] is None
        assert files_with(str(tmp_path / "cluster.bak"), MARK) == []
        spare = ("--data-dir", str(tmp_path / "restored"), "--id", "n1",
                 "--peers", procs.peers(["n1"]))
        r = kvnode("snapshot", "restore", backup, *spare)
        assert r.returncode == 2 and "sealed backup" in r.stderr, r.stderr
        r = kvnode("snapshot", "restore", backup, *spare, "--key-dir",
                   str(tmp_path / "keys-wrong"), "--kek-file", wrong)
        assert r.returncode == 2 and "KEKError" in r.stderr, r.stderr
        assert not os.path.exists(tmp_path / "restored")
        restored = kvnode_json("snapshot", "restore", backup, *spare,
                               "--key-dir", str(tmp_path / "keys-restored"), "--kek-file", kek)
        assert restored["sealed"] and restored["keys"] >= len(written)
        assert files_with(str(tmp_path / "restored"), MARK) == []
    finally:
        procs.stop_all()

    # At rest: no value in clear in any file of any data dir.
    for n in N3:
        assert files_with(procs.data_dir(n), MARK) == [], n
        assert files_with(key_dir[n], MARK) == []

    # A wrong KEK, or a KEK file others can read: refused at start, nothing served.
    base = ("serve", "--id", "n1", "--listen", procs.addrs["n1"], "--peers", procs.peers(N3),
            "--data-dir", procs.data_dir("n1"), "--store", store, "--key-dir", key_dir["n1"])
    r = kvnode(*base, "--kek-file", wrong)
    assert r.returncode == 2, r.stderr
    assert "KEKError" in r.stderr and "does not match" in r.stderr
    assert '"ready"' not in r.stdout
    os.chmod(kek, 0o640)
    r = kvnode(*base, "--kek-file", kek)
    assert r.returncode == 2 and "KEKPermissionError" in r.stderr, r.stderr
    assert '"ready"' not in r.stdout
    os.chmod(kek, 0o600)

    # The right KEK: every node restarts from its sealed snapshot and serves every value.
    try:
        for n in N3:
            procs.serve(n, N3, *keys(n))
        leader = procs.leader()
        assert read_all(procs.addrs[leader], sorted(written)) == written
    finally:
        procs.stop_all()


def test_keys_travel_only_when_every_member_runs_the_same_kek(tmp_path) -> None:
    # A rolling KEK rotation (docs/operations.md, "Rotate the KEK"): while one node already
    # runs with the new KEK, `encryption rotate` refuses (exit 3, nothing changes on any
    # node) and names it; once every node runs with the new KEK the rotation goes through.
    root = str(tmp_path / "cluster")
    os.makedirs(root)
    old = write_kek(str(tmp_path / "cluster.kek"), os.urandom(32))
    new = write_kek(str(tmp_path / "cluster-2.kek"), os.urandom(32))
    key_dir = {n: str(tmp_path / "keys" / n) for n in N3}
    kek_of = dict.fromkeys(N3, old)
    procs = Procs(root, N3)

    def serve(n: str, *extra: str) -> None:
        procs.serve(n, N3, *extra, "--key-dir", key_dir[n], "--kek-file", kek_of[n])

    def rotate_kek(n: str) -> None:
        procs.stop(n)
        r = kvnode("encryption", "rotate-kek", "--key-dir", key_dir[n], "--kek-file", old,
                   "--new-kek-file", new)
        assert r.returncode == 0, r.stderr
        kek_of[n] = new
        serve(n)

    def fingerprints() -> dict[str, str]:
        return {n: kvnode_json("status", "--addr", procs.addrs[n])["encryption"]["kek"]
                for n in N3}

    try:
        for n in N3:
            serve(n, "--bootstrap")
        laddr = procs.addrs[procs.leader()]
        assert kvnode_json("encryption", "enable", "--addr", laddr)["active_key_id"] == 1
        before = fingerprints()
        assert len(set(before.values())) == 1 and len(before["n1"]) == 16

        first = next(n for n in N3 if n != procs.leader())
        rotate_kek(first)
        laddr = procs.addrs[procs.leader()]
        during = fingerprints()
        assert during[first] != before[first]
        r = kvnode("encryption", "rotate", "--addr", laddr)
        assert r.returncode == 3, r.stderr
        assert f"{first} runs with KEK {during[first]}" in r.stderr, r.stderr
        for n in N3:  # nothing was proposed: every node still on key 1
            assert kvnode_json("status", "--addr", procs.addrs[n])["encryption"][
                "active_key_id"] == 1

        for n in N3:
            if n != first:
                rotate_kek(n)
        laddr = procs.addrs[procs.leader()]
        after = fingerprints()
        assert len(set(after.values())) == 1 and after["n1"] != before["n1"]
        rotated = kvnode_json("encryption", "rotate", "--addr", laddr)
        assert rotated["active_key_id"] == 2
        put_many(laddr, values("kek", 10))
        poll(lambda: procs.caught_up(N3, procs.leader()), 60, "every node to catch up")
        for n in N3:
            st = kvnode_json("status", "--addr", procs.addrs[n])["encryption"]
            assert st["active_key_id"] == 2, n
            assert read_all(procs.addrs[n], sorted(values("kek", 10)),
                            pb.ReadMode.LOCAL) == values("kek", 10)
    finally:
        procs.stop_all()
