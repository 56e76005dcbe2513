"""Value types exchanged with the sans-IO core.

Everything here is an immutable ``attrs`` class (or an ``IntEnum``): messages, log entries, hard
state, configuration state, snapshot metadata, read states and the :class:`Ready` batch. The core
creates them, the engine persists and ships them, and the transport's codec turns them into bytes.

Numbering of :class:`MessageType`, :class:`EntryType` and :class:`ConfChangeType` follows etcd's
raftpb so that logs and traces read the same; the wire layout is the project's own (see
``docs/formats.md``).
"""

from __future__ import annotations

import enum
import struct

import attrs

from trio_raft.core.errors import ConfChangeError

#: Node id 0 means "nobody" (no leader, no vote).
NONE = 0

#: Bytes counted per entry on top of its data for size limits (roughly its encoded header).
ENTRY_OVERHEAD = 24


class MessageType(enum.IntEnum):
    HUP = 0  # local: start an election
    BEAT = 1  # local: leader sends heartbeats
    PROP = 2  # local proposal (followers never forward: proposal forwarding is disabled)
    APP = 3
    APP_RESP = 4
    VOTE = 5
    VOTE_RESP = 6
    SNAP = 7
    HEARTBEAT = 8
    HEARTBEAT_RESP = 9
    UNREACHABLE = 10  # local
    SNAP_STATUS = 11  # local
    CHECK_QUORUM = 12  # local
    TRANSFER_LEADER = 13
    TIMEOUT_NOW = 14
    READ_INDEX = 15
    READ_INDEX_RESP = 16
    PRE_VOTE = 17
    PRE_VOTE_RESP = 18


#: Message types that never leave the node.
LOCAL_MESSAGE_TYPES = frozenset(
    {
        MessageType.HUP,
        MessageType.BEAT,
        MessageType.UNREACHABLE,
        MessageType.SNAP_STATUS,
        MessageType.CHECK_QUORUM,
    }
)

#: Message types that are responses to a request (etcd's IsResponseMsg).
RESPONSE_MESSAGE_TYPES = frozenset(
    {
        MessageType.APP_RESP,
        MessageType.VOTE_RESP,
        MessageType.HEARTBEAT_RESP,
        MessageType.UNREACHABLE,
        MessageType.READ_INDEX_RESP,
        MessageType.PRE_VOTE_RESP,
    }
)

#: Latency-sensitive types: the engine sends them on the heartbeat/vote lane and steps them
#: through its priority queue (``trio_raft/engine/inbox.py``). MsgAppResp is deliberately not
#: among them: it stays in order with the replication traffic it answers.
PRIORITY_MESSAGE_TYPES = frozenset(
    {
        MessageType.HEARTBEAT,
        MessageType.HEARTBEAT_RESP,
        MessageType.READ_INDEX,
        MessageType.READ_INDEX_RESP,
        MessageType.VOTE,
        MessageType.VOTE_RESP,
        MessageType.PRE_VOTE,
        MessageType.PRE_VOTE_RESP,
        MessageType.TIMEOUT_NOW,
    }
)


class EntryType(enum.IntEnum):
    NORMAL = 0
    CONF_CHANGE = 1
    CONF_CHANGE_V2 = 2


class ConfChangeType(enum.IntEnum):
    ADD_NODE = 0
    REMOVE_NODE = 1
    UPDATE_NODE = 2
    ADD_LEARNER_NODE = 3


class StateType(enum.IntEnum):
    FOLLOWER = 0
    CANDIDATE = 1
    LEADER = 2
    PRE_CANDIDATE = 3


def _tuple_of_ints(value: object) -> tuple[int, ...]:
    return tuple(int(v) for v in value)  # type: ignore[attr-defined]


@attrs.frozen(slots=True)
class Entry:
    term: int
    index: int
    type: EntryType = EntryType.NORMAL
    data: bytes = b""

    def size(self) -> int:
        """Approximate encoded size, used for ``max_size_per_msg`` accounting."""
        return len(self.data) + ENTRY_OVERHEAD


@attrs.frozen(slots=True)
class HardState:
    term: int = 0
    vote: int = NONE
    commit: int = 0

    def is_empty(self) -> bool:
        return self.term == 0 and self.vote == NONE and self.commit == 0


EMPTY_HARD_STATE = HardState()


