"""What a request can end with: the two outcome families and the errors of each.

Part of :mod:`trio_raft.errors` (which re-exports every name); the hierarchy and the
outcome families are described there and in ``docs/api.md``.
"""

from __future__ import annotations

from trio_raft.core.errors import (
    RaftError,
)


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
