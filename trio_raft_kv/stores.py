"""Which store ``kvnode serve --store`` runs on, and the upkeep the SQLite store needs.

``--store memory`` is :class:`~trio_raft_kv.statemachine.KVStateMachine` (a dict, rebuilt from
the newest snapshot at every start); ``--store sqlite`` is
:class:`~trio_raft_kv.sqlstore.SqliteKVStateMachine` in ``DATA_DIR/kv-store/kv.sqlite``.
:func:`store_upkeep` is a task of kvnode's nursery: it commits what was applied every
:data:`FLUSH_INTERVAL` seconds (the store's transaction boundary, with the applied index and the
cluster id) and checkpoints the SQLite WAL in a worker thread every
:data:`CHECKPOINT_INTERVAL` seconds. ``serve`` closes the store after the engine closed.
"""

from __future__ import annotations

import trio

from trio_raft_kv.sealedvalues import ValueCipher, ValueSealer
from trio_raft_kv.sqlstore import SqliteKVStateMachine, store_path
from trio_raft_kv.statemachine import KVStateMachine, KVStore

#: Seconds between two commits of what was applied (``store_upkeep``).
FLUSH_INTERVAL = 0.005
#: Seconds between two WAL checkpoints (``store_upkeep``, in a worker thread).
CHECKPOINT_INTERVAL = 1.0
STORES = ("memory", "sqlite")


def open_kv_store(kind: str, data_dir: str, cipher: ValueCipher | None = None) -> KVStore:
    """The state machine of ``serve --store KIND``; with ``cipher`` (``--key-dir``) the
    SQLite store seals its values once the envelope is on (``sealedvalues.py``)."""
    if kind == "memory":
        return KVStateMachine()
    if kind == "sqlite":
        return SqliteKVStateMachine(store_path(data_dir),
                                    sealer=ValueSealer(cipher) if cipher is not None else None)
    raise ValueError(f"unknown store {kind!r} (one of {', '.join(STORES)})")


async def store_upkeep(fsm: KVStore) -> None:
    """Commit what was applied every few milliseconds and checkpoint now and then (nothing to
    do for the in-memory store)."""
    if not isinstance(fsm, SqliteKVStateMachine):
        return
    next_checkpoint = trio.current_time() + CHECKPOINT_INTERVAL
    while True:
        await trio.sleep(FLUSH_INTERVAL)
        fsm.flush()
        if trio.current_time() >= next_checkpoint:
            await trio.to_thread.run_sync(fsm.checkpoint)
            next_checkpoint = trio.current_time() + CHECKPOINT_INTERVAL
