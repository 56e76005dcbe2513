"""The trio_raft exception hierarchy.

Every error trio_raft raises on purpose is a subclass of :class:`RaftError`. The errors a request
can end with fall in two families that never mix: :class:`NotAppliedError` (certainly not
applied, always safe to retry) and :class:`OutcomeUnknownError` (may or may not be applied);
``docs/api.md`` tabulates what to do with each. ``default_message`` is the stable text callers may
log or match.

The classes live in one module per concern (``outcomes``, ``config``, ``storage``,
``transport``, ``envelope``); the errors of the sans-IO core are in
:mod:`trio_raft.core.errors`. Every name is re-exported here: import from ``trio_raft.errors``.
"""

from __future__ import annotations

from trio_raft.core.errors import CompactedError as CompactedError
from trio_raft.core.errors import ConfChangeError as ConfChangeError
from trio_raft.core.errors import CoreConfigError as CoreConfigError
from trio_raft.core.errors import DecodeError as DecodeError
from trio_raft.core.errors import ProposalDroppedError as ProposalDroppedError
from trio_raft.core.errors import RaftError as RaftError
from trio_raft.core.errors import SnapOutOfDateError as SnapOutOfDateError
from trio_raft.core.errors import (
    SnapshotTemporarilyUnavailableError as SnapshotTemporarilyUnavailableError,
)
from trio_raft.core.errors import StepLocalMsgError as StepLocalMsgError
from trio_raft.core.errors import StepPeerNotFoundError as StepPeerNotFoundError
from trio_raft.core.errors import StorageLogError as StorageLogError
from trio_raft.core.errors import UnavailableError as UnavailableError
from trio_raft.errors.config import ClusterIdMismatchError as ClusterIdMismatchError
from trio_raft.errors.config import ClusterMismatchError as ClusterMismatchError
from trio_raft.errors.config import ConfigError as ConfigError
from trio_raft.errors.config import DataDirRequiredError as DataDirRequiredError
from trio_raft.errors.config import JoinAsLearnerBootstrapError as JoinAsLearnerBootstrapError
from trio_raft.errors.config import JoinedAsVoterError as JoinedAsVoterError
from trio_raft.errors.config import LocalPeerMissingError as LocalPeerMissingError
from trio_raft.errors.config import MetricsUnavailableError as MetricsUnavailableError
from trio_raft.errors.config import NodeIDRequiredError as NodeIDRequiredError
from trio_raft.errors.config import NoPeersConfiguredError as NoPeersConfiguredError
from trio_raft.errors.config import PeerAddressRequiredError as PeerAddressRequiredError
from trio_raft.errors.config import PeerFormatInvalidError as PeerFormatInvalidError
from trio_raft.errors.config import PeerIDRequiredError as PeerIDRequiredError
from trio_raft.errors.config import PeerNodeIDConflictError as PeerNodeIDConflictError
from trio_raft.errors.config import StateMachineAheadError as StateMachineAheadError
from trio_raft.errors.config import StateMachineUnsetError as StateMachineUnsetError
from trio_raft.errors.envelope import BadNonceSizeError as BadNonceSizeError
from trio_raft.errors.envelope import EncryptionScanError as EncryptionScanError
from trio_raft.errors.envelope import EnvelopeError as EnvelopeError
from trio_raft.errors.envelope import EnvelopeRegimeError as EnvelopeRegimeError
from trio_raft.errors.envelope import EnvelopeShortError as EnvelopeShortError
from trio_raft.errors.envelope import EnvelopeVersionError as EnvelopeVersionError
from trio_raft.errors.envelope import FSMApplyHaltError as FSMApplyHaltError
from trio_raft.errors.envelope import IntegrityError as IntegrityError
from trio_raft.errors.envelope import KEKError as KEKError
from trio_raft.errors.envelope import KEKPermissionError as KEKPermissionError
from trio_raft.errors.envelope import KeyConflictError as KeyConflictError
from trio_raft.errors.envelope import KeyStoreCorruptError as KeyStoreCorruptError
from trio_raft.errors.envelope import KeyStoreError as KeyStoreError
from trio_raft.errors.envelope import NilKeystoreError as NilKeystoreError
from trio_raft.errors.envelope import NonceExhaustedError as NonceExhaustedError
from trio_raft.errors.envelope import RaftUnwrapFailedError as RaftUnwrapFailedError
from trio_raft.errors.envelope import ReservedKeyIDError as ReservedKeyIDError
from trio_raft.errors.envelope import ReservedPrefixError as ReservedPrefixError
from trio_raft.errors.envelope import UnknownKeyIDError as UnknownKeyIDError
from trio_raft.errors.outcomes import (
    ConfChangeContextTooLargeError as ConfChangeContextTooLargeError,
)
from trio_raft.errors.outcomes import ConfigIndexMismatchError as ConfigIndexMismatchError
from trio_raft.errors.outcomes import EngineClosedError as EngineClosedError
from trio_raft.errors.outcomes import EngineClosedWhileWaitingError as EngineClosedWhileWaitingError
from trio_raft.errors.outcomes import EngineFailedError as EngineFailedError
from trio_raft.errors.outcomes import (
    EnvelopeCutoverInProgressError as EnvelopeCutoverInProgressError,
)
from trio_raft.errors.outcomes import FailedPreconditionError as FailedPreconditionError
from trio_raft.errors.outcomes import LeadershipLostError as LeadershipLostError
from trio_raft.errors.outcomes import (
    LeadershipTransferAbortedError as LeadershipTransferAbortedError,
)
from trio_raft.errors.outcomes import (
    LeadershipTransferConfChangePendingError as LeadershipTransferConfChangePendingError,
)
from trio_raft.errors.outcomes import (
    LeadershipTransferInProgressError as LeadershipTransferInProgressError,
)
from trio_raft.errors.outcomes import (
    LeadershipTransferNoHealthyTargetError as LeadershipTransferNoHealthyTargetError,
)
from trio_raft.errors.outcomes import (
    LeadershipTransferNotLeaderError as LeadershipTransferNotLeaderError,
)
from trio_raft.errors.outcomes import (
    LeadershipTransferNotReadyError as LeadershipTransferNotReadyError,
)
from trio_raft.errors.outcomes import (
    LeadershipTransferRejectedError as LeadershipTransferRejectedError,
)
from trio_raft.errors.outcomes import LeadershipTransferTargetError as LeadershipTransferTargetError
from trio_raft.errors.outcomes import (
    LeadershipTransferTargetNotCaughtUpError as LeadershipTransferTargetNotCaughtUpError,
)
from trio_raft.errors.outcomes import MembershipChangePendingError as MembershipChangePendingError
from trio_raft.errors.outcomes import NotAppliedError as NotAppliedError
from trio_raft.errors.outcomes import NothingToExportError as NothingToExportError
from trio_raft.errors.outcomes import NotLeaderError as NotLeaderError
from trio_raft.errors.outcomes import OutcomeUnknownError as OutcomeUnknownError
from trio_raft.errors.outcomes import (
    PromoteLearnerMinAppliedZeroError as PromoteLearnerMinAppliedZeroError,
)
from trio_raft.errors.outcomes import PromoteLearnerNoProgressError as PromoteLearnerNoProgressError
from trio_raft.errors.outcomes import (
    PromoteLearnerNotCaughtUpError as PromoteLearnerNotCaughtUpError,
)
from trio_raft.errors.outcomes import PromoteLearnerNotLearnerError as PromoteLearnerNotLearnerError
from trio_raft.errors.outcomes import StepQueueFullError as StepQueueFullError
from trio_raft.errors.outcomes import TooManyPendingConfigsError as TooManyPendingConfigsError
from trio_raft.errors.outcomes import TransportPeerUnknownError as TransportPeerUnknownError
from trio_raft.errors.storage import BackupFileError as BackupFileError
from trio_raft.errors.storage import ClusterIdFileError as ClusterIdFileError
from trio_raft.errors.storage import DataDirNotEmptyError as DataDirNotEmptyError
from trio_raft.errors.storage import FSMSnapshotError as FSMSnapshotError
from trio_raft.errors.storage import FSMSnapshotFileCRCError as FSMSnapshotFileCRCError
from trio_raft.errors.storage import FSMSnapshotNotFoundError as FSMSnapshotNotFoundError
from trio_raft.errors.storage import FSMSnapshotTokenCRCError as FSMSnapshotTokenCRCError
from trio_raft.errors.storage import FSMSnapshotTokenInvalidError as FSMSnapshotTokenInvalidError
from trio_raft.errors.storage import FSMSnapshotTooLargeError as FSMSnapshotTooLargeError
from trio_raft.errors.storage import FSMSnapshotTooSmallError as FSMSnapshotTooSmallError
from trio_raft.errors.storage import (
    MigrationDestinationExistsError as MigrationDestinationExistsError,
)
from trio_raft.errors.storage import PeersFileError as PeersFileError
from trio_raft.errors.storage import RecoveryError as RecoveryError
from trio_raft.errors.storage import SealedSnapshotError as SealedSnapshotError
from trio_raft.errors.storage import SealedSnapshotIntegrityError as SealedSnapshotIntegrityError
from trio_raft.errors.storage import SealedSnapshotKeyError as SealedSnapshotKeyError
from trio_raft.errors.storage import SealedSnapshotRequiredError as SealedSnapshotRequiredError
from trio_raft.errors.storage import SnapshotDescriptorError as SnapshotDescriptorError
from trio_raft.errors.storage import SnapshotFileError as SnapshotFileError
from trio_raft.errors.storage import SnapshotRequiredError as SnapshotRequiredError
from trio_raft.errors.storage import StorageError as StorageError
from trio_raft.errors.storage import StorageIOError as StorageIOError
from trio_raft.errors.storage import WALCorruptError as WALCorruptError
from trio_raft.errors.storage import WALError as WALError
from trio_raft.errors.storage import WALIOError as WALIOError
from trio_raft.errors.storage import WALLockedError as WALLockedError
from trio_raft.errors.storage import WALPoisonedError as WALPoisonedError
from trio_raft.errors.storage import WALSnapshotNotFoundError as WALSnapshotNotFoundError
from trio_raft.errors.storage import WALUnrepairableError as WALUnrepairableError
from trio_raft.errors.transport import CodecError as CodecError
from trio_raft.errors.transport import DispatchError as DispatchError
from trio_raft.errors.transport import PeerStreamClosedError as PeerStreamClosedError
from trio_raft.errors.transport import (
    ReceivedFSMSnapshotStaleError as ReceivedFSMSnapshotStaleError,
)
from trio_raft.errors.transport import SendStreamDisabledError as SendStreamDisabledError
from trio_raft.errors.transport import (
    SnapshotMetadataDuplicateError as SnapshotMetadataDuplicateError,
)
from trio_raft.errors.transport import SnapshotMetadataNilError as SnapshotMetadataNilError
from trio_raft.errors.transport import SnapshotPayloadCRCError as SnapshotPayloadCRCError
from trio_raft.errors.transport import SnapshotPayloadTooLargeError as SnapshotPayloadTooLargeError
from trio_raft.errors.transport import SnapshotStreamError as SnapshotStreamError
from trio_raft.errors.transport import SnapshotStreamShortError as SnapshotStreamShortError
from trio_raft.errors.transport import (
    SnapshotTransferCancelledError as SnapshotTransferCancelledError,
)
from trio_raft.errors.transport import TransportAttachedError as TransportAttachedError
from trio_raft.errors.transport import TransportBindError as TransportBindError
from trio_raft.errors.transport import TransportClosedError as TransportClosedError
from trio_raft.errors.transport import TransportError as TransportError
from trio_raft.errors.transport import TransportHandlerNilError as TransportHandlerNilError
