"""The SQLite-backed KV state machine of ``kvnode serve --store sqlite`` (stdlib ``sqlite3``).

The store is one database file (``<data dir>/kv-store/kv.sqlite``) in WAL mode::

    kv(key BLOB PRIMARY KEY, value BLOB)        keys as UTF-8 bytes
    members(id TEXT PRIMARY KEY)                 the bootstrap guard's member records
    meta(name TEXT PRIMARY KEY, value)           applied_index, cluster_id, values_sealed

With encryption on (``sealer=``, ``trio_raft_kv/sealedvalues.py``) every value is sealed with
the node's raft cipher once the envelope has an active key; key names stay in clear.

Invariant (docs/api.md, the cold-start skip): **the applied index and the cluster id are
written in the same transaction as the data they cover.** Applied commands accumulate in one
open transaction; :meth:`SqliteKVStateMachine.flush` writes ``meta`` and commits them together
(kvnode calls it every few milliseconds; it also happens every :data:`COMMIT_EVERY` commands,
before a snapshot, before a restore and at close). ``synchronous=NORMAL``: a commit survives a
process crash; a power loss may drop the newest transactions, which only makes the store's
index lower (the raft log has the entries, they are applied again). So after any crash the
store holds exactly the effect of the entries up to the index it reports
(:meth:`~SqliteKVStateMachine.durable_state`), and a restart skips the snapshot restore when it
covers the newest snapshot.

Snapshots stream from a consistent read: :meth:`~SqliteKVStateMachine.snapshot` (trio thread)
commits, opens a read transaction on a connection of its own (WAL mode keeps what it sees
fixed while applies go on), and the handle's ``write_to`` (a worker thread) writes the
``KVS1`` row payload (``trio_raft_kv/statemachine.py``) row by row. ``restore`` (a worker
thread) loads the payload into a new database file next to the store (``*.restore-*``), fsyncs
it, and swaps it in: close the store, rename over it, fsync the directory, reopen. A crash
leaves the old store or the new one, never a mix; leftover ``*.restore-*`` files are deleted at
open.

Threads (docs/api.md): ``apply``, ``get``, ``flush``, ``snapshot`` run on the engine's trio
thread; ``durable_state`` and ``set_cluster_id`` at open in a worker thread; ``restore`` and
``write_to`` in worker threads; :meth:`~SqliteKVStateMachine.checkpoint` in a worker thread of
kvnode's. One lock guards the main connection; ``restore`` holds it only for the swap, so reads
go on against the old data while the new file is loaded.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import struct
import threading
import uuid
from collections.abc import Callable
from typing import IO, Any

from trio_raft_kv import sealedvalues as sv
from trio_raft_kv.errors import CommandError, SealedStoreError
from trio_raft_kv.statemachine import (
    SNAPSHOT_MAGIC_V1,
    CasResult,
    _take,
    decode_snapshot,
)

log = logging.getLogger("kvnode.sqlstore")

STORE_DIR = "kv-store"
STORE_FILE = "kv.sqlite"
#: Applied commands after which :meth:`SqliteKVStateMachine.apply` commits by itself.
COMMIT_EVERY = 5000
_BATCH = 2000
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS kv (key BLOB PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS members (id TEXT PRIMARY KEY) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value) WITHOUT ROWID",
)


def store_path(data_dir: str) -> str:
    return os.path.join(data_dir, STORE_DIR, STORE_FILE)


def _connect(path: str, *, secure_delete: bool = False) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA wal_autocheckpoint=0")  # checkpoints run in a worker thread
    if secure_delete:  # with encryption: freed cells are zeroed (sealedvalues.py)
        conn.execute("PRAGMA secure_delete=ON")
    return conn


def _fsync_path(path: str, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SqliteSnapshot:
    """A read transaction pinned at :meth:`SqliteKVStateMachine.snapshot`; ``write_to``
    streams it as a ``KVS1`` payload."""

    def __init__(self, conn: sqlite3.Connection, count: int,
                 opener: sv.ValueSealer | None = None) -> None:
        self._conn: sqlite3.Connection | None = conn
        self._count = count
        #: Opens the values when the store was sealed at the snapshot.
        self._opener = opener

    def write_to(self, writer: IO[bytes]) -> int:
        conn = self._conn
        if conn is None:
            raise ValueError("snapshot handle already closed")
        total = 0

        def put(b: bytes) -> None:
            nonlocal total
            writer.write(b)
            total += len(b)

        put(SNAPSHOT_MAGIC_V1 + _U64.pack(self._count))
        rows = 0
        cur = conn.execute("SELECT key, value FROM kv")
        while batch := cur.fetchmany(_BATCH):
            parts: list[bytes] = []
            for key, value in batch:
                if self._opener is not None:
                    value = self._opener.open(bytes(key), bytes(value))
                parts += (_U32.pack(len(key)), key, _U32.pack(len(value)), value)
            rows += len(batch)
            put(b"".join(parts))
        if rows != self._count:
            raise RuntimeError(f"kv store snapshot: {rows} rows, expected {self._count}")
        members = [m for (m,) in conn.execute("SELECT id FROM members ORDER BY id")]
        tail = [_U32.pack(len(members))]
        for m in members:
            raw = m.encode("utf-8")
            tail += (_U32.pack(len(raw)), raw)
        put(b"".join(tail))
        return total

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


class SqliteKVStateMachine:
    """The KV state machine on SQLite (see the module docstring); the same commands and
    results as :class:`~trio_raft_kv.statemachine.KVStateMachine`."""

    def __init__(self, path: str,
                 on_members_changed: Callable[[], None] | None = None,
                 sealer: sv.ValueSealer | None = None) -> None:
        self.path = path
        self._sealer = sealer
        self.on_members_changed = on_members_changed
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        for name in os.listdir(directory):
            if ".restore-" in name:
                os.unlink(os.path.join(directory, name))
        self._lock = threading.RLock()
        self._ckpt_lock = threading.Lock()
        self._conn = self._open()
        self._ckpt: sqlite3.Connection | None = None
        #: The index ``set_apply_index`` gave last (the next apply's, or a restore's).
        self._pending_index = self._index
        #: The index of the last command applied (what the open transaction covers).
        self._applied = self._index
        self._cluster_id_next: str | None = None
        self._dirty = 0
        self._scrub_due = False
        self.snapshots_taken = 0
        self.snapshots_restored = 0

    # -- opening and the durable state -----------------------------------------------------
    def _open(self) -> sqlite3.Connection:
        conn = _connect(self.path, secure_delete=self._sealer is not None)
        for stmt in _SCHEMA:
            conn.execute(stmt)
        meta = dict(conn.execute("SELECT name, value FROM meta").fetchall())
        self._index = int(meta.get("applied_index", 0))
        self._has_state = "applied_index" in meta
        self._cluster_id = str(meta.get("cluster_id", ""))
        self.members = {m for (m,) in conn.execute("SELECT id FROM members")}
        (self._keys,) = conn.execute("SELECT count(*) FROM kv").fetchone()
        self._sealed = bool(meta.get(sv.SEALED_META, 0))
        if self._sealed and self._sealer is None:
            conn.close()
            raise SealedStoreError(f"{self.path}: the values are sealed; serve needs the key "
                                   "store and the KEK (--key-dir, --kek-file or --kek-env)")
        return conn

    # -- sealed values (sealedvalues.py) -------------------------------------------------------
    def _in(self, key: bytes, value: bytes) -> bytes:
        return self._sealer.seal(key, value) if self._sealed and self._sealer else value

    def _out(self, key: bytes, value: bytes) -> bytes:
        return self._sealer.open(key, value) if self._sealed and self._sealer else value

    def _seal_due(self) -> bool:
        return not self._sealed and self._sealer is not None and self._sealer.ready

    def _reseal(self, conn: sqlite3.Connection) -> None:
        """In the open transaction: switch the store to sealed values (all rows)."""
        assert self._sealer is not None
        rows = sv.reseal_rows(conn, self._sealer)
        self._sealed = True
        self._scrub_due = True
        log.info("kv store %s: %d value(s) sealed", self.path, rows)

    def durable_state(self) -> tuple[str, int] | None:
        """(cluster id, applied index) committed in the store; None for a new store."""
        with self._lock:
            return (self._cluster_id, self._index) if self._has_state else None

    def set_cluster_id(self, cluster_id: str) -> None:
        """Recorded with the next transaction (never relabels data already committed)."""
        self._cluster_id_next = cluster_id

    def set_apply_index(self, index: int) -> None:
        self._pending_index = index

    # -- applying ----------------------------------------------------------------------------
    def apply(self, data: bytes) -> Any:
        if not data:
            return None
        op = data[:1]
        with self._lock:
            conn = self._conn
            if not conn.in_transaction:
                conn.execute("BEGIN")
            if self._seal_due():
                self._reseal(conn)
            self._dirty += 1
            result = self._execute(conn, op, data)
            self._applied = self._pending_index
        if self._dirty >= COMMIT_EVERY:
            self.flush()
        return result

    def _execute(self, conn: sqlite3.Connection, op: bytes, data: bytes) -> Any:
        if op == b"P":
            key, pos = _take(data, 1)
            key.decode("utf-8")  # the same refusal as the in-memory store
            value = self._in(key, bytes(data[pos:]))
            if conn.execute("INSERT OR IGNORE INTO kv VALUES (?, ?)", (key, value)).rowcount:
                self._keys += 1
            else:
                conn.execute("UPDATE kv SET value = ? WHERE key = ?", (value, key))
            return None
        if op == b"D":
            key, _ = _take(data, 1)
            key.decode("utf-8")
            gone = conn.execute("DELETE FROM kv WHERE key = ?", (key,)).rowcount
            self._keys -= gone
            return gone > 0
        if op == b"C":
            if len(data) < 2:
                raise CommandError("truncated cas")
            expect_absent = bool(data[1] & 1)
            key, pos = _take(data, 2)
            key.decode("utf-8")
            expected, pos = _take(data, pos)
            row = conn.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
            current = None if row is None else self._out(key, bytes(row[0]))
            swapped = current is None if expect_absent else (
                current is not None and current == expected)
            if swapped:
                value = self._in(key, bytes(data[pos:]))
                if current is None:
                    conn.execute("INSERT INTO kv VALUES (?, ?)", (key, value))
                    self._keys += 1
                else:
                    conn.execute("UPDATE kv SET value = ? WHERE key = ?", (value, key))
            return CasResult(swapped, current is not None, current or b"")
        if op == b"M":
            member = data[1:].decode("utf-8")
            conn.execute("INSERT OR IGNORE INTO members VALUES (?)", (member,))
            self.members = self.members | {member}
            if self.on_members_changed is not None:
                self.on_members_changed()
            return None
        return None  # unknown opcodes from a newer version are ignored, deterministically

    def flush(self) -> None:
        """Commit what was applied, with the applied index and the cluster id."""
        with self._lock:
            conn = self._conn
            if self._seal_due():
                if not conn.in_transaction:
                    conn.execute("BEGIN")
                self._reseal(conn)
            if not conn.in_transaction:
                if self._scrub_due:
                    self._scrub_due = not sv.scrub(conn)
                return
            self._write_meta(conn, self._applied)
            conn.execute("COMMIT")
            self._dirty = 0
            if self._scrub_due:
                self._scrub_due = not sv.scrub(conn)

    def _write_meta(self, conn: sqlite3.Connection, index: int) -> None:
        cid = self._cluster_id_next or self._cluster_id
        conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                         (("applied_index", index), ("cluster_id", cid)))
        self._index, self._cluster_id, self._has_state = index, cid, True

    # -- reading -------------------------------------------------------------------------------
    def get(self, key: str) -> bytes | None:
        raw = key.encode("utf-8")
        with self._lock:
            row = self._conn.execute("SELECT value FROM kv WHERE key = ?", (raw,)).fetchone()
            return None if row is None else self._out(raw, bytes(row[0]))

    def key_count(self) -> int:
        return int(self._keys)

    # -- snapshots -----------------------------------------------------------------------------
    def snapshot(self) -> SqliteSnapshot:
        self.flush()
        reader = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        reader.execute("BEGIN")
        reader.execute("SELECT value FROM meta WHERE name = 'applied_index'").fetchone()
        self.snapshots_taken += 1
        return SqliteSnapshot(reader, self._keys, self._sealer if self._sealed else None)

    def restore(self, reader: IO[bytes]) -> None:
        directory = os.path.dirname(self.path)
        tmp = os.path.join(directory, f"{STORE_FILE}.restore-{uuid.uuid4().hex}")
        try:
            keys, _members = self._load(reader, tmp)
            _fsync_path(tmp)
            with self._lock, self._ckpt_lock:
                self._close_connections()
                for suffix in ("-wal", "-shm"):  # checkpointed and empty: the old file's
                    if os.path.exists(self.path + suffix):
                        os.unlink(self.path + suffix)
                os.replace(tmp, self.path)
                _fsync_path(directory, directory=True)
                self._conn = self._open()
                self._applied = self._index
                self._dirty = 0
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        self.snapshots_restored += 1
        log.info("kv store restored: %d keys, index %d", keys, self._index)
        if self.on_members_changed is not None:
            self.on_members_changed()

    def _load(self, reader: IO[bytes], tmp: str) -> tuple[int, set[str]]:
        conn = sqlite3.connect(tmp, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=OFF")
            conn.execute("PRAGMA synchronous=OFF")
            for stmt in _SCHEMA:
                conn.execute(stmt)
            conn.execute("BEGIN")
            head = _read_exact(reader, 4, allow_empty=True)
            sealer = self._sealer if self._sealer is not None and self._sealer.ready else None
            if head == SNAPSHOT_MAGIC_V1:
                keys, members = _load_rows(reader, conn, sealer)
            else:
                data, members = decode_snapshot(head + reader.read())  # KVS2, or empty
                rows = ((k.encode("utf-8"), v) for k, v in data.items())
                conn.executemany("INSERT INTO kv VALUES (?, ?)",
                                 ((k, sealer.seal(k, v)) if sealer else (k, v) for k, v in rows))
                keys = len(data)
            if sealer is not None:
                conn.execute("INSERT INTO meta VALUES (?, 1)", (sv.SEALED_META,))
            conn.executemany("INSERT INTO members VALUES (?)", ((m,) for m in members))
            cid = self._cluster_id_next or self._cluster_id
            conn.executemany("INSERT INTO meta VALUES (?, ?)",
                             (("applied_index", self._pending_index), ("cluster_id", cid)))
            conn.execute("COMMIT")
            conn.execute("PRAGMA journal_mode=WAL")
        finally:
            conn.close()
        return keys, members

    # -- housekeeping ------------------------------------------------------------------------------
    def checkpoint(self) -> None:
        """Copy the WAL into the database file (a worker thread; passive: never blocks the
        writer)."""
        with self._ckpt_lock:
            if self._ckpt is None:
                self._ckpt = sqlite3.connect(self.path, isolation_level=None,
                                             check_same_thread=False)
            self._ckpt.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def _close_connections(self) -> None:
        conn = self._conn
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        if self._ckpt is not None:
            self._ckpt.close()
            self._ckpt = None
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.close()

    def close(self) -> None:
        """Commit and close (the node is stopping)."""
        self.flush()
        with self._lock, self._ckpt_lock:
            self._close_connections()


def _read_exact(reader: IO[bytes], n: int, *, allow_empty: bool = False) -> bytes:
    data = reader.read(n)
    while len(data) < n:
        more = reader.read(n - len(data))
        if not more:
            if allow_empty and not data:
                return b""
            raise CommandError("truncated snapshot")
        data += more
    return data


def _load_rows(reader: IO[bytes], conn: sqlite3.Connection,
               sealer: sv.ValueSealer | None = None) -> tuple[int, set[str]]:
    (count,) = _U64.unpack(_read_exact(reader, 8))
    batch: list[tuple[bytes, bytes]] = []
    for _ in range(count):
        (klen,) = _U32.unpack(_read_exact(reader, 4))
        key = _read_exact(reader, klen)
        key.decode("utf-8")
        (vlen,) = _U32.unpack(_read_exact(reader, 4))
        value = _read_exact(reader, vlen)
        batch.append((key, sealer.seal(key, value) if sealer is not None else value))
        if len(batch) >= _BATCH:
            conn.executemany("INSERT INTO kv VALUES (?, ?)", batch)
            batch = []
    if batch:
        conn.executemany("INSERT INTO kv VALUES (?, ?)", batch)
    (mcount,) = _U32.unpack(_read_exact(reader, 4))
    members: set[str] = set()
    for _ in range(mcount):
        (n,) = _U32.unpack(_read_exact(reader, 4))
        members.add(_read_exact(reader, n).decode("utf-8"))
    if reader.read(1):
        raise CommandError("trailing bytes in snapshot")
    return count, members
