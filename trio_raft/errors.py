"""The trio_raft exception hierarchy.

Every error trio_raft raises on purpose is a subclass of :class:`RaftError`. The errors a request
can end with fall in two families that never mix: :class:`NotAppliedError` (certainly not
applied, always safe to retry) and :class:`OutcomeUnknownError` (may or may not be applied);
``docs/api.md`` tabulates what to do with each. ``default_message`` is the stable text callers may
log or match.
"""

from __future__ import annotations

from typing import Self

from trio_raft.core.errors import (
    CompactedError,
    ConfChangeError,
    CoreConfigError,
    DecodeError,
    ProposalDroppedError,
    RaftError,
    SnapOutOfDateError,
    SnapshotTemporarilyUnavailableError,
    StepLocalMsgError,
    StepPeerNotFoundError,
    StorageLogError,
    UnavailableError,
)

# --------------------------------------------------------------------------------------------
# Outcomes of a request (docs/api.md, "Errors and outcomes")
# --------------------------------------------------------------------------------------------


class NotAppliedError(RaftError):
    """The request was refused before raft saw it: it certainly was not applied, and retrying
    it (here later, or on the leader) is always safe. Base of the "not applied" family."""
    default_message = "raft engine: request not applied"


class OutcomeUnknownError(RaftError):
    """The request reached raft but this node stopped following it: it may or may not be
    applied. Resolve by reading the state back, or make the command idempotent (a request id
    the state machine remembers) and retry it. Base of the "outcome unknown" family; never
    a subclass of :class:`NotAppliedError` nor the other way round."""
    default_message = "raft engine: outcome unknown"


class NotLeaderError(NotAppliedError):
    """This node is not the leader; the request certainly was not applied."""
    default_message = "raft engine: not leader"


class LeadershipLostError(OutcomeUnknownError):
    """Leadership was lost while the request waited: its outcome is unknown, it may still commit."""
    default_message = "raft engine: leadership lost"


class EngineClosedError(NotAppliedError):
    """The engine is closed (or was closing) when the call was made, or the request was still
    queued, unseen by raft, when it closed: not applied. After a fatal error its
    ``__cause__`` is that error."""
    default_message = "raft engine is closed"


class EngineClosedWhileWaitingError(OutcomeUnknownError):
    """The engine was closed while the request waited for raft: its outcome is unknown."""
    default_message = "raft engine closed while the request waited"


class EngineFailedError(OutcomeUnknownError):
    """A fatal error stopped the engine while the request waited: its outcome is unknown.
    ``__cause__`` is the fatal error (which ``open_engine`` raises once, as itself)."""
    default_message = "raft engine stopped on a fatal error while the request waited"


class LeadershipTransferInProgressError(NotAppliedError):
    """A leadership transfer is in flight; proposals and reads fail fast until it ends."""
    default_message = "raft engine: leadership transfer in progress"


class LeadershipTransferNoHealthyTargetError(RaftError):
    """No candidate passed the transfer gates (progress, voter, recently active)."""
    default_message = "raft engine: leadership transfer has no healthy target"


class LeadershipTransferTargetNotCaughtUpError(RaftError):
    """The transfer target's match index lags more than allowed."""
    default_message = "raft engine: leadership transfer target is not caught up"


class LeadershipTransferConfChangePendingError(RaftError):
    """A configuration change is pending; transfers wait until it is applied."""
    default_message = "raft engine: leadership transfer blocked by pending config change"


class LeadershipTransferRejectedError(RaftError):
    """Raft refused the transfer (the target is not a voter)."""
    default_message = "raft engine: leadership transfer rejected by raft (target is not a voter)"


class LeadershipTransferTargetError(RaftError):
    """No usable transfer target was given (or the target is this node)."""
    default_message = "raft engine: leadership transfer target is required"


class LeadershipTransferNotReadyError(RaftError):
    """The configuration is empty or has no default transfer target."""
    default_message = "raft engine: leadership transfer is not ready"


class LeadershipTransferAbortedError(RaftError):
    """The transfer timed out or another node became leader."""
    default_message = "raft engine: leadership transfer aborted"


class LeadershipTransferNotLeaderError(NotLeaderError):
    """A transfer was requested on a node that is not the leader."""
    default_message = "raft engine: leadership transfer requires leader"


class MembershipChangePendingError(NotAppliedError):
    """At most one configuration change may be pending."""
    default_message = "raft engine: membership change blocked by pending config change"


class EnvelopeCutoverInProgressError(NotAppliedError):
    """The envelope cutover barrier is up; retry the proposal shortly."""
    default_message = "raft engine: envelope cutover in progress"


