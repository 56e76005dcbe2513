"""trio_raft: a Raft consensus engine for trio applications.

Open an engine with :func:`open_engine` and an :class:`OpenConfig`; see the README and
``docs/`` for the API contract, concurrency model and on-disk formats. Every error class lives
in :mod:`trio_raft.errors`; the ones most callers handle are re-exported here.
"""

from trio_raft import errors as errors
from trio_raft._version import __version__ as __version__
from trio_raft.engine import SUFFRAGE_LEARNER as SUFFRAGE_LEARNER
from trio_raft.engine import SUFFRAGE_VOTER as SUFFRAGE_VOTER
from trio_raft.engine import Configuration as Configuration
from trio_raft.engine import CounterValues as CounterValues
from trio_raft.engine import Engine as Engine
from trio_raft.engine import EngineObserver as EngineObserver
from trio_raft.engine import Factory as Factory
from trio_raft.engine import FactoryConfig as FactoryConfig
from trio_raft.engine import LeaderInfo as LeaderInfo
from trio_raft.engine import NullObserver as NullObserver
from trio_raft.engine import OpenConfig as OpenConfig
from trio_raft.engine import OpenReport as OpenReport
from trio_raft.engine import Peer as Peer
from trio_raft.engine import PeerProgress as PeerProgress
from trio_raft.engine import ProposalResult as ProposalResult
from trio_raft.engine import Server as Server
from trio_raft.engine import Snapshot as Snapshot
from trio_raft.engine import StageObserver as StageObserver
from trio_raft.engine import State as State
from trio_raft.engine import StateMachine as StateMachine
from trio_raft.engine import Status as Status
from trio_raft.engine import TransferTarget as TransferTarget
from trio_raft.engine import derive_node_id as derive_node_id
from trio_raft.engine import join_role_violation_count as join_role_violation_count
from trio_raft.engine import open_engine as open_engine
from trio_raft.engine import parse_peers as parse_peers
from trio_raft.envelope import KEK as KEK
from trio_raft.envelope import Cipher as Cipher
from trio_raft.errors import ConfigError as ConfigError
from trio_raft.errors import EngineClosedError as EngineClosedError
from trio_raft.errors import EngineClosedWhileWaitingError as EngineClosedWhileWaitingError
from trio_raft.errors import EngineFailedError as EngineFailedError
from trio_raft.errors import EnvelopeCutoverInProgressError as EnvelopeCutoverInProgressError
from trio_raft.errors import LeadershipLostError as LeadershipLostError
from trio_raft.errors import (
    LeadershipTransferInProgressError as LeadershipTransferInProgressError,
)
from trio_raft.errors import NotAppliedError as NotAppliedError
from trio_raft.errors import NotLeaderError as NotLeaderError
from trio_raft.errors import OutcomeUnknownError as OutcomeUnknownError
from trio_raft.errors import RaftError as RaftError
from trio_raft.errors import StorageError as StorageError
from trio_raft.gctune import GC_THRESHOLD as GC_THRESHOLD
from trio_raft.gctune import tune_gc as tune_gc
