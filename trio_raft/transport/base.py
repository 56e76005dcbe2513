"""The trio-native transport protocol the engine talks to, and the small value types around it.

Theory of operation
-------------------
A transport moves :class:`~trio_raft.core.messages.Message` values between nodes. The engine

* tells it who the peers are (:meth:`Transport.upsert_peer` / :meth:`Transport.remove_peer`),
* gives it one inbound handler (:meth:`Transport.set_handler`), an ``async`` function that takes
  a message and either returns (the message was accepted, e.g. queued for the run loop) or raises
  (e.g. :class:`~trio_raft.errors.StepQueueFullError`); the error travels back to the sender,
* starts it with ``await nursery.start(transport.serve)`` (or ``async with transport:``),
* calls :meth:`Transport.dispatch` from its per-peer sender tasks. ``dispatch`` returns once the
  message is handed to the network (for gRPC: written to the peer's stream or acknowledged by a
  unary call) and raises on failure. Every failure raised is a
  :class:`~trio_raft.errors.RaftError` whose code :func:`error_code` names (gRPC status names in
  the seed's CamelCase spelling); the transport also counts them itself
  (:meth:`Transport.dispatch_error_counts_by_code`). Cancellation (``trio.Cancelled``) is never
  counted and always propagates.
* closes it with :meth:`Transport.aclose`, after which nothing it started is left running.

Snapshots (``MsgSnap``) go through :meth:`Transport.dispatch_snapshot`; ``dispatch`` forwards
them there itself, so the engine may call ``dispatch`` for everything.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol, runtime_checkable

import attrs
import trio

from trio_raft.core.messages import Message
from trio_raft.errors import DispatchError, RaftError, TransportError

#: The inbound handler: accept a message or raise.
Handler = Callable[[Message], Awaitable[None]]

#: gRPC status code names as the seed spells them (Go's ``codes.Code.String()``), by number.
GRPC_CODE_NAMES: dict[int, str] = {
    0: "OK",
    1: "Canceled",
    2: "Unknown",
    3: "InvalidArgument",
    4: "DeadlineExceeded",
    5: "NotFound",
    6: "AlreadyExists",
    7: "PermissionDenied",
    8: "ResourceExhausted",
    9: "FailedPrecondition",
    10: "Aborted",
    11: "OutOfRange",
    12: "Unimplemented",
    13: "Internal",
    14: "Unavailable",
    15: "DataLoss",
    16: "Unauthenticated",
}


def error_code(exc: BaseException) -> str:
    """The counter key for a dispatch failure: the ``code`` attribute when the error has one
    (:class:`~trio_raft.errors.DispatchError`), ``DeadlineExceeded`` for timeouts, else
    ``Unknown``."""
    code = getattr(exc, "code", None)
    if isinstance(code, str) and code:
        return code
    if isinstance(exc, TimeoutError | trio.TooSlowError):
        return "DeadlineExceeded"
    return "Unknown"


@attrs.frozen(slots=True)
class TransportPeer:
    """A peer as the transport knows it: raft node id, the operator's id, and ``host:port``."""

    node_id: int
    id: str
    address: str


def split_address(address: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` for IPv6) into host and port; raises ``ValueError``."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port:
        raise ValueError(f"address {address!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


@attrs.define(slots=True)
class ErrorCounter:
    """Dispatch errors by code, owned by the trio side of a transport."""

    total: int = 0
    by_code: dict[str, int] = attrs.field(factory=dict)

    def record(self, code: str) -> None:
        self.total += 1
        self.by_code[code] = self.by_code.get(code, 0) + 1


@runtime_checkable
class Transport(Protocol):
    """What the engine needs from a transport. :class:`~trio_raft.transport.grpc.GRPCTransport`
    and :class:`~trio_raft.transport.memory.MemoryTransport` implement it."""

    async def dispatch(self, message: Message) -> None:
        """Send ``message`` to ``message.to``; raises on failure (see the module docstring)."""

    async def send(self, message: Message) -> None:
        """Alias of :meth:`dispatch`."""

    async def dispatch_snapshot(self, message: Message) -> None:
        """Send a ``MsgSnap`` with its payload; raises on failure."""

    async def send_snapshot(self, message: Message) -> None:
        """Alias of :meth:`dispatch_snapshot`."""

    def set_handler(self, handler: Handler | None) -> None:
        """Install the inbound handler (``None`` removes it: inbound messages are refused)."""

    def upsert_peer(self, peer: TransportPeer) -> None:
        """Add a peer or change its address."""

    def remove_peer(self, node_id: int) -> None:
        """Forget a peer and close what the transport holds for it."""

    def stats(self) -> dict[str, Any]:
        """Counters, as a flat dict (``dispatch_errors_by_code`` is a nested dict)."""

    def dispatch_error_count(self) -> int:
        """Total dispatch failures counted so far."""

    def dispatch_error_counts_by_code(self) -> dict[str, int]:
        """Dispatch failures by :func:`error_code`."""

    async def serve(self, *args: Any, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run the transport until :meth:`aclose` (``nursery.start`` compatible)."""

    async def aclose(self) -> None:
        """Stop everything the transport runs; idempotent."""


__all__ = [
    "GRPC_CODE_NAMES",
    "DispatchError",
    "ErrorCounter",
    "Handler",
    "RaftError",
    "Transport",
    "TransportError",
    "TransportPeer",
    "error_code",
    "split_address",
]
