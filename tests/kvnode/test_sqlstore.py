"""kvnode's SQLite store: the same results as the in-memory store, the index committed with
the data, snapshots from a consistent read, restores swapped in whole, and the cold-start
skip of an engine on top of it."""

from __future__ import annotations

import io
import os
import random

import trio_raft
from trio_raft_kv.sqlstore import SqliteKVStateMachine, store_path
from trio_raft_kv.statemachine import (
    KVStateMachine,
    encode_cas,
    encode_delete,
    encode_member,
    encode_put,
)


def commands(seed: int, n: int) -> list[bytes]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        key = f"k{rng.randrange(40)}"
        r = rng.random()
        if r < 0.5:
            out.append(encode_put(key, b"v%d" % i))
        elif r < 0.7:
            out.append(encode_delete(key))
        elif r < 0.9:
            out.append(encode_cas(key, b"v%d" % rng.randrange(i + 1), rng.random() < 0.3,
                                  b"c%d" % i))
        else:
            out.append(encode_member(f"n{rng.randrange(5)}"))
    return out


def payload(fsm: object) -> bytes:
    snap = fsm.snapshot()  # type: ignore[attr-defined]
    buf = io.BytesIO()
    try:
        snap.write_to(buf)
    finally:
        snap.close()
    return buf.getvalue()


def test_same_results_as_the_memory_store(tmp_path) -> None:
    mem, sql = KVStateMachine(), SqliteKVStateMachine(str(tmp_path / "kv.sqlite"))
    for i, cmd in enumerate(commands(7, 600), start=1):
        sql.set_apply_index(i)
        assert sql.apply(cmd) == mem.apply(cmd), cmd
        if i % 97 == 0:
            sql.flush()
    assert sql.key_count() == len(mem.data)
    assert {f"k{i}": sql.get(f"k{i}") for i in range(40)} == \
        {f"k{i}": mem.data.get(f"k{i}") for i in range(40)}
    assert sql.members == mem.members
    # the payloads cross both ways (sqlite writes KVS1 rows, memory KVS2 columns)
    mem2 = KVStateMachine()
    mem2.restore(io.BytesIO(payload(sql)))
    assert mem2.data == mem.data and mem2.members == mem.members
    sql2 = SqliteKVStateMachine(str(tmp_path / "other.sqlite"))
    sql2.set_apply_index(600)
    sql2.restore(io.BytesIO(payload(mem)))
    assert {f"k{i}": sql2.get(f"k{i}") for i in range(40)} == \
        {f"k{i}": mem.data.get(f"k{i}") for i in range(40)}
    assert sql2.members == mem.members and sql2.key_count() == len(mem.data)
    sql.close()
    sql2.close()


def test_the_index_is_committed_with_the_data(tmp_path) -> None:
    path = str(tmp_path / "kv.sqlite")
    sql = SqliteKVStateMachine(path)
    assert sql.durable_state() is None  # a new store holds nothing durable
    sql.set_cluster_id("c1")
    for i in range(1, 11):
        sql.set_apply_index(i)
        sql.apply(encode_put(f"k{i}", b"v"))
    assert sql.durable_state() is None  # not committed yet
    sql.flush()
    assert sql.durable_state() == ("c1", 10)
    sql.set_apply_index(11)
    sql.apply(encode_put("lost", b"x"))  # applied, never committed: a crash loses it
    sql._conn.close()  # as if the process died
    again = SqliteKVStateMachine(path)
    assert again.durable_state() == ("c1", 10)
    assert again.get("k10") == b"v" and again.get("lost") is None
    assert again.key_count() == 10
    again.close()


def test_a_snapshot_is_a_consistent_read_and_restore_swaps_whole(tmp_path) -> None:
    path = str(tmp_path / "kv.sqlite")
    sql = SqliteKVStateMachine(path)
    for i in range(1, 101):
        sql.set_apply_index(i)
        sql.apply(encode_put(f"k{i}", b"one"))
    snap = sql.snapshot()  # pinned here
    for i in range(1, 101):
        sql.set_apply_index(100 + i)
        sql.apply(encode_put(f"k{i}", b"two"))
    sql.flush()
    buf = io.BytesIO()
    snap.write_to(buf)  # in a worker thread in real use; applies went on meanwhile
    snap.close()
    check = KVStateMachine()
    check.restore(io.BytesIO(buf.getvalue()))
    assert set(check.data.values()) == {b"one"} and len(check.data) == 100
    # restore: the new state replaces everything, at the index given before it
    sql.set_cluster_id("c2")
    sql.set_apply_index(500)
    sql.restore(io.BytesIO(buf.getvalue()))
    assert sql.get("k1") == b"one" and sql.durable_state() == ("c2", 500)
    assert not [n for n in os.listdir(tmp_path) if ".restore-" in n]
    sql.close()
    again = SqliteKVStateMachine(path)
    assert again.get("k50") == b"one" and again.durable_state() == ("c2", 500)
    again.close()


async def test_an_engine_on_sqlite_skips_the_restore(tmp_path) -> None:
    from tests.engine.test_cold_start import settled_snapshot_index
    from tests.engine.test_single_node import cfg

    path = store_path(str(tmp_path / "n1"))
    fsm = SqliteKVStateMachine(path)
    async with trio_raft.open_engine(cfg(tmp_path, fsm, snapshot_every=20,
                                         snapshot_catchup_entries=5)) as engine:
        for i in range(75):
            await engine.propose(encode_put(f"k{i}", b"v%d" % i))
        fsm.flush()
        last = engine.applied_index()
        snap_index = await settled_snapshot_index(engine, 20)
        cid = engine.cluster_id()
    fsm.close()
    fsm = SqliteKVStateMachine(path)
    assert fsm.durable_state() == (cid, last)
    async with trio_raft.open_engine(cfg(tmp_path, fsm)) as engine:
        report = engine.open_report()
        assert report.skipped and report.store_index == last
        assert report.snapshot_index == snap_index and report.entries_replayed == 0
        assert fsm.get("k74") == b"v74" and fsm.snapshots_restored == 0
        await engine.propose(encode_put("after", b"1"))
        assert fsm.get("after") == b"1"
    fsm.close()
