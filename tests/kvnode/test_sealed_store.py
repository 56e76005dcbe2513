"""kvnode's SQLite store with encryption on (trio_raft_kv/sealedvalues.py): values in clear
until the envelope has an active key, then every value sealed in one transaction with nothing
left in clear in any file of the store; the same results as the in-memory store; snapshots
carry plaintext (the engine seals the payload); a restore seals what it loads; a sealed store
refuses to open without the key store, and a value moved to another key does not open."""

from __future__ import annotations

import io
import os
import sqlite3

import pytest

from tests.kvnode.test_sqlstore import commands, payload
from trio_raft.envelope import KEK, Cipher
from trio_raft_kv.errors import SealedStoreError
from trio_raft_kv.sealedvalues import ValueSealer
from trio_raft_kv.sqlstore import SqliteKVStateMachine
from trio_raft_kv.statemachine import KVStateMachine, encode_cas, encode_put

MARK = b"CLEARTEXT"


def store_files_with(directory: str, needle: bytes) -> list[str]:
    out = []
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name), "rb") as f:
            if needle in f.read():
                out.append(name)
    return out


@pytest.fixture
def cipher(tmp_path) -> Cipher:
    return Cipher.open(str(tmp_path / "keys"), KEK.generate(), node_id="n1")


def open_store(tmp_path, cipher: Cipher | None) -> SqliteKVStateMachine:
    return SqliteKVStateMachine(str(tmp_path / "kv" / "kv.sqlite"),
                                sealer=ValueSealer(cipher) if cipher is not None else None)


def test_values_are_sealed_once_a_key_is_active(tmp_path, cipher) -> None:
    sql = open_store(tmp_path, cipher)
    for i in range(50):
        sql.set_apply_index(i + 1)
        sql.apply(encode_put(f"k{i}", MARK + b"-%d" % i))
    sql.flush()
    sql.checkpoint()
    directory = str(tmp_path / "kv")
    assert store_files_with(directory, MARK)  # no key yet: in clear (the control)
    assert cipher.keystore is not None
    cipher.keystore.install(1, os.urandom(32))
    sql.flush()  # the switch: every value sealed, the file rebuilt, its WAL emptied
    assert store_files_with(directory, MARK) == []
    sql.set_apply_index(51)
    sql.apply(encode_put("new", MARK + b"-new"))
    sql.flush()
    sql.checkpoint()
    assert store_files_with(directory, MARK) == []
    assert sql.get("k7") == MARK + b"-7" and sql.get("new") == MARK + b"-new"
    assert sql.apply(encode_cas("k7", MARK + b"-7", False, b"swapped")).swapped
    assert MARK + b"-3" in payload(sql)  # snapshots carry plaintext: the engine seals them
    sql.close()
    assert store_files_with(directory, MARK) == []
    with pytest.raises(SealedStoreError, match="values are sealed"):
        open_store(tmp_path, None)
    again = open_store(tmp_path, cipher)
    assert again.get("k7") == b"swapped" and again.get("k8") == MARK + b"-8"
    again.close()


def test_same_results_as_the_memory_store_when_sealed(tmp_path, cipher) -> None:
    assert cipher.keystore is not None
    cipher.keystore.install(1, os.urandom(32))
    mem, sql = KVStateMachine(), open_store(tmp_path, cipher)
    for i, cmd in enumerate(commands(11, 400), start=1):
        sql.set_apply_index(i)
        assert sql.apply(cmd) == mem.apply(cmd), cmd
    sql.flush()
    assert {f"k{i}": sql.get(f"k{i}") for i in range(40)} == \
        {f"k{i}": mem.data.get(f"k{i}") for i in range(40)}
    # A restore from a plaintext snapshot payload seals what it loads.
    other = SqliteKVStateMachine(str(tmp_path / "other" / "kv.sqlite"),
                                 sealer=ValueSealer(cipher))
    other.set_apply_index(400)
    other.restore(io.BytesIO(payload(sql)))
    assert {f"k{i}": other.get(f"k{i}") for i in range(40)} == \
        {f"k{i}": mem.data.get(f"k{i}") for i in range(40)}
    conn = sqlite3.connect(other.path)
    (sealed,) = conn.execute("SELECT value FROM meta WHERE name = 'values_sealed'").fetchone()
    raw = dict(conn.execute("SELECT key, value FROM kv").fetchall())
    conn.close()
    assert sealed == 1
    assert all(v != mem.data[k.decode()] for k, v in raw.items())
    other.close()
    sql.close()


def test_a_value_moved_to_another_key_does_not_open(tmp_path, cipher) -> None:
    assert cipher.keystore is not None
    cipher.keystore.install(1, os.urandom(32))
    sql = open_store(tmp_path, cipher)
    sql.set_apply_index(1)
    sql.apply(encode_put("a", b"1"))
    sql.set_apply_index(2)
    sql.apply(encode_put("b", b"2"))
    sql.close()
    conn = sqlite3.connect(str(tmp_path / "kv" / "kv.sqlite"))
    (blob,) = conn.execute("SELECT value FROM kv WHERE key = ?", (b"a",)).fetchone()
    conn.execute("UPDATE kv SET value = ? WHERE key = ?", (blob, b"b"))
    conn.commit()
    conn.close()
    sql = open_store(tmp_path, cipher)
    assert sql.get("a") == b"1"
    with pytest.raises(SealedStoreError, match="belongs to another key"):
        sql.get("b")
    sql.close()