@attrs.frozen(slots=True)
class ConfState:
    """Membership. Joint-consensus fields exist so persisted state can be validated; the core
    itself only ever produces single-step configurations (outgoing/next empty)."""

    voters: tuple[int, ...] = attrs.field(default=(), converter=_tuple_of_ints)
    learners: tuple[int, ...] = attrs.field(default=(), converter=_tuple_of_ints)
    voters_outgoing: tuple[int, ...] = attrs.field(default=(), converter=_tuple_of_ints)
    learners_next: tuple[int, ...] = attrs.field(default=(), converter=_tuple_of_ints)
    auto_leave: bool = False

    def is_joint(self) -> bool:
        return bool(self.voters_outgoing or self.learners_next or self.auto_leave)

    def equivalent(self, other: ConfState) -> bool:
        """Same membership, ignoring order."""
        return (
            sorted(self.voters) == sorted(other.voters)
            and sorted(self.learners) == sorted(other.learners)
            and sorted(self.voters_outgoing) == sorted(other.voters_outgoing)
            and sorted(self.learners_next) == sorted(other.learners_next)
            and self.auto_leave == other.auto_leave
        )


@attrs.frozen(slots=True)
class SnapshotMetadata:
    conf_state: ConfState = ConfState()
    index: int = 0
    term: int = 0


@attrs.frozen(slots=True)
class Snapshot:
    """A raft snapshot. ``data`` is whatever the engine stores for the state machine: the
    17-byte token naming a ``.fsm`` file, or an inline payload."""

    metadata: SnapshotMetadata = SnapshotMetadata()
    data: bytes = b""

    def is_empty(self) -> bool:
        return self.metadata.index == 0


EMPTY_SNAPSHOT = Snapshot()


@attrs.frozen(slots=True)
class Message:
    type: MessageType
    to: int = NONE
    from_: int = NONE
    term: int = 0
    log_term: int = 0
    index: int = 0
    entries: tuple[Entry, ...] = ()
    commit: int = 0
    snapshot: Snapshot | None = None
    reject: bool = False
    reject_hint: int = 0
    context: bytes = b""


@attrs.frozen(slots=True)
class ConfChange:
    """A single-step membership change (etcd's ConfChange V1)."""

    type: ConfChangeType
    node_id: int
    context: bytes = b""
    id: int = 0

    _HEADER = struct.Struct(">BBQQI")
    _VERSION = 1

    def encode(self) -> bytes:
        return (
            self._HEADER.pack(self._VERSION, int(self.type), self.node_id, self.id,
                              len(self.context))
            + self.context
        )

    @classmethod
    def decode(cls, data: bytes) -> ConfChange:
        """Decode entry data; raises :class:`ConfChangeError` on anything malformed."""
        hdr = cls._HEADER
        if len(data) < hdr.size:
            raise ConfChangeError(f"conf change too short ({len(data)} bytes)")
        version, ctype, node_id, cc_id, ctx_len = hdr.unpack_from(data)
        if version != cls._VERSION:
            raise ConfChangeError(f"unknown conf change version {version}")
        if len(data) != hdr.size + ctx_len:
            raise ConfChangeError("conf change length mismatch")
        try:
            kind = ConfChangeType(ctype)
        except ValueError:
            raise ConfChangeError(f"unknown conf change type {ctype}") from None
        return cls(kind, node_id, bytes(data[hdr.size :]), cc_id)


@attrs.frozen(slots=True)
class ReadState:
    """The answer to ``read_index(context)``: reads issued with that context are linearizable once
    the local applied index reaches ``index``."""

    index: int
    request_ctx: bytes


@attrs.frozen(slots=True)
class SoftState:
    lead: int = NONE
    raft_state: StateType = StateType.FOLLOWER
    lead_transferee: int = NONE


@attrs.frozen(slots=True)
class Ready:
    """Work the core hands to the driver. Handle in this order: install ``snapshot``; append
    ``entries`` and persist ``hard_state`` (fsync when ``must_sync``); then send ``messages``;
    apply ``committed_entries``; deliver ``read_states``; finally call ``RawNode.advance``."""

    soft_state: SoftState | None = None
    hard_state: HardState | None = None
    read_states: tuple[ReadState, ...] = ()
    entries: tuple[Entry, ...] = ()
    snapshot: Snapshot | None = None
    committed_entries: tuple[Entry, ...] = ()
    messages: tuple[Message, ...] = ()
    must_sync: bool = False
