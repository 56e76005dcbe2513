"""The gRPC routes of the raft transport service (``protos/transport.proto``)."""

from __future__ import annotations

SERVICE = "/trio_raft.transport.v1.RaftTransport/"
#: One message per call: the fallback of both lanes for peers without their stream.
SEND_ROUTE = SERVICE + "Send"
#: The replication lane: one long-lived client stream per peer.
STREAM_ROUTE = SERVICE + "SendStream"
#: One snapshot per call: metadata, payload chunks, final.
SNAPSHOT_ROUTE = SERVICE + "SendSnapshot"

#: The priority lane: one long-lived client stream per peer, on a connection of its own.
PRIORITY_ROUTE = SERVICE + "PriorityStream"

RAFT_ROUTES = (SEND_ROUTE, STREAM_ROUTE, SNAPSHOT_ROUTE, PRIORITY_ROUTE)
