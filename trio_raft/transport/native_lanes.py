"""The native lanes of one :class:`~trio_raft.transport.GRPCTransport`: which messages take
them, and their two halves (docs/transport.md, section 3.8).

:class:`NativeLanes` holds the client (:mod:`.native_client`, in TLS when the transport calls
its peers in TLS) and the server (:mod:`.native_server`) when the transport serves without
TLS: a TLS connection is terminated by the gRPC server, so with TLS a node's lanes are native
on the sending side only. It lives as long as one run of ``GRPCTransport.serve`` and uses
that run's nursery and portal.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any

import attrs
import trio
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from trio_raft.errors import TransportClosedError
from trio_raft.transport.bridge import TrioPortal
from trio_raft.transport.grpc_limits import ServerLimits
from trio_raft.transport.grpc_server import ServerHost
from trio_raft.transport.native_client import NativeClient
from trio_raft.transport.native_server import NativeServer


@attrs.frozen(slots=True)
class LanePolicy:
    """Which lanes stream (the transport's ``send_stream`` / ``priority_stream``), how long a
    send may take, and how long a peer without a lane's route is left alone."""

    send_stream: bool
    priority_stream: bool
    dispatch_timeout: float
    reprobe_after: float
    #: How the client half reaches its peers (None: plain TCP) and the name it checks.
    ssl_context: ssl.SSLContext | None = None
    server_name: str | None = None


class NativeLanes:
    """See the module docstring. ``client`` / ``server``: which halves run."""

    def __init__(self, nursery: trio.Nursery, portal: TrioPortal, host: ServerHost,
                 limits: ServerLimits, policy: LanePolicy, *, client: bool,
                 server: bool) -> None:
        self._portal = portal
        self._policy = policy
        self.client = NativeClient(
            nursery, reprobe_after=policy.reprobe_after, ssl_context=policy.ssl_context,
            server_name=policy.server_name) if client else None
        self.server = NativeServer(host, limits, nursery) if server else None

    async def send(self, address: str, frame: bytes, priority: bool) -> float | None:
        """Send ``frame`` on its native lane: the instant it was written, or ``None`` when the
        message does not go native (its lane does not stream, or the peer does not serve the
        lane's route: the gRPC client takes it). Failures are raised as they come (a
        ``TimeoutError`` after ``dispatch_timeout``)."""
        client, policy = self.client, self._policy
        if client is None or not (policy.priority_stream if priority else policy.send_stream):
            return None
        lane = client.lane_for(priority)
        if not client.usable(lane, address):
            return None
        try:
            with trio.fail_after(policy.dispatch_timeout):
                return await client.deliver(lane, address, frame)
        except trio.TooSlowError:
            raise TimeoutError(f"native {lane.name} lane to {address}: no progress in "
                               f"{policy.dispatch_timeout} s") from None
        except GRPCError as exc:
            if exc.status is Status.UNIMPLEMENTED:
                return None
            raise

    def send_nowait(self, address: str, frame: bytes, priority: bool) -> float | None:
        """:meth:`send` without yielding, when the lane's stream is open and free now: the
        instant it was written, or ``None`` (not sent)."""
        client, policy = self.client, self._policy
        if client is None or not (policy.priority_stream if priority else policy.send_stream):
            return None
        return client.try_deliver(client.lane_for(priority), address, frame)

    def hand_over(self, sock: socket.socket, data: bytes) -> None:
        """From the gRPC server's loop: serve a native lane's connection here."""
        server = self.server
        if server is None:
            sock.close()
            return
        try:
            self._portal.call_soon(server.adopt, sock, data)
        except TransportClosedError:
            sock.close()

    def close_address(self, address: str) -> None:
        if self.client is not None:
            self.client.close_address(address)

    def aclose(self) -> None:
        if self.client is not None:
            self.client.aclose()

    def add_stats(self, out: dict[str, Any]) -> None:
        """Count the lanes in ``out`` (the transport's stats) the same whichever side carried
        them; the server's connections apart."""
        if self.client is not None:
            for key, value in attrs.asdict(self.client.counters).items():
                out[key] = out.get(key, 0) + value
            streams = len(self.client.streams)  # one connection each
            out["open_streams"] = out.get("open_streams", 0) + streams
            out["channels"] = out.get("channels", 0) + streams
        if self.server is not None:
            counters = attrs.asdict(self.server.counters)
            for key in ("messages_received", "messages_rejected"):
                out[key] = out.get(key, 0) + counters.pop(key)
            out.update(counters)
