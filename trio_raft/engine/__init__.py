"""The trio driver around the sans-IO core: open_engine, Engine and the public value types."""

from trio_raft.engine.coldstart import OpenReport
from trio_raft.engine.config import OpenConfig, derive_node_id, parse_peers
from trio_raft.engine.engine import Engine
from trio_raft.engine.factory import Factory, FactoryConfig
from trio_raft.engine.lifecycle import open_engine
from trio_raft.engine.membership import join_role_violation_count
from trio_raft.engine.observer import (
    CounterValues,
    EngineObserver,
    NullObserver,
    StageObserver,
)
from trio_raft.engine.types import (
    SUFFRAGE_LEARNER,
    SUFFRAGE_VOTER,
    Configuration,
    LeaderInfo,
    Peer,
    PeerProgress,
    ProposalResult,
    Server,
    Snapshot,
    State,
    StateMachine,
    Status,
    TransferTarget,
)

__all__ = [
    "SUFFRAGE_LEARNER",
    "SUFFRAGE_VOTER",
    "Configuration",
    "CounterValues",
    "Engine",
    "EngineObserver",
    "Factory",
    "FactoryConfig",
    "LeaderInfo",
    "NullObserver",
    "OpenConfig",
    "OpenReport",
    "Peer",
    "PeerProgress",
    "ProposalResult",
    "Server",
    "Snapshot",
    "StageObserver",
    "State",
    "StateMachine",
    "Status",
    "TransferTarget",
    "derive_node_id",
    "join_role_violation_count",
    "open_engine",
    "parse_peers",
]
