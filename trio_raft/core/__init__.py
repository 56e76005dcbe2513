"""The sans-IO Raft core: a pure, deterministic state machine in the etcd-raft RawNode shape.

Nothing here imports trio, touches a file or socket, reads a clock, or uses global randomness:
inputs arrive as method calls (``tick``, ``step``, ``propose``...), outputs leave in a
:class:`~trio_raft.core.messages.Ready`.
"""

from trio_raft.core.messages import (
    EMPTY_HARD_STATE,
    EMPTY_SNAPSHOT,
    LOCAL_MESSAGE_TYPES,
    NONE,
    PRIORITY_MESSAGE_TYPES,
    RESPONSE_MESSAGE_TYPES,
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    EntryType,
    HardState,
    Message,
    MessageType,
    ReadState,
    Ready,
    Snapshot,
    SnapshotMetadata,
    SoftState,
    StateType,
)
from trio_raft.core.storage import MemoryStorage, Storage

__all__ = [
    "EMPTY_HARD_STATE",
    "EMPTY_SNAPSHOT",
    "LOCAL_MESSAGE_TYPES",
    "NONE",
    "PRIORITY_MESSAGE_TYPES",
    "RESPONSE_MESSAGE_TYPES",
    "ConfChange",
    "ConfChangeType",
    "ConfState",
    "Entry",
    "EntryType",
    "HardState",
    "MemoryStorage",
    "Message",
    "MessageType",
    "ReadState",
    "Ready",
    "Snapshot",
    "SnapshotMetadata",
    "SoftState",
    "StateType",
    "Storage",
]
