"""The cold-start skip: not restoring a snapshot the state machine's own store already holds.

A state machine that keeps its state in a durable store (a database) need not be rebuilt from
the newest snapshot at every start. It says what its store holds through optional methods,
looked up once at open (``docs/api.md``, the state machine):

* ``set_cluster_id(cluster_id)``: the cluster id of this data dir, given before anything it
  covers is restored or applied; the store keeps it with its data;
* ``set_apply_index(index)``: the index of the entry about to be applied, and of a snapshot
  about to be restored (the restored state covers it);
* ``durable_state() -> (cluster_id, applied_index) | None``: what the store holds durably;
  None when it holds nothing durable (an in-memory state machine).

The invariant the state machine must keep: **the applied index is written in the same
transaction as the data it covers** (and the cluster id with them), so after any crash the
store holds exactly the effect of the entries up to the index it reports.

At a restart (:meth:`ColdStart.skip_restore`, asked by ``open_disk_state`` before it would
restore), with ``s`` the snapshot's index, ``D`` the data dir's cluster id and ``(C, k)`` the
store's durable state:

* ``C == D`` (``D`` known) and ``k >= s``: **skip**. The snapshot payload is not read (its CRC is
  checked when it is used: sent to a follower, or restored later). Entries above ``k`` are
  replayed into the state machine; entries in ``(s, k]`` are still processed by the engine for
  configuration changes, envelope control records and cluster records, without ``apply``.
  If ``k`` is beyond the recovered log, the store belongs to another history:
  :class:`~trio_raft.errors.StateMachineAheadError`, nothing is started;
* otherwise (no durable state, another or no cluster id, the store behind the snapshot):
  **restore** as always, ``set_apply_index(s)`` first;
* a store that holds data the engine can neither skip to nor replace (no snapshot to restore,
  while the log holds entries to apply over it) is refused:
  :class:`~trio_raft.errors.ClusterIdMismatchError`.

What happened is reported in an :class:`OpenReport` (``Engine.open_report()``), a log line and
the metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import attrs

from trio_raft.core.messages import Snapshot
from trio_raft.engine.identity import ClusterIdentity
from trio_raft.errors import ClusterIdMismatchError, StateMachineAheadError

logger = logging.getLogger(__name__)


@attrs.frozen
class OpenReport:
    """What opening the engine did with the state machine (``Engine.open_report()``)."""

    #: ``restart``, ``bootstrap`` or ``join`` (``trio_raft.storage.RecoveryKind``).
    kind: str
    #: Index of the snapshot the node started from (0: none).
    snapshot_index: int = 0
    #: The state machine was restored from that snapshot.
    restored: bool = False
    #: The restore was skipped: the state machine's store already held the snapshot.
    skipped: bool = False
    #: The applied index the state machine's store reported (0: it reported nothing).
    store_index: int = 0
    #: Entries given to the state machine's ``apply`` while opening.
    entries_replayed: int = 0
    #: Entries the store already held, processed by the engine only (configuration changes,
    #: control records) while opening.
    entries_skipped: int = 0
    #: The cluster id when known at open ("" otherwise).
    cluster_id: str = ""
    #: Seconds from the start of ``open_engine`` until the engine ran (replay included).
    seconds: float = 0.0


class ColdStart:
    """The restore policy of one open (see the module docstring)."""

    def __init__(self, state_machine: Any, identity: ClusterIdentity) -> None:
        self._identity = identity
        self._durable_state: Callable[[], Any] | None = getattr(
            state_machine, "durable_state", None)
        self._set_apply_index: Callable[[int], None] | None = getattr(
            state_machine, "set_apply_index", None)
        #: The index below which the state machine already holds every entry (0: none).
        self.fsm_index = 0
        #: What the store reported (index), 0 when nothing.
        self.store_index = 0
        self.skipped = False

    def _store_state(self) -> tuple[str, int] | None:
        if self._durable_state is None:
            return None
        state = self._durable_state()
        if state is None:
            return None
        cid, index = state
        if not isinstance(cid, str) or not isinstance(index, int) or index < 0:
            raise TypeError(f"durable_state() must return (str, int >= 0) or None, "
                            f"not {state!r}")
        return cid, index

    def skip_restore(self, snapshot: Snapshot, last_index: int, cluster_id: str | None
                     ) -> bool:
        identity = self._identity
        identity.cluster_id = cluster_id
        identity.tell_state_machine()
        s = snapshot.metadata.index
        state = self._store_state()
        if state is not None:
            store_id, k = state
            self.store_index = k
            if cluster_id is not None and store_id == cluster_id:
                if k > last_index:
                    raise StateMachineAheadError(
                        f"the state machine's store holds index {k} of cluster {store_id}, "
                        f"beyond this node's log (last index {last_index}): it belongs to "
                        "another history")
                if k >= s:
                    self.fsm_index = k
                    self.skipped = not snapshot.is_empty()
                    return True
            elif k > 0 and snapshot.is_empty() and last_index > 0:
                raise ClusterIdMismatchError(
                    f"the state machine's store holds data (index {k}, cluster "
                    f"{store_id or 'unknown'}) of another history and this data dir has no "
                    "snapshot to replace it with: empty the store")
        if not snapshot.is_empty() and self._set_apply_index is not None:
            self._set_apply_index(s)
        return False
