"""The log-storage interface the core reads from, and an in-memory implementation.

The core never writes durable state itself: the driver persists each Ready (WAL, snapshot files)
and then mirrors it into a :class:`Storage` (``append``, ``set_hard_state``, ``apply_snapshot``) so
that the core can read back entries and terms. :class:`MemoryStorage` is that mirror; it is also
what the deterministic simulator uses as "stable storage".

Index arithmetic follows etcd: the storage holds a dummy entry at ``snapshot.index`` carrying the
snapshot's term, so ``first_index() == snapshot.index + 1``.
"""

from __future__ import annotations

from typing import Protocol

from trio_raft.core.errors import (
    CompactedError,
    SnapOutOfDateError,
    UnavailableError,
)
from trio_raft.core.messages import (
    EMPTY_HARD_STATE,
    ENTRY_OVERHEAD,
    ConfState,
    Entry,
    HardState,
    Snapshot,
    SnapshotMetadata,
)


class Storage(Protocol):
    def initial_state(self) -> tuple[HardState, ConfState]: ...

    def entries(self, lo: int, hi: int, max_size: int | None = None) -> list[Entry]:
        """Entries in ``[lo, hi)``; at least one entry is returned even past ``max_size``."""
        ...

    def term(self, index: int) -> int: ...

    def first_index(self) -> int: ...

    def last_index(self) -> int: ...

    def snapshot(self) -> Snapshot: ...


def limit_size(entries: list[Entry], max_size: int | None) -> list[Entry]:
    """Keep a prefix of ``entries`` whose total size stays within ``max_size`` (at least one)."""
    if max_size is None or len(entries) <= 1:
        return entries
    overhead = ENTRY_OVERHEAD
    size = 0
    for n, ent in enumerate(entries):
        size += len(ent.data) + overhead
        if size > max_size and n > 0:
            return entries[:n]
    return entries


class MemoryStorage:
    """An in-memory :class:`Storage`. Not thread-safe: the engine touches it only from its loop."""

    def __init__(self) -> None:
        self._hard_state = EMPTY_HARD_STATE
        self._snapshot = Snapshot()
        # _ents[0] is the dummy entry at the snapshot index.
        self._ents: list[Entry] = [Entry(term=0, index=0)]

    # -- reads ----------------------------------------------------------------------------
    def initial_state(self) -> tuple[HardState, ConfState]:
        return self._hard_state, self._snapshot.metadata.conf_state

    @property
    def hard_state(self) -> HardState:
        return self._hard_state

    def first_index(self) -> int:
        return self._ents[0].index + 1

    def last_index(self) -> int:
        return self._ents[0].index + len(self._ents) - 1

    def term(self, index: int) -> int:
        offset = self._ents[0].index
        if index < offset:
            raise CompactedError()
        if index - offset >= len(self._ents):
            raise UnavailableError()
        return self._ents[index - offset].term

    def entries(self, lo: int, hi: int, max_size: int | None = None) -> list[Entry]:
        offset = self._ents[0].index
        if lo <= offset:
            raise CompactedError()
        if hi > self.last_index() + 1:
            raise UnavailableError(f"entries hi({hi}) beyond last index {self.last_index()}")
        if len(self._ents) == 1:  # only the dummy entry
            raise UnavailableError()
        return limit_size(self._ents[lo - offset : hi - offset], max_size)

    def snapshot(self) -> Snapshot:
        return self._snapshot

    # -- writes (the driver mirrors persisted state here) ---------------------------------
    def set_hard_state(self, hs: HardState) -> None:
        self._hard_state = hs

    def apply_snapshot(self, snap: Snapshot) -> None:
        """Replace everything with ``snap``. Raises SnapOutOfDateError for an older snapshot."""
        if self._snapshot.metadata.index >= snap.metadata.index:
            raise SnapOutOfDateError()
        self._snapshot = snap
        self._ents = [Entry(term=snap.metadata.term, index=snap.metadata.index)]

    def create_snapshot(
        self, index: int, conf_state: ConfState | None, data: bytes
    ) -> Snapshot:
        """Record a snapshot at ``index`` (<= last index) without discarding entries."""
        if index <= self._snapshot.metadata.index:
            raise SnapOutOfDateError()
        offset = self._ents[0].index
        if index > self.last_index():
            raise UnavailableError(f"snapshot {index} beyond last index {self.last_index()}")
        cs = conf_state if conf_state is not None else self._snapshot.metadata.conf_state
        self._snapshot = Snapshot(
            SnapshotMetadata(conf_state=cs, index=index, term=self._ents[index - offset].term),
            data,
        )
        return self._snapshot

    def compact(self, compact_index: int) -> None:
        """Discard entries before ``compact_index`` (it becomes the new dummy entry)."""
        offset = self._ents[0].index
        if compact_index <= offset:
            raise CompactedError()
        if compact_index > self.last_index():
            raise UnavailableError(f"compact {compact_index} beyond last index {self.last_index()}")
        i = compact_index - offset
        dummy = Entry(term=self._ents[i].term, index=self._ents[i].index)
        self._ents = [dummy, *self._ents[i + 1 :]]

    def append(self, entries: list[Entry] | tuple[Entry, ...]) -> None:
        """Append, truncating any conflicting suffix. Entries below first_index are ignored."""
        if not entries:
            return
        first = self.first_index()
        last = entries[0].index + len(entries) - 1
        if last < first:
            return
        if first > entries[0].index:
            entries = entries[first - entries[0].index :]
        offset = entries[0].index - self._ents[0].index
        n = len(self._ents)
        if n > offset:
            self._ents = self._ents[:offset]
            self._ents.extend(entries)
        elif n == offset:
            self._ents.extend(entries)
        else:
            raise UnavailableError(
                f"missing log entry [last: {self.last_index()}, append at: {entries[0].index}]"
            )
