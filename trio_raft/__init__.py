"""trio_raft: a Raft consensus engine for trio applications.

Open an engine with :func:`open_engine` and an :class:`OpenConfig`; see the README and
``docs/`` for the API contract, concurrency model and on-disk formats.
"""

from trio_raft import errors
from trio_raft._version import __version__ as __version__
from trio_raft.engine import (
    SUFFRAGE_LEARNER,
    SUFFRAGE_VOTER,
    Configuration,
    Engine,
    Factory,
    FactoryConfig,
    LeaderInfo,
    OpenConfig,
    Peer,
    PeerProgress,
    ProposalResult,
    Server,
    Snapshot,
    State,
    StateMachine,
    Status,
    TransferTarget,
    derive_node_id,
    join_role_violation_count,
    open_engine,
    parse_peers,
)
from trio_raft.envelope import KEK, Cipher
from trio_raft.errors import *  # noqa: F403  (every error class is part of the public surface)
from trio_raft.errors import RaftError

__all__ = [
    "KEK",
    "SUFFRAGE_LEARNER",
    "SUFFRAGE_VOTER",
    "Cipher",
    "Configuration",
    "Engine",
    "Factory",
    "FactoryConfig",
    "LeaderInfo",
    "OpenConfig",
    "Peer",
    "PeerProgress",
    "ProposalResult",
    "RaftError",
    "Server",
    "Snapshot",
    "State",
    "StateMachine",
    "Status",
    "TransferTarget",
    "__version__",
    "derive_node_id",
    "errors",
    "join_role_violation_count",
    "open_engine",
    "parse_peers",
    *errors.__all__,
]
