"""Transports: how raft messages travel between nodes.

* :class:`Transport` (``base``): the trio-native protocol the engine uses.
* :class:`GRPCTransport` (``grpc``): gRPC over grpclib on an asyncio loop in a thread.
* :class:`MemoryNetwork` / :class:`MemoryTransport` (``memory``): in-process, with fault
  injection, for tests and simulation.
* ``codec``: the versioned wire frame of a raft message; ``spool``: received snapshot payloads.
"""

from trio_raft.transport.base import Handler, Transport, TransportPeer, error_code
from trio_raft.transport.codec import WIRE_VERSION, decode_message, encode_message
from trio_raft.transport.grpc import GRPCTransport
from trio_raft.transport.memory import LinkConfig, MemoryNetwork, MemoryTransport
from trio_raft.transport.spool import SnapshotSpool

__all__ = [
    "WIRE_VERSION",
    "GRPCTransport",
    "Handler",
    "LinkConfig",
    "MemoryNetwork",
    "MemoryTransport",
    "SnapshotSpool",
    "Transport",
    "TransportPeer",
    "decode_message",
    "encode_message",
    "error_code",
]