class StepQueueFullError(NotAppliedError):
    """The engine's inbound step queue is full; the sender retries."""
    default_message = "raft engine: inbound step queue is full"


class ConfigIndexMismatchError(NotAppliedError):
    """``prev_index`` did not equal the current configuration index."""
    default_message = "raft engine: configuration index does not match"


class FailedPreconditionError(NotAppliedError):
    """A membership precondition does not hold."""
    default_message = "raft engine: failed precondition"


class PromoteLearnerMinAppliedZeroError(FailedPreconditionError):
    default_message = "raft engine: promote learner requires a non-zero min applied index"


class PromoteLearnerNotLearnerError(FailedPreconditionError):
    default_message = "raft engine: promote target is not a learner"


class PromoteLearnerNoProgressError(FailedPreconditionError):
    default_message = "raft engine: promote target has no progress"


class PromoteLearnerNotCaughtUpError(FailedPreconditionError):
    default_message = "raft engine: promote target is not caught up"


class NothingToExportError(FailedPreconditionError):
    """``export_snapshot`` on a node that has applied nothing yet (a joining node)."""
    default_message = "raft engine: nothing applied yet, no snapshot to export"


class TooManyPendingConfigsError(NotAppliedError):
    default_message = "raft engine: too many pending configuration changes"


class ConfChangeContextTooLargeError(RaftError):
    default_message = "raft engine: configuration change context too large"


class TransportPeerUnknownError(NotAppliedError):
    """The named peer is unknown to the engine or transport."""
    default_message = "raft engine: peer is not configured"


# --------------------------------------------------------------------------------------------
# Configuration (open_engine validation)
# --------------------------------------------------------------------------------------------


class ConfigError(RaftError, ValueError):
    """An invalid engine configuration; raised by ``open_engine`` before anything starts."""


class NodeIDRequiredError(ConfigError):
    default_message = "raft node id is required"


class DataDirRequiredError(ConfigError):
    default_message = "raft data dir is required"


class StateMachineUnsetError(ConfigError):
    default_message = "raft state machine is not set"


class NoPeersConfiguredError(ConfigError):
    default_message = (
        "raft refuses to self-bootstrap: no persisted peers and no peer list was supplied; "
    "pass peers or bootstrap=True to start a fresh cluster"
    )


class PeerIDRequiredError(ConfigError):
    default_message = "raft peer id is required"


class PeerAddressRequiredError(ConfigError):
    default_message = "raft peer address is required"


class LocalPeerMissingError(ConfigError):
    default_message = "raft local peer is missing from the peer list"


class PeerNodeIDConflictError(ConfigError):
    default_message = "raft peer node id conflict"


class PeerFormatInvalidError(ConfigError):
    default_message = "raft peer format is invalid (want id=host:port)"


class JoinAsLearnerBootstrapError(ConfigError):
    """``join_as_learner`` and ``bootstrap`` contradict each other: a joining node never forms
    a cluster."""
    default_message = "raft engine: join_as_learner cannot bootstrap"


class ClusterMismatchError(ConfigError):
    default_message = "raft persisted cluster does not match configured peers"


class ClusterIdMismatchError(ClusterMismatchError):
    """A snapshot, or the state machine's own store, belongs to another cluster than this
    data dir (their cluster ids differ)."""
    default_message = "raft cluster id mismatch"


class StateMachineAheadError(ClusterMismatchError):
    """The state machine's store reports an applied index this node's log does not reach:
    it belongs to another history (for example a store kept while the data dir was replaced).
    The engine refuses to start rather than skip or replay over it."""
    default_message = "state machine store is ahead of the raft log"


# --------------------------------------------------------------------------------------------
# Storage
# --------------------------------------------------------------------------------------------


class StorageError(RaftError):
    """Base of on-disk storage errors. Messages name the file involved."""


class StorageIOError(StorageError):
    """A file operation of the storage layer failed (a write, fsync, rename, create, read, ...).

    The message names the operation and the file; ``__cause__`` is the :class:`OSError`, whose
    ``errno`` is also copied to :attr:`errno`. Nothing the failed operation was writing may be
    assumed durable. Build one with :meth:`from_os_error`.
    """

    #: The operation that failed: "write", "fsync", "fdatasync", "create", "rename", "read", ...
    op: str = ""
    #: The file (or directory) the operation was on.
    path: str = ""
    #: The ``errno`` of the underlying :class:`OSError` (``None`` if it had none).
    errno: int | None = None

    @classmethod
    def from_os_error(cls, op: str, path: str, exc: OSError, context: str = "") -> Self:
        """An error for ``op`` on ``path`` caused by ``exc``; raise it ``from exc``.

        ``context`` (e.g. "wal: cutting a new segment") prefixes the message.
        """
        reason = exc.strerror or str(exc) or type(exc).__name__
        message = f"{op} {path} failed: {reason} (errno {exc.errno})"
        err = cls(f"{context}: {message}" if context else message)
        err.op, err.path, err.errno = op, path, exc.errno
        return err


