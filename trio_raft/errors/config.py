"""Configuration errors: what open_engine refuses before anything starts, a node added in a
role it was not started for, an optional dependency that is missing.

Part of :mod:`trio_raft.errors` (which re-exports every name); the hierarchy and the
outcome families are described there and in ``docs/api.md``.
"""

from __future__ import annotations

from trio_raft.core.errors import (
    RaftError,
)


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


class JoinedAsVoterError(RaftError):
    """A node started with ``join_as_learner`` was added as a voter: it refuses to serve (the
    engine stops) until an operator removes it and adds it back as a learner."""
    default_message = "raft engine: join_as_learner node was added as a voter"


class MetricsUnavailableError(RaftError, ImportError):
    """``trio_raft.metrics`` needs prometheus-client, which is not installed (install the
    ``metrics`` extra: ``pip install 'trio-raft[metrics]'``)."""
    default_message = ("trio_raft.metrics needs prometheus-client: "
                       "pip install 'trio-raft[metrics]'")
