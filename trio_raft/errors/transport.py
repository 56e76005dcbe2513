"""Transport errors: codec, snapshot streams, peers, sends.

Part of :mod:`trio_raft.errors` (which re-exports every name); the hierarchy and the
outcome families are described there and in ``docs/api.md``.
"""

from __future__ import annotations

from trio_raft.core.errors import (
    DecodeError,
    RaftError,
)


class TransportError(RaftError):
    """Base of transport errors."""


class CodecError(TransportError, DecodeError):
    """Bytes from the wire do not decode as a raft message."""


class TransportHandlerNilError(TransportError):
    default_message = "raft transport handler is not set"


class SnapshotStreamError(TransportError):
    """Base of snapshot stream protocol violations."""


class SnapshotMetadataNilError(SnapshotStreamError):
    default_message = "raft snapshot stream metadata is missing"


class SnapshotMetadataDuplicateError(SnapshotStreamError):
    default_message = "raft snapshot stream metadata is duplicated"


class SnapshotStreamShortError(SnapshotStreamError):
    default_message = "raft snapshot stream closed before final chunk"


class SnapshotPayloadTooLargeError(SnapshotStreamError):
    default_message = "raft snapshot payload exceeds limit"


class ReceivedFSMSnapshotStaleError(SnapshotStreamError):
    """A received snapshot is at or below the applied index, or another payload at its index is
    still waiting to be installed: it is refused and its spool removed."""
    default_message = "raft received fsm snapshot is stale"


class SnapshotPayloadCRCError(SnapshotStreamError):
    """The CRC32C of a received payload differs from the one its sender announced (the payload
    was damaged on the way): nothing is finalized."""
    default_message = "raft received snapshot payload CRC32C mismatch"


class SnapshotTransferCancelledError(SnapshotStreamError):
    """An incoming snapshot transfer was cancelled on this node (the transport closed or the
    engine detached): its spool is removed and the sender sees UNAVAILABLE."""
    default_message = "raft snapshot transfer cancelled by the receiver"


class PeerStreamClosedError(TransportError):
    default_message = "raft peer stream closed"


class SendStreamDisabledError(TransportError):
    default_message = "raft send stream disabled"


class TransportAttachedError(TransportError):
    """``attach`` was called on a transport that already has a handler; ``detach`` first."""
    default_message = "raft transport already has a handler attached"


class TransportClosedError(TransportError):
    """The transport is closed (or not started): nothing can be sent or received."""
    default_message = "raft transport is closed"


class TransportBindError(TransportError, OSError):
    """``GRPCTransport.serve`` could not listen on its address (in use, not a local address, no
    permission). ``address`` is the ``host:port`` it tried; the ``OSError`` is the cause."""
    default_message = "raft transport cannot listen on its address"

    def __init__(self, *args: object, address: str = "") -> None:
        super().__init__(*args)
        self.address = address


class DispatchError(TransportError):
    """A message could not be delivered to a peer.

    ``code`` names the failure the way the engine counts it: a gRPC status name in CamelCase
    ("Unavailable", "DeadlineExceeded", "ResourceExhausted", ...), or
    "Unknown" when no status applies.
    """
    default_message = "raft transport dispatch failed"

    def __init__(self, *args: object, code: str = "Unknown") -> None:
        super().__init__(*args)
        self.code = code
