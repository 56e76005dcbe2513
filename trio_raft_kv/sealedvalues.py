"""Values sealed at rest in kvnode's SQLite store (``serve --store sqlite --key-dir ...``).

With encryption on (the node has a key store and the cluster's envelope has an active data
key), the ``value`` column of ``kv`` holds, for every row, the raft envelope
(``trio_raft/envelope/envelope.py``: key id, nonce, AES-256-GCM ciphertext and tag; the
node's cipher and nonce source, so a (key, nonce) pair is never used twice) of::

    key length u32 | key (UTF-8) | value

The key inside the sealed value binds it to its row: a value moved to another key does not
open (:class:`~trio_raft_kv.errors.SealedStoreError`). Key names stay in clear: they are the
table's primary key (lookups by key, the row count); docs/envelope.md lists what is in clear.

The store is in one regime at a time, recorded in ``meta`` (``values_sealed`` = 1): all
values in clear, or all sealed. The switch (:func:`reseal_rows`) happens in one transaction
when the store first sees an active key, then the database is vacuumed and its WAL truncated
(``PRAGMA secure_delete`` zeroes freed cells), so no cleartext value stays in any file of the
store. A sealed store opened without a cipher, or with a key store lacking the key, refuses
to serve (:class:`~trio_raft_kv.errors.SealedStoreError`) rather than hand out ciphertext.
"""

from __future__ import annotations

import logging
import sqlite3
import struct
from typing import Protocol

from trio_raft_kv.errors import SealedStoreError

log = logging.getLogger("kvnode.sqlstore")
_U32 = struct.Struct(">I")
#: ``meta`` row naming the regime.
SEALED_META = "values_sealed"


class ValueCipher(Protocol):
    """What sealing values needs of ``trio_raft.envelope.Cipher``."""

    @property
    def active_key_id(self) -> int: ...

    def wrap(self, plaintext: bytes) -> bytes: ...

    def unwrap(self, data: bytes) -> bytes: ...


class ValueSealer:
    """Seals and opens the values of one store with the node's raft cipher."""

    def __init__(self, cipher: ValueCipher) -> None:
        self._cipher = cipher

    @property
    def ready(self) -> bool:
        """Whether there is an active data key (the envelope is on)."""
        try:
            return self._cipher.active_key_id != 0
        except Exception:  # no key store
            return False

    def seal(self, key: bytes, value: bytes) -> bytes:
        return self._cipher.wrap(_U32.pack(len(key)) + key + value)

    def open(self, key: bytes, blob: bytes) -> bytes:
        try:
            plain = self._cipher.unwrap(blob)
        except Exception as exc:
            raise SealedStoreError(f"the sealed value of key {key!r} does not open: "
                                   f"{exc}") from exc
        (n,) = _U32.unpack_from(plain, 0)
        if plain[4:4 + n] != key:
            raise SealedStoreError(f"the sealed value stored under key {key!r} belongs to "
                                   "another key")
        return plain[4 + n:]


def reseal_rows(conn: sqlite3.Connection, sealer: ValueSealer) -> int:
    """Seal every value of ``kv`` in the open transaction of ``conn``; returns the rows."""
    rows = conn.execute("SELECT key, value FROM kv").fetchall()
    conn.executemany("UPDATE kv SET value = ? WHERE key = ?",
                     ((sealer.seal(bytes(k), bytes(v)), k) for k, v in rows))
    conn.execute("INSERT OR REPLACE INTO meta VALUES (?, 1)", (SEALED_META,))
    return len(rows)


def scrub(conn: sqlite3.Connection) -> bool:
    """After a reseal commits: rebuild the file and empty its WAL, so no page that held a
    cleartext value stays in any file of the store. Returns False when a reader (a snapshot
    being written) kept it from finishing: the caller tries again later."""
    try:
        conn.execute("VACUUM")
        (busy, _log, _done) = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    except sqlite3.OperationalError as exc:
        log.info("kv store scrub postponed: %s", exc)
        return False
    return not busy