class WALError(StorageError):
    """Base of the write-ahead log's errors."""


class WALIOError(WALError, StorageIOError):
    """A WAL file operation failed. When it happened while writing, the WAL is poisoned."""


class WALPoisonedError(WALError):
    """The WAL refuses every write after an earlier write, fsync or cut failed.

    ``__cause__`` is the first failure. The only way on is to close the WAL and reopen the
    directory, which repairs a torn tail and shows exactly what reached the disk.
    """


class WALCorruptError(WALError):
    """A WAL record in the middle of a segment fails its CRC or is impossible. Fatal."""


class WALUnrepairableError(WALError):
    """A torn WAL tail could not be repaired."""


class WALSnapshotNotFoundError(WALError):
    """The WAL holds no marker for the snapshot it was opened at, or was purged past it."""
    default_message = "wal: snapshot not found"


class WALLockedError(WALError):
    """Another process holds the WAL directory lock."""
    default_message = "wal: directory is locked by another process"


class SnapshotFileError(StorageError):
    """A snapshot metadata file is corrupt or unreadable."""


class PeersFileError(StorageError):
    """The peers file is corrupt, of an unknown version, or out of limits."""


class SnapshotRequiredError(StorageError):
    default_message = "raft snapshot data is required"


class MigrationDestinationExistsError(StorageError):
    default_message = "migration: destination already exists"


class SnapshotDescriptorError(StorageError):
    """A snapshot descriptor (the ``data`` of a raft snapshot: token, cluster id, members;
    ``docs/storage.md`` section 4a) is damaged, of an unknown version, or holds a critical
    record this version does not understand."""
    default_message = "snapshot descriptor is invalid"


class ClusterIdFileError(StorageError):
    """The cluster id file of a data dir is damaged (bad magic, version, length or CRC)."""
    default_message = "cluster id file is corrupt"


class BackupFileError(StorageError):
    """A backup file (``docs/formats.md``, backups) is damaged, truncated, of an unknown
    version, or not a backup at all. Nothing was restored from it."""
    default_message = "backup file is damaged"


class DataDirNotEmptyError(StorageError):
    """Restoring a backup needs an empty (or absent) data dir; this one holds files."""
    default_message = "data dir is not empty"


class RecoveryError(StorageError):
    """``recover_cluster`` cannot rewrite this data dir as asked (the peers are not members,
    this node is not among them, a joint configuration, nothing to recover). Nothing was
    changed."""
    default_message = "cluster recovery refused"


class FSMSnapshotError(StorageError):
    """Base of the ``.fsm`` payload file errors (``docs/storage.md``, payload files)."""


class FSMSnapshotFileCRCError(FSMSnapshotError):
    default_message = "fsm snapshot: file CRC32C mismatch (file corrupt)"


class FSMSnapshotTokenCRCError(FSMSnapshotError):
    default_message = "fsm snapshot: token CRC32C mismatch (metadata corrupt)"


class FSMSnapshotNotFoundError(FSMSnapshotError):
    default_message = "fsm snapshot: file not found"


class FSMSnapshotTooSmallError(FSMSnapshotError):
    default_message = "fsm snapshot: file too small to contain footer"


class FSMSnapshotTokenInvalidError(FSMSnapshotError):
    default_message = "fsm snapshot: token format invalid"


class FSMSnapshotTooLargeError(FSMSnapshotError):
    default_message = "fsm snapshot: payload exceeds maximum in-memory size limit"


class SealedSnapshotError(FSMSnapshotError):
    """A sealed snapshot payload (``docs/formats.md``, sealed payloads) cannot be opened; the
    message names the file. Never a silent restore: on restore it is fatal."""
    default_message = "sealed snapshot payload cannot be opened"


class SealedSnapshotIntegrityError(SealedSnapshotError):
    """A sealed payload is damaged, truncated, reordered, was sealed for another snapshot, or
    under other key material than the key id it names (a chunk's tag does not verify)."""
    default_message = "sealed snapshot payload: integrity check failed"


