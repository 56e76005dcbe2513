"""Transports: how raft messages travel between nodes.

* :class:`Transport` / :class:`ServingTransport` (``base``): the protocols the engine uses.
* :class:`GRPCTransport` (``grpc``): gRPC over grpclib on an asyncio loop in a thread.
* :class:`MemoryNetwork` / :class:`MemoryTransport` (``memory``): in-process, with fault
  injection, for tests and simulation.
* ``codec``: the versioned wire frame of a raft message; ``snapshot_transfer``: snapshot
  payload transfers as trio tasks (the payload files themselves belong to
  :class:`~trio_raft.storage.snapshot_exchange.SnapshotExchange`).
"""

from trio_raft.transport.base import (
    Handler,
    ServingTransport,
    Transport,
    TransportPeer,
    error_code,
)
from trio_raft.transport.codec import WIRE_VERSION, decode_message, encode_message
from trio_raft.transport.grpc import GRPCTransport
from trio_raft.transport.memory import LinkConfig, MemoryNetwork, MemoryTransport


def _conformance(grpc: GRPCTransport, memory: MemoryTransport) -> None:
    """Never called: mypy checks here that both transports satisfy both protocols."""
    serving: ServingTransport = grpc
    serving = memory
    plain: Transport = serving
    del plain


__all__ = [
    "WIRE_VERSION",
    "GRPCTransport",
    "Handler",
    "LinkConfig",
    "MemoryNetwork",
    "MemoryTransport",
    "ServingTransport",
    "Transport",
    "TransportPeer",
    "decode_message",
    "encode_message",
    "error_code",
]
