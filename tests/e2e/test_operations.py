"""The runbooks of docs/operations.md, driven through the kvnode command as an operator would
(real processes, real files, fsync on): backup and restore, replacing a failed disk, recovery
from a lost quorum, a node joining a grown cluster through one member, and a SQLite node killed
mid-load."""

from __future__ import annotations

import os
import shutil
import urllib.request

import pytest

from tests.e2e.opsprocs import (
    N3,
    Procs,
    Writer,
    kvnode,
    kvnode_json,
    poll,
    put_many,
    read_all,
)
from trio_raft_kv._proto.trio_raft.kv import v1 as pb

pytestmark = pytest.mark.slow



def test_backup_restore_and_replacing_a_failed_disk(tmp_path) -> None:
    old = Procs(str(tmp_path / "old"), N3)
    os.makedirs(old.root)
    try:
        for n in N3:
            old.serve(n, N3, "--bootstrap")
        leader = old.leader()
        with Writer(old.addrs[leader]) as writer:  # the backup is taken under write load
            poll(lambda: writer.count() >= 100, 60, "100 acknowledged writes")
            before = writer.snapshot()
            saved = kvnode_json("snapshot", "save", str(tmp_path / "cluster.bak"),
                                "--addr", old.addrs[leader])
            n = writer.count()
            poll(lambda: writer.count() >= n + 30, 60, "writes after the backup")
        assert saved["index"] > 0 and saved["keys"] >= len(before)
        assert saved["bytes"] == os.path.getsize(tmp_path / "cluster.bak")
    finally:
        old.stop_all()

    # Restore every member of a new cluster from the same file.
    new = Procs(str(tmp_path / "new"), N3)
    os.makedirs(new.root)
    for n in N3:
        out = kvnode_json("snapshot", "restore", str(tmp_path / "cluster.bak"),
                          "--data-dir", new.data_dir(n), "--id", n, "--peers", new.peers(N3))
        assert out["index"] == saved["index"] and out["keys"] == saved["keys"]
    # refusals: a data dir that is not empty (2), a damaged file (7)
    r = kvnode("snapshot", "restore", str(tmp_path / "cluster.bak"), "--data-dir",
               new.data_dir("n1"), "--id", "n1", "--peers", new.peers(N3))
    assert r.returncode == 2 and "DataDirNotEmptyError" in r.stderr
    raw = bytearray((tmp_path / "cluster.bak").read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (tmp_path / "damaged.bak").write_bytes(bytes(raw))
    r = kvnode("snapshot", "restore", str(tmp_path / "damaged.bak"), "--data-dir",
               str(tmp_path / "elsewhere"), "--id", "n1", "--peers", new.peers(N3))
    assert r.returncode == 7 and "BackupFileError" in r.stderr
    assert not (tmp_path / "elsewhere").exists()
    try:
        for n in N3:
            new.serve(n, N3)
        leader = new.leader()
        got = read_all(new.addrs[leader], sorted(before))
        assert got == before  # every write acknowledged before the backup
        put_many(new.addrs[leader], {"fresh": b"1"})

        # Replacing a failed disk: n3's disk is gone for good.
        victim = next(n for n in N3 if n != leader)
        new.kill(victim)
        shutil.rmtree(new.data_dir(victim))
        assert kvnode("remove", victim, "--addr", new.addrs[leader]).returncode == 0
        new.serve(victim, N3, "--join-as-learner")
        assert kvnode("add-learner", victim, new.addrs[victim],
                      "--addr", new.addrs[leader]).returncode == 0
        r = kvnode("promote", victim, "--addr", new.addrs[leader], "--wait", "60")
        assert r.returncode == 0, r.stderr
        put_many(new.addrs[leader], {"barrier": b"1"})
        poll(lambda: new.caught_up(N3, leader), 60, "the replaced member to catch up")
        local = read_all(new.addrs[victim], [*sorted(before), "fresh"], pb.ReadMode.LOCAL)
        assert local == {**before, "fresh": b"1"}
    finally:
        new.stop_all()


def test_recovery_from_a_lost_quorum(tmp_path) -> None:
    names = ["n1", "n2", "n3", "n4", "n5"]
    procs = Procs(str(tmp_path), names, store="sqlite")
    try:
        for n in names:
            procs.serve(n, names, "--bootstrap")
        leader = procs.leader()
        written = {f"k{i:03d}": b"v%d" % i for i in range(60)}
        put_many(procs.addrs[leader], written)
        poll(lambda: procs.caught_up(names, leader), 60, "every node to catch up")
        # Three nodes are lost for good; the two survivors cannot elect a leader.
        survivors = ["n1", "n2"]
        for n in names:
            if n not in survivors:
                procs.kill(n)
        for n in survivors:
            procs.stop(n)
        # `recover` refuses while the node runs.
        running = procs.serve("n1", names)
        r = kvnode("recover", "--data-dir", procs.data_dir("n1"), "--id", "n1",
                   "--peers", procs.peers(["n1"]))
        assert r.returncode == 2 and "WALLockedError" in r.stderr
        procs.stop("n1")
        assert running.proc.returncode == 0
        out = kvnode_json("recover", "--data-dir", procs.data_dir("n1"), "--id", "n1",
                          "--peers", procs.peers(["n1"]))
        assert out["removed"] == 4 and out["cluster_id"]
        procs.serve("n1", ["n1"])
        assert procs.leader(["n1"]) == "n1"
        assert read_all(procs.addrs["n1"], sorted(written)) == written
        put_many(procs.addrs["n1"], {"after": b"recovery"})
        # The other survivor comes back as a new member (its old data dir goes), and a new
        # machine joins: both as learners, then promoted.
        shutil.rmtree(procs.data_dir("n2"))
        procs.add_addresses(["n6"])
        for n in ("n2", "n6"):
            procs.serve(n, ["n1", n], "--join-as-learner")
            assert kvnode("add-learner", n, procs.addrs[n], "--addr",
                          procs.addrs["n1"]).returncode == 0
            r = kvnode("promote", n, "--addr", procs.addrs["n1"], "--wait", "60")
            assert r.returncode == 0, r.stderr
        members = kvnode_json("status", "--addr", procs.addrs["n1"])["members"]
        assert sorted((m["id"], m["suffrage"]) for m in members) == [
            ("n1", "voter"), ("n2", "voter"), ("n6", "voter")]
        put_many(procs.addrs["n1"], {"three": b"voters"})
        poll(lambda: procs.caught_up(["n1", "n2", "n6"], "n1"), 60, "the new members")
        local = read_all(procs.addrs["n6"], [*sorted(written), "after"], pb.ReadMode.LOCAL)
        assert local == {**written, "after": b"recovery"}
    finally:
        procs.stop_all()


def test_sqlite_node_killed_mid_load_and_a_joiner_knowing_one_member(tmp_path) -> None:
    procs = Procs(str(tmp_path), N3, store="sqlite", snapshot_every=50)
    try:
        for n in N3:
            procs.serve(n, N3, "--bootstrap")
        leader = procs.leader()
        # The cluster grows by n4 (its --peers lists everyone it needs), which keeps its raft
        # streams on grpclib: a cluster where native lanes meet grpclib ones in both
        # directions. (A node's port is picked right before it starts: one picked long before
        # may be taken meanwhile.)
        procs.add_addresses(["n4"])
        procs.serve("n4", [*N3, "n4"], "--join-as-learner", "--no-native-lanes")
        assert kvnode("add-learner", "n4", procs.addrs["n4"],
                      "--addr", procs.addrs[leader]).returncode == 0
        assert kvnode("promote", "n4", "--addr", procs.addrs[leader],
                      "--wait", "60").returncode == 0
        victim = next(n for n in N3 if n != leader)
        with Writer(procs.addrs[leader]) as writer:
            poll(lambda: writer.count() >= 150, 60, "150 acknowledged writes")
            procs.kill(victim)  # SIGKILL, mid-load
            n = writer.count()
            poll(lambda: writer.count() >= n + 60, 60, "writes while it is down")
            procs.serve(victim, N3)
            n = writer.count()
            poll(lambda: writer.count() >= n + 30, 60, "writes after the restart")
        acked = writer.snapshot()
        log = procs.log(victim)
        assert "skipped (the state machine's store holds index" in log, log[-3000:]
        put_many(procs.addrs[leader], {"barrier": b"1"})
        poll(lambda: procs.caught_up([victim, "n4"], leader), 60, "the followers to catch up")
        for follower in (victim, "n4"):
            assert read_all(procs.addrs[follower], sorted(acked), pb.ReadMode.LOCAL) == acked
        # n5 knows one follower only (a --peers list written before n4 existed, trimmed to one
        # member): it asks that member for the membership at its start (join discovery), so it
        # can answer the leader it was not told of, and catches up through a snapshot that
        # names every member with its address.
        known = next(n for n in N3 if n != leader)
        procs.add_addresses(["n5"])
        procs.serve("n5", [known, "n5"], "--join-as-learner", "--metrics-listen",
                    "127.0.0.1:0")
        assert f"join discovery: {known} named" in procs.log("n5")
        assert f"{leader}={procs.addrs[leader]}" in procs.log("n5")
        assert kvnode("add-learner", "n5", procs.addrs["n5"],
                      "--addr", procs.addrs[leader]).returncode == 0
        put_many(procs.addrs[leader], {"joined": b"n5"})
        poll(lambda: procs.caught_up(["n5"], leader), 60, "n5 to catch up")
        assert read_all(procs.addrs["n5"], [*sorted(acked), "joined"], pb.ReadMode.LOCAL) == \
            {**acked, "joined": b"n5"}
        port = procs.nodes["n5"].ready["metrics_port"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            metrics = resp.read().decode()
        def sample(prefix: str, *labels: str) -> float:
            return next(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                        if line.startswith(prefix) and all(x in line for x in labels))

        assert sample("trio_raft_snapshots_total{", 'event="installed"') >= 1  # by snapshot
        # Its answers leave on its own lanes; a leader with native lanes (any but n4) reaches
        # it on lanes served on its trio thread (docs/transport.md 3.8).
        assert sample("trio_raft_lane_streams_opened_total{", 'lane="replication"') >= 1
        assert sample("trio_raft_lane_messages_total{", 'lane="replication"') >= 1
        assert sample("trio_raft_native_connections_total{") >= 1 or procs.leader() == "n4"
        members = kvnode_json("status", "--addr", procs.addrs["n5"])["members"]
        assert {m["id"]: m["address"] for m in members} == procs.addrs
        assert procs.nodes["n5"].proc.poll() is None  # alive: no PeerAddressRequiredError
        r = kvnode("promote", "n5", "--addr", procs.addrs[leader], "--wait", "60")
        assert r.returncode == 0, r.stderr
    finally:
        procs.stop_all()