class SealedSnapshotKeyError(SealedSnapshotError):
    """A sealed payload names a key id this node does not have, or no raft cipher is wired."""
    default_message = "sealed snapshot payload: key unavailable"


class SealedSnapshotRequiredError(SealedSnapshotError):
    """A cleartext payload arrived for a snapshot above this node's envelope cutover, where
    every payload is sealed; it is refused before any of it is kept."""
    default_message = "snapshot payload above the envelope cutover is not sealed"


# --------------------------------------------------------------------------------------------
# Transport
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Envelope encryption and apply halts
# --------------------------------------------------------------------------------------------


class EnvelopeError(RaftError):
    """Base of envelope (AES-256-GCM entry encryption) errors."""


class EnvelopeShortError(EnvelopeError):
    default_message = "envelope: too short"


class EnvelopeVersionError(EnvelopeError):
    default_message = "envelope: unsupported version"


class UnknownKeyIDError(EnvelopeError):
    default_message = "envelope: unknown key id"


class ReservedKeyIDError(EnvelopeError):
    default_message = "envelope: key id 0 is reserved"


class BadNonceSizeError(EnvelopeError):
    default_message = "envelope: bad nonce size"


class IntegrityError(EnvelopeError):
    default_message = "envelope: integrity check failed"


class NilKeystoreError(EnvelopeError):
    default_message = "envelope: no keystore"


class KeyStoreError(EnvelopeError):
    """The key store could not be read, written or used."""
    default_message = "envelope: key store error"


class KeyStoreCorruptError(KeyStoreError):
    """A key store or nonce state file failed its checksum or layout checks."""
    default_message = "envelope: key store file is corrupt"


class KEKError(KeyStoreError):
    """The key-encryption key is missing, malformed, misplaced, or does not match the store."""
    default_message = "envelope: key-encryption key error"


class KEKPermissionError(KEKError):
    """A KEK file is readable or writable by its group or by others (as ssh refuses such a
    private key): ``chmod 600`` it."""
    default_message = "envelope: KEK file permissions are too open"


class KeyConflictError(KeyStoreError):
    """A key id is already installed with different key material."""
    default_message = "envelope: key id already installed with different material"


class NonceExhaustedError(EnvelopeError):
    """The persisted nonce epoch has no values left; rotate to a new key store."""
    default_message = "envelope: nonce space exhausted"


class ReservedPrefixError(EnvelopeError):
    """A cleartext proposal starts with the prefix reserved for envelope control records."""
    default_message = "envelope: payload starts with the reserved control prefix"


class EncryptionScanError(EnvelopeError):
    """The encryption scanner could not scan the requested range (``docs/envelope.md``)."""
    default_message = "envelope: encryption scan failed"


class RaftUnwrapFailedError(RaftError):
    """An entry above the cutover could not be unwrapped. Fatal: apply halts on that entry."""
    default_message = "raft envelope unwrap failed; halting apply"


class EnvelopeRegimeError(RaftUnwrapFailedError):
    """An entry or snapshot whose regime (cleartext or wrapped) this node cannot establish:
    an entry it takes for cleartext authenticates as an envelope under an installed key, or a
    sealed snapshot carries no cutover index. Fatal like any unwrap failure: nothing of it
    reaches the state machine."""
    default_message = "raft envelope: cannot classify entry; halting apply"


class JoinedAsVoterError(RaftError):
    """A node started with ``join_as_learner`` was added as a voter: it refuses to serve (the
    engine stops) until an operator removes it and adds it back as a learner."""
    default_message = "raft engine: join_as_learner node was added as a voter"


class FSMApplyHaltError(RaftError):
    """The state machine asked apply to halt: a response whose ``halt_apply()`` returned an
    error."""
    default_message = "FSM-requested apply halt"


class MetricsUnavailableError(RaftError, ImportError):
    """``trio_raft.metrics`` needs prometheus-client, which is not installed (install the
    ``metrics`` extra: ``pip install 'trio-raft[metrics]'``)."""
    default_message = ("trio_raft.metrics needs prometheus-client: "
                       "pip install 'trio-raft[metrics]'")


_CORE_ERRORS = (
    CompactedError,
    ConfChangeError,
    CoreConfigError,
    DecodeError,
    ProposalDroppedError,
    SnapOutOfDateError,
    SnapshotTemporarilyUnavailableError,
    StepLocalMsgError,
    StepPeerNotFoundError,
    StorageLogError,
    UnavailableError,
)

__all__ = sorted(
    name
    for name, obj in list(globals().items())
    if isinstance(obj, type) and issubclass(obj, RaftError)
)
