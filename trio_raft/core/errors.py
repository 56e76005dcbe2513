"""Errors raised by the sans-IO core.

The root of the project's exception hierarchy, :class:`RaftError`, lives here so that
``trio_raft.core`` depends on nothing else in the package; ``trio_raft.errors`` re-exports
everything below and builds the rest of the hierarchy on the same root.
"""

from __future__ import annotations

from typing import Any, ClassVar


class RaftError(Exception):
    """Base class of every error trio_raft raises on purpose.

    Subclasses set ``default_message``; a detail passed to the constructor is appended to it
    (``NotLeaderError("id=n2")`` reads "raft engine: not leader: id=n2").
    """

    default_message: ClassVar[str] = ""

    def __init__(self, *args: Any) -> None:
        default = self.default_message
        if default:
            if not args:
                args = (default,)
            elif isinstance(args[0], str) and not args[0].startswith(default):
                args = (f"{default}: {args[0]}", *args[1:])
        super().__init__(*args)


class StorageLogError(RaftError):
    """Base of the log-storage conditions the core understands (etcd's ErrCompacted & co)."""


class CompactedError(StorageLogError):
    """The requested index is older than the first index still held: it was compacted."""

    default_message = "requested index is unavailable due to compaction"


class UnavailableError(StorageLogError):
    """The requested index is newer than anything the storage holds."""

    default_message = "requested entry at index is unavailable"


class SnapOutOfDateError(StorageLogError):
    """A snapshot older than the one already held was offered."""

    default_message = "requested index is older than the existing snapshot"


class SnapshotTemporarilyUnavailableError(StorageLogError):
    """The storage cannot produce a snapshot right now; the core retries later."""

    default_message = "snapshot is temporarily unavailable"


class ProposalDroppedError(RaftError):
    """The core dropped a proposal (no leader, not leader, transfer in progress, ...)."""

    default_message = "raft proposal dropped"


class StepLocalMsgError(RaftError):
    """A local-only message type was passed to ``RawNode.step``."""

    default_message = "raft: cannot step raft local message"


class StepPeerNotFoundError(RaftError):
    """A response message came from a node the leader does not track."""

    default_message = "raft: cannot step as peer not found"


class ConfChangeError(RaftError):
    """A configuration change is malformed or not allowed (e.g. joint consensus)."""


class CoreConfigError(RaftError):
    """The core's :class:`~trio_raft.core.raft.Config` is invalid."""


class DecodeError(RaftError, ValueError):
    """Bytes do not decode as the expected value (truncated, out of limits, unknown type)."""
