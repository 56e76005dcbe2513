"""The in-memory log storage the core reads from (re-exported from :mod:`trio_raft.core.storage`).

:class:`MemoryStorage` mirrors what the storage layer has made durable: recovery
(:func:`trio_raft.storage.recovery.open_disk_state`) rebuilds one from the newest snapshot, the
hard state and the WAL entries after the snapshot; afterwards the engine mirrors every persisted
Ready into it (``append``, ``set_hard_state``, ``apply_snapshot``) and compacts it after local
snapshots (``create_snapshot``, ``compact``). It lives in the core because the deterministic
simulator uses it as "stable storage" too.
"""

from trio_raft.core.storage import MemoryStorage, Storage, limit_size

__all__ = ["MemoryStorage", "Storage", "limit_size"]
