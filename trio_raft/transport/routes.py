"""The gRPC routes of the raft transport service (``protos/transport.proto``)."""

from __future__ import annotations

SERVICE = "/trio_raft.transport.v1.RaftTransport/"
#: One message per call (the fallback lane, and the priority lane of peers without PriorityStream).
SEND_ROUTE = SERVICE + "Send"
#: The replication lane: one long-lived client stream per peer.
STREAM_ROUTE = SERVICE + "SendStream"
#: One snapshot per call: metadata, payload chunks, final.
SNAPSHOT_ROUTE = SERVICE + "SendSnapshot"

RAFT_ROUTES = (SEND_ROUTE, STREAM_ROUTE, SNAPSHOT_ROUTE)
