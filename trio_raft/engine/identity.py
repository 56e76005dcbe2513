"""The cluster id on a running node: adopting it, and choosing one through the log.

Every member of a cluster holds the same cluster id (``trio_raft/storage/cluster_id.py``: what
it is for, where it is kept). A data dir has one from the start after a single-voter bootstrap,
a single-voter restore or a recovery. Otherwise (several voters bootstrapped or restored
together, or a data dir written before cluster ids existed) the cluster acquires one through
the log:

* a leader that has applied an entry of its own term (so it has applied every entry committed
  before its term, Raft paper §5.4.2) and still knows no cluster id proposes a *cluster record*
  holding a fresh random id, at most once per term;
* every node adopts the id of the first cluster record it applies, when it has none. Records
  are applied in log order on every node, so all adopt the same one; a later record (two
  leaders raced, or one was replayed after a restart) changes nothing;
* a node that installs a snapshot whose descriptor carries an id adopts it; a snapshot naming
  another id than the node's is refused (:class:`~trio_raft.errors.ClusterIdMismatchError`,
  fatal: the node belongs to another history).

Adopting writes the cluster id file (atomically, through the file-I/O seam) before the entry or
snapshot that carried it counts as applied, then tells the state machine
(``set_cluster_id``, when it has that method) before any later apply or restore.

Cluster record (entry data, never inside the proposal envelope, so no client proposal can forge
one: every client payload is wrapped as ``0x01 | request id | payload``, ``contexts.py``)::

    0x04 | b"TRCL" | version u8 = 1 | id length u8 | id (ASCII)
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from typing import Any

from trio_raft.core.errors import RaftError as CoreRaftError
from trio_raft.core.messages import NONE, Entry, StateType
from trio_raft.core.rawnode import RawNode
from trio_raft.engine.diskio import DiskRunner
from trio_raft.errors import ClusterIdMismatchError, SnapshotDescriptorError
from trio_raft.storage.cluster_id import new_cluster_id, save_cluster_id
from trio_raft.storage.descriptor import check_cluster_id
from trio_raft.storage.fileio import FileIO

logger = logging.getLogger(__name__)

RECORD_PREFIX = b"\x04TRCL"
_HEAD = struct.Struct(">5sBB")


def encode_cluster_record(cluster_id: str) -> bytes:
    raw = check_cluster_id(cluster_id).encode("ascii")
    return _HEAD.pack(RECORD_PREFIX, 1, len(raw)) + raw


def is_cluster_record(data: bytes) -> bool:
    return data[:len(RECORD_PREFIX)] == RECORD_PREFIX


def decode_cluster_record(data: bytes) -> str | None:
    """The id a cluster record carries; None for a record of an unknown version or a damaged
    one (logged and ignored: every node ignores it alike)."""
    if len(data) < _HEAD.size:
        return None
    _prefix, version, n = _HEAD.unpack_from(data)
    if version != 1 or len(data) != _HEAD.size + n:
        return None
    try:
        return check_cluster_id(data[_HEAD.size:].decode("ascii"))
    except (UnicodeDecodeError, SnapshotDescriptorError):
        return None


class ClusterIdentity:
    """The node's cluster id and the rules above. Built at open (any thread); used by the run
    loop's applier afterwards."""

    def __init__(self, *, data_dir: str, file_io: FileIO, cluster_id: str | None,
                 state_machine: Any) -> None:
        self._data_dir = data_dir
        self._file_io = file_io
        self.cluster_id = cluster_id
        self._set_cluster_id: Callable[[str], None] | None = getattr(
            state_machine, "set_cluster_id", None)
        self._told: str | None = None
        self._proposed_term = 0
        #: Cluster records proposed by this node (tests and logs).
        self.proposed = 0

    def tell_state_machine(self) -> None:
        """Give the state machine the id (once per id), if it wants it and one is known."""
        cid = self.cluster_id
        if cid is not None and cid != self._told and self._set_cluster_id is not None:
            self._set_cluster_id(cid)
            self._told = cid

    def check_snapshot(self, cluster_id: str, index: int) -> None:
        """Refuse a snapshot of another cluster (ClusterIdMismatchError)."""
        if cluster_id and self.cluster_id is not None and cluster_id != self.cluster_id:
            raise ClusterIdMismatchError(
                f"the snapshot at index {index} belongs to cluster {cluster_id}, this node to "
                f"cluster {self.cluster_id}")

    async def adopt(self, cluster_id: str, io: DiskRunner, source: str) -> bool:
        """Record ``cluster_id`` when the node has none yet; returns whether it did."""
        if self.cluster_id is not None:
            if cluster_id != self.cluster_id:
                logger.info("cluster id %s from %s ignored: this node's is %s", cluster_id,
                            source, self.cluster_id)
            return False
        await io.run(lambda: save_cluster_id(self._data_dir, cluster_id,
                                             file_io=self._file_io))
        self.cluster_id = cluster_id
        logger.info("cluster id %s adopted from %s", cluster_id, source)
        self.tell_state_machine()
        return True

    def maybe_propose(self, node: RawNode, applied: Entry | None) -> None:
        """On a leader that knows no id and has applied ``applied``, an entry of its own term:
        propose a cluster record (once per term; raft may drop it, a later term retries)."""
        r = node.raft
        if (self.cluster_id is not None or applied is None or r.state is not StateType.LEADER
                or applied.term != r.term or self._proposed_term == r.term
                or r.lead_transferee != NONE):
            return
        self._proposed_term = r.term
        try:
            node.propose_entries([Entry(0, 0, data=encode_cluster_record(new_cluster_id()))])
        except CoreRaftError as exc:
            logger.debug("cluster record not proposed: %s", exc)
            return
        self.proposed += 1
        logger.info("proposed a cluster id (term %d)", r.term)
