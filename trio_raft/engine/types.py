"""Public value types of the engine API (``docs/api.md``)."""

from __future__ import annotations

import enum
from typing import IO, Any, Protocol, runtime_checkable

import attrs

SUFFRAGE_VOTER = "voter"
SUFFRAGE_LEARNER = "learner"


class State(enum.StrEnum):
    FOLLOWER = "follower"
    CANDIDATE = "candidate"
    LEADER = "leader"
    SHUTDOWN = "shutdown"
    UNKNOWN = "unknown"


@attrs.frozen
class Peer:
    """A cluster member as configured. ``node_id`` is derived from ``id`` when 0."""

    id: str = ""
    address: str = ""
    node_id: int = 0
    suffrage: str = ""


@attrs.frozen
class Server:
    id: str
    address: str
    suffrage: str


@attrs.frozen
class Configuration:
    servers: tuple[Server, ...] = ()


@attrs.frozen
class LeaderInfo:
    id: str = ""
    address: str = ""


@attrs.frozen
class TransferTarget:
    id: str = ""
    address: str = ""


@attrs.frozen
class PeerProgress:
    """What a leader knows of one peer's log (see ``Engine.replication``).

    ``match`` is the highest index the peer has acknowledged holding; ``next`` the next index
    the leader will send it; ``state`` is ``probe``, ``replicate`` or ``snapshot``.
    """

    id: str
    match: int
    next: int
    state: str
    learner: bool
    recent_active: bool


@attrs.frozen
class ProposalResult:
    commit_index: int
    response: Any = None


@attrs.frozen
class Status:
    state: State = State.UNKNOWN
    leader: LeaderInfo = LeaderInfo()
    term: int = 0
    commit_index: int = 0
    applied_index: int = 0
    last_log_index: int = 0
    last_snapshot_index: int = 0
    fsm_pending: int = 0
    num_peers: int = 0
    #: Seconds since the leader was last heard from; 0 on the leader, -1 when unknown.
    last_contact: float = -1.0
    configuration_index: int = 0
    lead_transferee: int = 0
    pending_conf_change: bool = False


class Snapshot(Protocol):
    """A point-in-time handle on the state machine, taken quickly by ``StateMachine.snapshot``."""

    def write_to(self, writer: IO[bytes]) -> int:
        """Write the whole state; runs in a worker thread. Returns the bytes written."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class StateMachine(Protocol):
    """The replicated state. Which thread runs each method and what may overlap: the table in
    ``docs/api.md`` (the state machine)."""

    def apply(self, data: bytes) -> Any:
        """Apply one committed command (trio thread, log order); the result goes to the
        proposer."""
        ...

    def snapshot(self) -> Snapshot:
        """Capture a point-in-time handle quickly (trio thread); written out later."""
        ...

    def restore(self, reader: IO[bytes]) -> None:
        """Replace the whole state from a snapshot payload (a worker thread)."""
        ...
